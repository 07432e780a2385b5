// drop_over_capacity on the device: one block per expert walks the expert's pairs, which
// permute's row map has already laid out in pair order (source_pair[segment]). An expert within
// its capacity keeps every pair. One over it keeps, by weight, the pairs whose key
// (drop_order.h) is below the capacity-th smallest, found by a radix select over the key's bytes
// (most significant first, a 256-bin shared histogram per byte), and the first of the pairs
// equal to it; by position, the first `capacity` pairs. A last pass in pair order, two block
// scans per tile, numbers the kept pairs (their slots) and counts the ties. Torch-free: compiled
// by nvcc, and by the CPU emulator. No host synchronisation.
#pragma once

#include <cstdint>

#include "capacity/drop_order.h"
#include "device/block_scan.h"
#include "device/runtime.h"

namespace moe_kernels::capacity::MOE_KERNELS_TARGET {

constexpr int kDropThreads = 256;
constexpr int kRadixBins = 256;

// A key, and a rank among the keys equal to it (1-based): what the select hands from thread 0
// to the block, and what an expert over capacity keeps (the keys below `key`, and the first
// `rank` equal to it).
struct KeyRank {
  uint64_t key;
  int64_t rank;
};

// The rank-th smallest (1-based, 1 <= rank <= n) of keys [n], and how many of the keys equal to
// it are kept: rank minus the keys below it. Returned to every thread of the block.
template <int kKeyBits>
__device__ KeyRank select_key(const uint64_t* __restrict__ keys, int64_t n, int64_t rank,
                              unsigned int* histogram, KeyRank* shared) {
  uint64_t prefix = 0, mask = 0;
  for (int shift = kKeyBits - 8; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < kRadixBins; b += kDropThreads) histogram[b] = 0;
    __syncthreads();
    for (int64_t s = threadIdx.x; s < n; s += kDropThreads) {
      const uint64_t key = keys[s];
      if ((key & mask) == prefix) atomicAdd(&histogram[(key >> shift) & 0xFF], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int64_t below = 0;
      int digit = 0;
      while (below + histogram[digit] < rank) below += histogram[digit++];
      *shared = {prefix | (static_cast<uint64_t>(digit) << shift), rank - below};
    }
    __syncthreads();
    prefix = shared->key;
    rank = shared->rank;
    mask |= uint64_t{0xFF} << shift;
  }
  return {prefix, rank};
}

// weights: [pairs] in pair order, or null for the position policy. source_pair: the pairs in
// expert order; segment_start [E] and tokens_per_expert [E] place each expert's segment in it.
// keys: scratch of one entry per row (unused without weights). kept_ids and slots [pairs] must
// hold -1: pairs outside every segment (ids out of range) keep it.
template <typename weight_t>
__global__ void __launch_bounds__(kDropThreads)
    drop_over_capacity_kernel(const weight_t* __restrict__ weights,
                              const int64_t* __restrict__ source_pair,
                              const int64_t* __restrict__ segment_start,
                              const int64_t* __restrict__ tokens_per_expert, int64_t capacity,
                              uint64_t* __restrict__ keys, int64_t* __restrict__ kept_ids,
                              int64_t* __restrict__ slots, int64_t* __restrict__ dropped) {
  MOE_KERNELS_SHARED(unsigned int, histogram, [kRadixBins]);
  MOE_KERNELS_SHARED(KeyRank, select_shared, [1]);
  MOE_KERNELS_SHARED(int, warp_totals, [2][kDropThreads / device::kWarpSize]);
  const int expert = blockIdx.x;
  const int64_t n = tokens_per_expert[expert];
  const int64_t* pairs = source_pair + segment_start[expert];
  if (threadIdx.x == 0) dropped[expert] = n > capacity ? n - capacity : 0;
  // Unselected (within capacity, or by position), every key is 0 and the first min(n, C) stay.
  const bool by_weight = weights != nullptr && n > capacity;
  KeyRank kept = {0, n < capacity ? n : capacity};
  if (by_weight) {
    keys += segment_start[expert];
    for (int64_t s = threadIdx.x; s < n; s += kDropThreads) keys[s] = drop_key(weights[pairs[s]]);
    __syncthreads();
    kept = select_key<8 * sizeof(typename KeyBits<weight_t>::type)>(keys, n, capacity, histogram,
                                                                    select_shared);
  }
  int64_t ties_before = 0, kept_before = 0;
  for (int64_t base = 0; base < n; base += kDropThreads) {
    const int64_t s = base + threadIdx.x;
    const bool in_segment = s < n;
    const uint64_t key = by_weight && in_segment ? keys[s] : 0;
    const bool tie = in_segment && key == kept.key;
    int tile_ties = 0, tile_kept = 0;
    const int64_t tie_rank = ties_before + device::block_exclusive_sum<kDropThreads>(
                                               int{tie}, warp_totals[0], &tile_ties);
    const bool keep = in_segment && (key < kept.key || (tie && tie_rank < kept.rank));
    const int64_t slot = kept_before + device::block_exclusive_sum<kDropThreads>(
                                           int{keep}, warp_totals[1], &tile_kept);
    if (in_segment) {
      const int64_t pair = pairs[s];
      kept_ids[pair] = keep ? expert : -1;
      slots[pair] = keep ? slot : -1;
    }
    ties_before += tile_ties;
    kept_before += tile_kept;
  }
}

}  // namespace moe_kernels::capacity::MOE_KERNELS_TARGET
