// Marks functions that both the CUDA kernels and the CPU kernels call, so one piece of code
// defines the arithmetic on every backend.
#pragma once

#if defined(__CUDACC__)
#define MOE_KERNELS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MOE_KERNELS_HOST_DEVICE inline
#endif
