#include <type_traits>

#include "device/launch.h"
#include "device/pack.h"
#include "device/tensor_core.h"
#include "grouped_gemm/grouped_gemm_launch.h"
#include "grouped_gemm/simt_kernels.cuh"
#include "grouped_gemm/swiglu_kernels.cuh"
#include "grouped_gemm/tensor_core_kernels.cuh"
#include "grouped_gemm/tile_schedule.cuh"

namespace moe_kernels::gemm::MOE_KERNELS_TARGET {
namespace {

// 128 x 128 output tiles, K slices of 64, 4 warps of 64 x 64, 3 stages: 96 KB of shared memory,
// two blocks per SM on Hopper (and one on Ampere's 164 KB).
using Tile = TensorCoreTile<128, 128, 64, 2, 2, 3>;
constexpr int kTensorCoreBlocksPerSM = 2;
constexpr int kSimtBlocksPerSM = 4;

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

bool aligned(const void* data, int64_t ld, int64_t element_bytes, int64_t alignment) {
  return reinterpret_cast<uintptr_t>(data) % alignment == 0 && ld * element_bytes % alignment == 0;
}

// Tiles of the problem at most, without reading tokens_per_expert: sum_e ceil(rows_e / tile_m)
// <= ceil(rows / tile_m) + E.
int64_t max_tiles(const GroupedGemmProblem& p, int tile_m, int64_t n_tiles) {
  if (p.grouping == Grouping::kRows) {
    return ((p.m + tile_m - 1) / tile_m + p.num_experts) * n_tiles;
  }
  return p.num_experts * ((p.m + tile_m - 1) / tile_m) * n_tiles;
}

// The schedule kernel, then the GEMM kernel `Kernel` (tile_m x tile_n output tiles) on a
// persistent grid.
template <auto Kernel>
cudaError_t launch_scheduled(const GroupedGemmProblem& p, int tile_m, int tile_n, int threads,
                             int shared_bytes, int blocks_per_sm, cudaStream_t stream) {
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
  return device::launch<Kernel>(config, stream, p, schedule);
}

}  // namespace

template <typename T>
GemmPath gemm_path(const GroupedGemmProblem& p) {
  if constexpr (!device::kIsTensorCoreType<T>) {
    return GemmPath::kSimt;
  } else {
    const bool rows_aligned = aligned(p.lhs.data, p.lhs.ld, sizeof(T), 16) &&
                              aligned(p.rhs.data, p.rhs.ld, sizeof(T), 16) &&
                              (p.grouping == Grouping::kReduction ||
                               p.rhs.expert_stride * static_cast<int64_t>(sizeof(T)) % 16 == 0) &&
                              (!p.swiglu || p.swiglu_half % 8 == 0);
    return rows_aligned ? GemmPath::kTensorCore : GemmPath::kSimt;
  }
}

GemmPath auto_gemm_path(int major, int minor) {
  if (major < 8) return GemmPath::kSimt;
  (void)minor;
  return GemmPath::kTensorCore;
}

template <typename T>
cudaError_t launch_grouped_gemm(const GroupedGemmProblem& problem, GemmKernel kernel,
                                cudaStream_t stream) {
  if (kernel == GemmKernel::kWgmma) return cudaErrorNotSupported;
  GroupedGemmProblem p = problem;
  const int64_t elements = static_cast<int64_t>(sizeof(T));
  p.paired_output = aligned(p.out.data, p.out.ld, elements, 2 * elements) &&
                    (p.grouping == Grouping::kRows || p.out.expert_stride % 2 == 0) &&
                    (!p.swiglu || (aligned(p.pre.data, p.pre.ld, elements, 2 * elements) &&
                                   p.swiglu_half % 2 == 0));
  if (p.num_experts == 0 || p.m == 0 || output_columns(p) == 0) return cudaSuccess;
  const GemmPath path = gemm_path<T>(p);
  return with_layout(p, [&](auto grouping, auto lhs_k_major, auto rhs_k_major, auto swiglu) {
    constexpr Grouping kGrouping = decltype(grouping)::value;
    constexpr bool kLhs = decltype(lhs_k_major)::value, kRhs = decltype(rhs_k_major)::value;
    constexpr bool kSwiglu = decltype(swiglu)::value;
    // Under SwiGLU a tile of N columns gives N / 2 output columns.
    if constexpr (device::kIsTensorCoreType<T>) {
      if (path == GemmPath::kTensorCore) {
        return launch_scheduled<tensor_core_gemm_kernel<T, Tile, kGrouping, kLhs, kRhs, kSwiglu>>(
            p, Tile::kM, kSwiglu ? Tile::kN / 2 : Tile::kN, Tile::kThreads, Tile::kSharedBytes,
            kTensorCoreBlocksPerSM, stream);
      }
    }
    return launch_scheduled<simt_gemm_kernel<T, kGrouping, kLhs, kRhs, kSwiglu>>(
        p, kSimtM, kSwiglu ? kSimtN / 2 : kSimtN, kSimtThreads, 0, kSimtBlocksPerSM, stream);
  });
}

template <typename T>
cudaError_t launch_swiglu_backward(const T* grad_out, const T* pre, int64_t rows, int64_t half,
                                   T* grad_pre, cudaStream_t stream) {
  if (rows == 0 || half == 0) return cudaSuccess;
  // Rows of pre and grad_pre are 2 * half long, and their up halves start `half` in.
  return device::with_pack_width<T>(half, {grad_out, pre, grad_pre}, [&](auto vec) {
    constexpr int kVec = decltype(vec)::value;
    device::LaunchConfig config{dim3(), dim3(kSwigluThreads)};
    if (cudaError_t err =
            device::grid_stride_blocks(rows * (half / kVec), kSwigluThreads, 8, &config.grid);
        err != cudaSuccess) {
      return err;
    }
    return device::launch<swiglu_backward_kernel<T, kVec>>(config, stream, grad_out, pre, rows,
                                                           half, grad_pre);
  });
}

#define MOE_KERNELS_INSTANTIATE_GROUPED_GEMM(T)                                            \
  template GemmPath gemm_path<T>(const GroupedGemmProblem&);                               \
  template cudaError_t launch_grouped_gemm<T>(const GroupedGemmProblem&, GemmKernel, cudaStream_t); \
  template cudaError_t launch_swiglu_backward<T>(const T*, const T*, int64_t, int64_t, T*, \
                                                 cudaStream_t);
MOE_KERNELS_INSTANTIATE_GROUPED_GEMM(float)
MOE_KERNELS_INSTANTIATE_GROUPED_GEMM(double)
MOE_KERNELS_INSTANTIATE_GROUPED_GEMM(device::bf16)
MOE_KERNELS_INSTANTIATE_GROUPED_GEMM(device::fp16)
#undef MOE_KERNELS_INSTANTIATE_GROUPED_GEMM

}  // namespace moe_kernels::gemm::MOE_KERNELS_TARGET
