// Warp-wide reductions over all 32 lanes, written once for every kernel. Butterfly shuffles:
// every lane ends with the result.
#pragma once

#include "device/runtime.h"

namespace moe_kernels::device {

constexpr unsigned kFullWarp = 0xffffffffu;
constexpr int kWarpSize = 32;

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(kFullWarp, value, offset);
  }
  return value;
}

// NaN is skipped (as std::max and torch.max's softmax shift treat it): a NaN never wins.
template <typename T>
__device__ __forceinline__ T warp_max(T value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const T other = __shfl_xor_sync(kFullWarp, value, offset);
    value = other > value ? other : value;
  }
  return value;
}

}  // namespace moe_kernels::device
