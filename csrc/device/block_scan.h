// Block-wide prefix sums, one value per thread. Torch-free.
#pragma once

#include "device/runtime.h"
#include "device/warp.h"

namespace moe_kernels::device {

// The sum of the values of the threads below the caller in a block of kThreads threads, and the
// block's total in *total. `warp_totals` is shared storage of kThreads / 32 entries. One barrier
// inside: slower threads may still read `warp_totals` after a caller returns, so a loop that
// scans again alternates between two such arrays.
template <int kThreads, typename T>
__device__ __forceinline__ T block_exclusive_sum(T value, T* warp_totals, T* total) {
  static_assert(kThreads % kWarpSize == 0, "whole warps");
  const int warp = warp_id();
  const T inclusive = warp_inclusive_sum(value);
  if (lane_id() == kWarpSize - 1) warp_totals[warp] = inclusive;
  __syncthreads();
  T below = inclusive - value;
  T sum = 0;
  for (int w = 0; w < kThreads / kWarpSize; ++w) {
    if (w < warp) below += warp_totals[w];
    sum += warp_totals[w];
  }
  *total = sum;
  return below;
}

}  // namespace moe_kernels::device
