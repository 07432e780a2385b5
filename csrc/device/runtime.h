// The one include of kernel source (*_kernels.cuh, *_launch.cu): the CUDA runtime under nvcc,
// the CPU emulator's version of it under MOE_KERNELS_EMULATOR. Also the two shared-memory
// declarations, which the emulator needs to see to poison the storage at every block start:
//   MOE_KERNELS_SHARED(float, tile, [32][33]);   // static:  __shared__ float tile[32][33];
//   MOE_KERNELS_DYNAMIC_SHARED(int, counts);     // dynamic: extern __shared__ int counts[];
#pragma once

#include "device/runtime_api.h"

#if defined(MOE_KERNELS_EMULATOR)
#include "emu/runtime.h"

#define MOE_KERNELS_SHARED(type, name, dims) \
  using name##_shared_type = type dims;      \
  static name##_shared_type& name = ::moe_kernels::emu::static_shared<name##_shared_type>()
#define MOE_KERNELS_DYNAMIC_SHARED(type, name) \
  type* name = static_cast<type*>(::moe_kernels::emu::dynamic_shared_memory())
#else
#define MOE_KERNELS_SHARED(type, name, dims) __shared__ type name dims
#define MOE_KERNELS_DYNAMIC_SHARED(type, name)                                \
  extern __shared__ __align__(16) unsigned char moe_kernels_dynamic_shared[]; \
  type* name = reinterpret_cast<type*>(moe_kernels_dynamic_shared)
#endif
