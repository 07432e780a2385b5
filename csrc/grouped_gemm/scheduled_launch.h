// How every grouped GEMM kernel is launched: the tile schedule kernel (tile_schedule.cuh) from
// tokens_per_expert into the problem's workspace, then the GEMM kernel on a persistent grid over
// the schedule's tiles, with no host synchronisation. Torch-free.
#pragma once

#include <cstdint>
#include <type_traits>

#include "device/launch.h"
#include "grouped_gemm/grouped_gemm_problem.h"
#include "grouped_gemm/tile_schedule.cuh"

namespace moe_kernels::gemm::MOE_KERNELS_TARGET {

template <Grouping kGrouping>
using GroupingConstant = std::integral_constant<Grouping, kGrouping>;
template <bool kValue>
using Bool = std::bool_constant<kValue>;

// Calls f(grouping, lhs_k_major, rhs_k_major, swiglu) with the problem's layout as constants:
// the five layouts the ops produce, one kernel instance each.
template <typename F>
cudaError_t with_layout(const GroupedGemmProblem& p, F&& f) {
  if (p.grouping == Grouping::kReduction) {
    if (p.lhs.k_major || p.rhs.k_major || p.swiglu) return cudaErrorInvalidValue;
    return f(GroupingConstant<Grouping::kReduction>{}, Bool<false>{}, Bool<false>{}, Bool<false>{});
  }
  if (!p.lhs.k_major) return cudaErrorInvalidValue;
  const GroupingConstant<Grouping::kRows> rows;
  if (p.rhs.k_major) {
    return p.swiglu ? f(rows, Bool<true>{}, Bool<true>{}, Bool<true>{})
                    : f(rows, Bool<true>{}, Bool<true>{}, Bool<false>{});
  }
  return p.swiglu ? f(rows, Bool<true>{}, Bool<false>{}, Bool<true>{})
                  : f(rows, Bool<true>{}, Bool<false>{}, Bool<false>{});
}

// Tiles of the problem at most, without reading tokens_per_expert: sum_e ceil(rows_e / tile_m)
// <= ceil(rows / tile_m) + E.
inline int64_t max_tiles(const GroupedGemmProblem& p, int tile_m, int64_t n_tiles) {
  if (p.grouping == Grouping::kRows) {
    return ((p.m + tile_m - 1) / tile_m + p.num_experts) * n_tiles;
  }
  return p.num_experts * ((p.m + tile_m - 1) / tile_m) * n_tiles;
}

// The schedule kernel, then the GEMM kernel `Kernel(p, schedule, extra...)` (tile_m x tile_n output
// tiles) on a persistent grid.
template <auto Kernel, typename... Extra>
cudaError_t launch_scheduled(const GroupedGemmProblem& p, int tile_m, int tile_n, int threads,
                             int shared_bytes, int blocks_per_sm, cudaStream_t stream,
                             const Extra&... extra) {
  int64_t* segment_offsets = p.workspace;
  int64_t* tile_offsets = p.workspace + p.num_experts + 1;
  const int64_t n_tiles = (output_columns(p) + tile_n - 1) / tile_n;
  const bool by_rows = p.grouping == Grouping::kRows;
  const device::LaunchConfig schedule_config{dim3(1), dim3(kScheduleThreads)};
  const auto schedule_with = [&](auto* tokens_per_expert) {
    using Index = std::remove_const_t<std::remove_pointer_t<decltype(tokens_per_expert)>>;
    return device::launch<tile_schedule_kernel<Index>>(
        schedule_config, stream, tokens_per_expert, p.num_experts, by_rows ? p.m : p.k,
        by_rows ? int64_t{tile_m} : int64_t{0}, n_tiles, segment_offsets, tile_offsets);
  };
  cudaError_t err = p.tokens_int32
                        ? schedule_with(static_cast<const int32_t*>(p.tokens_per_expert))
                        : schedule_with(static_cast<const int64_t*>(p.tokens_per_expert));
  if (err != cudaSuccess) return err;

  const TileSchedule schedule{
      p.grouping, segment_offsets, tile_offsets, p.num_experts, (p.m + tile_m - 1) / tile_m,
      n_tiles,    tile_m,          tile_n};
  device::LaunchConfig config{dim3(), dim3(threads), static_cast<size_t>(shared_bytes)};
  err = device::grid_stride_blocks(max_tiles(p, tile_m, n_tiles), 1, blocks_per_sm, &config.grid);
  if (err != cudaSuccess) return err;
  if (shared_bytes > 48 * 1024) {
    if ((err = device::allow_dynamic_shared<Kernel>(shared_bytes)) != cudaSuccess) return err;
  }
  return device::launch<Kernel>(config, stream, p, schedule, extra...);
}

}  // namespace moe_kernels::gemm::MOE_KERNELS_TARGET
