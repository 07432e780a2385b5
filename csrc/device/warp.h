// Warp-level building blocks for kernels: the warp's size and full mask, lane masks, and the
// sum, max and scan of one value per lane over the full warp. Torch-free.
#pragma once

#include "device/runtime.h"

namespace moe_kernels::device {

// warpSize is not a constant expression under nvcc; kernels size their shared arrays with this.
constexpr int kWarpSize = 32;
constexpr unsigned kFullWarp = 0xffffffffu;

__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x) % kWarpSize; }
__device__ __forceinline__ int warp_id() { return static_cast<int>(threadIdx.x) / kWarpSize; }

// The lanes below the caller's.
__device__ __forceinline__ unsigned lanes_below() { return (1u << lane_id()) - 1u; }

// The sum over the warp, in every lane. A fixed butterfly: the same order on every run.
template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    value += __shfl_xor_sync(kFullWarp, value, offset);
  return value;
}

// The maximum over the warp, in every lane. A NaN is skipped (as std::max and the CPU kernels'
// softmax shift treat it): it never wins.
template <typename T>
__device__ __forceinline__ T warp_max(T value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const T other = __shfl_xor_sync(kFullWarp, value, offset);
    value = other > value ? other : value;
  }
  return value;
}

// The sum of the values of lanes 0..lane.
template <typename T>
__device__ __forceinline__ T warp_inclusive_sum(T value) {
  const int lane = lane_id();
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const T below = __shfl_up_sync(kFullWarp, value, offset);
    if (lane >= offset) value += below;
  }
  return value;
}

}  // namespace moe_kernels::device
