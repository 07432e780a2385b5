// The row of every (token, slot) pair in permute's stable expert-major order, computed on the
// device with no host synchronisation. Torch-free: compiled by nvcc, and by the CPU emulator.
//
// The pairs are cut into chunks of consecutive pairs, one block each, and every chunk into one
// run of consecutive pairs per warp. Three kernels:
//   count: each chunk's pairs per expert;
//   scan (one block): each expert's total and padded segment, and the row where each chunk's
//     pairs of each expert start: after the segments of the experts before, and after the same
//     expert's pairs in earlier chunks;
//   rank: each warp's run starts after the earlier warps' pairs of its chunk; within a round of
//     32 pairs, the lanes holding one expert take consecutive rows in lane order.
// Pair order is then kept at every level (chunk, warp, round, lane): the order is stable, and
// the same whatever the schedule.
#pragma once

#include <cstdint>

#include "device/block_scan.h"
#include "device/runtime.h"
#include "device/warp.h"

namespace moe_kernels::permute::MOE_KERNELS_TARGET {

constexpr int kRowMapWarps = 8;
constexpr int kRowMapThreads = kRowMapWarps * device::kWarpSize;

// The pairs [begin, end) of the calling warp's run: the warp's share of its block's chunk.
struct WarpRun {
  int64_t begin;
  int64_t end;
};

__device__ __forceinline__ WarpRun warp_run(int64_t num_pairs, int64_t pairs_per_chunk) {
  const int64_t per_warp = pairs_per_chunk / kRowMapWarps;
  const int64_t begin =
      static_cast<int64_t>(blockIdx.x) * pairs_per_chunk + device::warp_id() * per_warp;
  return {begin < num_pairs ? begin : num_pairs,
          begin + per_warp < num_pairs ? begin + per_warp : num_pairs};
}

// The expert of pair i, or -1 past the run's end or for an id outside [0, num_experts): such a
// pair gets no row (checking the ids would need a host synchronisation).
template <typename index_t>
__device__ __forceinline__ int expert_of(const index_t* __restrict__ topk_ids, int64_t i,
                                         int64_t end, int num_experts) {
  if (i >= end) return -1;
  const int64_t expert = topk_ids[i];
  return expert >= 0 && expert < num_experts ? static_cast<int>(expert) : -1;
}

// counts[e] = the pairs of expert e in the calling warp's run; counts is the warp's own row of
// shared memory. Per round, the first lane of each group of equal experts adds the group's size.
template <typename index_t>
__device__ void count_run(const index_t* __restrict__ topk_ids, WarpRun run, int num_experts,
                          int* counts) {
  const int lane = device::lane_id();
  for (int e = lane; e < num_experts; e += device::kWarpSize) counts[e] = 0;
  __syncwarp();
  for (int64_t base = run.begin; base < run.end; base += device::kWarpSize) {
    const int expert = expert_of(topk_ids, base + lane, run.end, num_experts);
    const unsigned peers = __match_any_sync(device::kFullWarp, expert);
    if (expert >= 0 && lane == __ffs(peers) - 1) counts[expert] += __popc(peers);
    __syncwarp();  // the next round's first lane of this expert may be another lane
  }
}

// chunk_counts[c][e] = pairs of expert e in chunk c. Dynamic shared memory:
// kRowMapWarps * num_experts ints.
template <typename index_t>
__global__ void __launch_bounds__(kRowMapThreads)
    count_chunks_kernel(const index_t* __restrict__ topk_ids, int64_t num_pairs,
                        int64_t pairs_per_chunk, int num_experts,
                        int64_t* __restrict__ chunk_counts) {
  MOE_KERNELS_DYNAMIC_SHARED(int, warp_counts);  // [kRowMapWarps][num_experts]
  count_run(topk_ids, warp_run(num_pairs, pairs_per_chunk), num_experts,
            warp_counts + device::warp_id() * num_experts);
  __syncthreads();
  int64_t* counts = chunk_counts + static_cast<int64_t>(blockIdx.x) * num_experts;
  for (int e = threadIdx.x; e < num_experts; e += kRowMapThreads) {
    int64_t total = 0;
    for (int w = 0; w < kRowMapWarps; ++w) total += warp_counts[w * num_experts + e];
    counts[e] = total;
  }
}

// One block. chunk_rows [num_chunks][num_experts] holds count_chunks_kernel's counts and
// becomes the row where each chunk's pairs of each expert start. Experts go in tiles of one per
// thread; a block-wide scan of their padded sizes gives each segment's start.
__global__ void __launch_bounds__(kRowMapThreads)
    scan_chunks_kernel(int64_t* __restrict__ chunk_rows, int64_t num_chunks, int num_experts,
                       int64_t align, int64_t* __restrict__ tokens_per_expert,
                       int64_t* __restrict__ num_rows) {
  // Two tiles' warp totals: a tile writes its own while slower threads may still read the
  // previous tile's, so one barrier per tile suffices.
  MOE_KERNELS_SHARED(int64_t, warp_totals, [2][kRowMapWarps]);
  int64_t tile_start = 0;  // the first row of the tile's first expert
  for (int tile = 0; tile < num_experts; tile += kRowMapThreads) {
    const int e = tile + static_cast<int>(threadIdx.x);
    int64_t count = 0;
    if (e < num_experts) {
      for (int64_t c = 0; c < num_chunks; ++c) count += chunk_rows[c * num_experts + e];
    }
    const int64_t padded = (count + align - 1) / align * align;
    int64_t tile_rows = 0;
    int64_t row = tile_start + device::block_exclusive_sum<kRowMapThreads>(
                                   padded, warp_totals[tile / kRowMapThreads % 2], &tile_rows);
    tile_start += tile_rows;
    if (e < num_experts) {
      tokens_per_expert[e] = count;
      for (int64_t c = 0; c < num_chunks; ++c) {
        const int64_t chunk_count = chunk_rows[c * num_experts + e];
        chunk_rows[c * num_experts + e] = row;
        row += chunk_count;
      }
    }
  }
  if (threadIdx.x == 0) *num_rows = tile_start;
}

// row_map[i] = the row of pair i (-1 for an id out of range), and source_pair[row] = i.
// Dynamic shared memory: kRowMapWarps * num_experts ints.
template <typename index_t>
__global__ void __launch_bounds__(kRowMapThreads)
    rank_pairs_kernel(const index_t* __restrict__ topk_ids, int64_t num_pairs,
                      int64_t pairs_per_chunk, int num_experts,
                      const int64_t* __restrict__ chunk_rows, int64_t* __restrict__ row_map,
                      int64_t* __restrict__ source_pair) {
  // Per warp and expert: first the run's count, then the pairs of the chunk before the run,
  // then, as the rounds go, before the round.
  MOE_KERNELS_DYNAMIC_SHARED(int, before);  // [kRowMapWarps][num_experts]
  const int warp = device::warp_id(), lane = device::lane_id();
  const WarpRun run = warp_run(num_pairs, pairs_per_chunk);
  count_run(topk_ids, run, num_experts, before + warp * num_experts);
  __syncthreads();
  for (int e = threadIdx.x; e < num_experts; e += kRowMapThreads) {
    int sum = 0;
    for (int w = 0; w < kRowMapWarps; ++w) {
      const int count = before[w * num_experts + e];
      before[w * num_experts + e] = sum;
      sum += count;
    }
  }
  __syncthreads();
  const int64_t* chunk_start = chunk_rows + static_cast<int64_t>(blockIdx.x) * num_experts;
  int* warp_before = before + warp * num_experts;
  for (int64_t base = run.begin; base < run.end; base += device::kWarpSize) {
    const int64_t i = base + lane;
    const int expert = expert_of(topk_ids, i, run.end, num_experts);
    const int round_before = expert >= 0 ? warp_before[expert] : 0;
    const unsigned peers = __match_any_sync(device::kFullWarp, expert);
    __syncwarp();  // every lane has read warp_before before the update below
    const int within = __popc(peers & device::lanes_below());  // among the round's equal experts
    const int rank = round_before + within;
    // The group's last lane: the next round's pairs of this expert come after its pair.
    if (expert >= 0 && within == __popc(peers) - 1) warp_before[expert] = rank + 1;
    if (expert >= 0) {
      const int64_t row = chunk_start[expert] + rank;
      row_map[i] = row;
      source_pair[row] = i;
    } else if (i < run.end) {
      row_map[i] = -1;
    }
    __syncwarp();  // the update is seen by the next round
  }
}

// source_pair[row_map[i]] = i for the rows in [0, num_rows); others are skipped (checking
// them, or that no row repeats, would need a host synchronisation).
__global__ void invert_row_map_kernel(const int64_t* __restrict__ row_map, int64_t num_pairs,
                                      int64_t num_rows, int64_t* __restrict__ source_pair) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < num_pairs;
       i += stride) {
    const int64_t row = row_map[i];
    if (row >= 0 && row < num_rows) source_pair[row] = i;
  }
}

}  // namespace moe_kernels::permute::MOE_KERNELS_TARGET
