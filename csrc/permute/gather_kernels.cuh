// The data movement of the permute family, one warp per output row: gathering rows into expert
// order (permute, permute_with_map), and gathering them back per token (unpermute, and the
// gradient of its weights). No atomics: every output is written by one warp, in a fixed order.
// Rows are read and written in packs of kVec elements (16 bytes when the launcher found the rows
// aligned); offsets are 64-bit. Torch-free: compiled by nvcc, and by the CPU emulator.
#pragma once

#include <cstdint>

#include "device/pack.h"
#include "device/runtime.h"
#include "device/types.h"
#include "device/warp.h"

namespace moe_kernels::permute::MOE_KERNELS_TARGET {

constexpr int kGatherWarps = 8;
constexpr int kGatherThreads = kGatherWarps * device::kWarpSize;

// The calling warp's first item and the stride of a grid-stride loop over items, one per warp.
__device__ __forceinline__ int64_t first_warp_item() {
  return static_cast<int64_t>(blockIdx.x) * kGatherWarps + device::warp_id();
}
__device__ __forceinline__ int64_t warp_item_stride() {
  return static_cast<int64_t>(gridDim.x) * kGatherWarps;
}

// rows[r] = weights[p] * hidden[p / topk] for p = source_pair[r] (a plain copy without
// weights), or zero where p is -1. pair_weights, if any, are in the accumulator type, and the
// product is rounded once, as the CPU op does.
template <typename T, int kVec>
__global__ void gather_rows_kernel(const T* __restrict__ hidden, int64_t hidden_size, int64_t topk,
                                   const int64_t* __restrict__ source_pair, int64_t num_rows,
                                   const device::acc_t<T>* __restrict__ pair_weights,
                                   T* __restrict__ rows) {
  using Pack = device::Pack<T, kVec>;
  using acc = device::acc_t<T>;
  const int64_t packs = hidden_size / kVec;
  for (int64_t r = first_warp_item(); r < num_rows; r += warp_item_stride()) {
    const int64_t pair = source_pair[r];
    Pack* dst = reinterpret_cast<Pack*>(rows + r * hidden_size);
    if (pair < 0) {
      Pack zero;
      for (int i = 0; i < kVec; ++i) zero.v[i] = static_cast<T>(acc(0));
      for (int64_t p = device::lane_id(); p < packs; p += device::kWarpSize) dst[p] = zero;
      continue;
    }
    const Pack* src = reinterpret_cast<const Pack*>(hidden + (pair / topk) * hidden_size);
    const acc weight = pair_weights != nullptr ? pair_weights[pair] : acc(1);
    for (int64_t p = device::lane_id(); p < packs; p += device::kWarpSize) {
      Pack x = src[p];
      if (pair_weights != nullptr) {
        for (int i = 0; i < kVec; ++i) x.v[i] = static_cast<T>(weight * static_cast<acc>(x.v[i]));
      }
      dst[p] = x;
    }
  }
}

// out[t] = sum_j weights[t, j] * rows[row_map[t, j]] (a plain sum without weights), summed in
// slot order in the accumulator type. Rows outside [0, num_rows) are skipped (checking them
// would need a host synchronisation).
template <typename T, int kVec>
__global__ void unpermute_kernel(const T* __restrict__ rows, int64_t num_rows, int64_t hidden_size,
                                 const int64_t* __restrict__ row_map, int64_t num_tokens,
                                 int64_t topk, const device::acc_t<T>* __restrict__ pair_weights,
                                 T* __restrict__ out) {
  using Pack = device::Pack<T, kVec>;
  using acc = device::acc_t<T>;
  const int64_t packs = hidden_size / kVec;
  for (int64_t t = first_warp_item(); t < num_tokens; t += warp_item_stride()) {
    const int64_t* token_rows = row_map + t * topk;
    for (int64_t p = device::lane_id(); p < packs; p += device::kWarpSize) {
      acc sum[kVec];
      for (int i = 0; i < kVec; ++i) sum[i] = acc(0);
      for (int64_t j = 0; j < topk; ++j) {
        const int64_t row = token_rows[j];
        if (row < 0 || row >= num_rows) continue;
        const acc weight = pair_weights != nullptr ? pair_weights[t * topk + j] : acc(1);
        const Pack y = reinterpret_cast<const Pack*>(rows + row * hidden_size)[p];
        for (int i = 0; i < kVec; ++i) sum[i] += weight * static_cast<acc>(y.v[i]);
      }
      Pack o;
      for (int i = 0; i < kVec; ++i) o.v[i] = static_cast<T>(sum[i]);
      reinterpret_cast<Pack*>(out + t * hidden_size)[p] = o;
    }
  }
}

// grad_weights[i] = <grad_output[i / topk], rows[row_map[i]]> for every pair i, in the
// accumulator type: each lane sums its packs, then a fixed butterfly sums the lanes. A row
// outside [0, num_rows) gives 0 (checking it would need a host synchronisation).
template <typename T, int kVec>
__global__ void unpermute_weights_grad_kernel(const T* __restrict__ grad_output,
                                              const T* __restrict__ rows, int64_t num_rows,
                                              int64_t hidden_size,
                                              const int64_t* __restrict__ row_map,
                                              int64_t num_pairs, int64_t topk,
                                              device::acc_t<T>* __restrict__ grad_weights) {
  using Pack = device::Pack<T, kVec>;
  using acc = device::acc_t<T>;
  const int64_t packs = hidden_size / kVec;
  for (int64_t i = first_warp_item(); i < num_pairs; i += warp_item_stride()) {
    const int64_t row = row_map[i];
    acc dot = 0;
    if (row >= 0 && row < num_rows) {
      const Pack* g = reinterpret_cast<const Pack*>(grad_output + (i / topk) * hidden_size);
      const Pack* y = reinterpret_cast<const Pack*>(rows + row * hidden_size);
      for (int64_t p = device::lane_id(); p < packs; p += device::kWarpSize) {
        const Pack gp = g[p], yp = y[p];
        for (int e = 0; e < kVec; ++e) dot += static_cast<acc>(gp.v[e]) * static_cast<acc>(yp.v[e]);
      }
    }
    dot = device::warp_sum(dot);
    if (device::lane_id() == 0) grad_weights[i] = dot;
  }
}

}  // namespace moe_kernels::permute::MOE_KERNELS_TARGET
