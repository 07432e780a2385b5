// The 16-bit float types kernels compute with: CUDA's under nvcc and in host code of the CUDA
// build, c10's (same layout, same round-to-nearest-even conversions) on the emulator.
#pragma once

#if defined(MOE_KERNELS_EMULATOR)
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace moe_kernels::device {

#if defined(MOE_KERNELS_EMULATOR)
using bf16 = c10::BFloat16;
using fp16 = c10::Half;
#else
using bf16 = __nv_bfloat16;
using fp16 = __half;
#endif

// The accumulator of a storage type: fp32 for the 16-bit types and fp32, fp64 for fp64.
template <typename T>
struct Accumulator {
  using type = float;
};
template <>
struct Accumulator<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Accumulator<T>::type;

}  // namespace moe_kernels::device
