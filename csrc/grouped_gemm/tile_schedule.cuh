// The device-side tile schedule of a grouped GEMM: which expert, and which tile of its output,
// each unit of work is, found on the device from tokens_per_expert with no host
// synchronisation. A one-block kernel turns the counts into segment offsets (and, when the
// segments give the rows, tile offsets); the GEMM kernels then run a persistent loop over tile
// indices and find each tile's expert by binary search. Torch-free.
#pragma once

#include <cstdint>

#include "device/block_scan.h"
#include "device/runtime.h"
#include "grouped_gemm/grouped_gemm_problem.h"

namespace moe_kernels::gemm::MOE_KERNELS_TARGET {

constexpr int kScheduleThreads = 256;

// segment_offsets [E + 1]: where each expert's rows start. Counts are clamped, negatives to zero
// and the running total to total_rows, so a wrong count can never make a kernel read outside the
// rows (the CUDA op does not check counts: that would synchronise). tile_offsets [E + 1] (only
// with rows_per_tile > 0): the first tile of each expert, ceil(rows / rows_per_tile) * n_tiles
// tiles each.
template <typename Index>
__global__ void __launch_bounds__(kScheduleThreads)
    tile_schedule_kernel(const Index* __restrict__ tokens_per_expert, int64_t num_experts,
                         int64_t total_rows, int64_t rows_per_tile, int64_t n_tiles,
                         int64_t* __restrict__ segment_offsets,
                         int64_t* __restrict__ tile_offsets) {
  MOE_KERNELS_SHARED(int64_t, warp_totals, [2][kScheduleThreads / device::kWarpSize]);
  int64_t rows_before = 0, tiles_before = 0, total = 0;
  int scans = 0;
  if (threadIdx.x == 0) {
    segment_offsets[0] = 0;
    if (rows_per_tile > 0) tile_offsets[0] = 0;
  }
  for (int64_t base = 0; base < num_experts; base += kScheduleThreads) {
    const int64_t e = base + threadIdx.x;
    const int64_t count = e < num_experts ? static_cast<int64_t>(tokens_per_expert[e]) : 0;
    const int64_t rows = count > 0 ? count : 0;
    const int64_t start = rows_before + device::block_exclusive_sum<kScheduleThreads>(
                                            rows, warp_totals[scans++ % 2], &total);
    rows_before += total;
    const int64_t end = start + rows < total_rows ? start + rows : total_rows;
    if (e < num_experts) segment_offsets[e + 1] = end;
    if (rows_per_tile > 0) {
      const int64_t kept = end > start ? end - start : 0;
      const int64_t tiles = (kept + rows_per_tile - 1) / rows_per_tile * n_tiles;
      const int64_t first = tiles_before + device::block_exclusive_sum<kScheduleThreads>(
                                               tiles, warp_totals[scans++ % 2], &total);
      tiles_before += total;
      if (e < num_experts) tile_offsets[e + 1] = first + tiles;
    }
  }
}

// One tile of one expert's output: D_e[m0 : m0 + tile, n0 : n0 + tile].
struct TileWork {
  int64_t expert;
  int64_t segment_start;  // the expert's first row
  int64_t segment_rows;
  int64_t m0, n0;
};

// The tiles of a problem, in the order the persistent loop takes them: expert by expert, and
// within an expert the M tiles of one N column first (consecutive blocks share the weight
// tiles, from L2).
struct TileSchedule {
  Grouping grouping;
  const int64_t* segment_offsets;
  const int64_t* tile_offsets;  // kRows only
  int64_t num_experts;
  int64_t m_tiles;  // kReduction only: every expert has m_tiles * n_tiles tiles
  int64_t n_tiles;
  int tile_m, tile_n;

  __device__ __forceinline__ int64_t num_tiles() const {
    return grouping == Grouping::kRows ? tile_offsets[num_experts]
                                       : num_experts * m_tiles * n_tiles;
  }

  __device__ __forceinline__ TileWork at(int64_t tile) const {
    int64_t expert, local;
    if (grouping == Grouping::kRows) {
      // The last expert whose first tile is <= tile: experts without tiles share their
      // successor's offset and are skipped.
      int64_t lo = 0, hi = num_experts;  // tile_offsets[lo] <= tile < tile_offsets[hi]
      while (hi - lo > 1) {
        const int64_t mid = (lo + hi) / 2;
        if (tile_offsets[mid] <= tile) {
          lo = mid;
        } else {
          hi = mid;
        }
      }
      expert = lo;
      local = tile - tile_offsets[lo];
    } else {
      expert = tile / (m_tiles * n_tiles);
      local = tile % (m_tiles * n_tiles);
    }
    const int64_t start = segment_offsets[expert];
    const int64_t rows = segment_offsets[expert + 1] - start;
    const int64_t m_count = grouping == Grouping::kRows ? (rows + tile_m - 1) / tile_m : m_tiles;
    return TileWork{expert, start, rows, local % m_count * tile_m, local / m_count * tile_n};
  }
};

}  // namespace moe_kernels::gemm::MOE_KERNELS_TARGET
