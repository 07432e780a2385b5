#include <cstdint>
#include <type_traits>

#include "device/launch.h"
#include "device/tensor_map.h"
#include "device/types.h"
#include "grouped_gemm/grouped_gemm_wgmma_launch.h"
#include "grouped_gemm/scheduled_launch.h"
#include "grouped_gemm/wgmma_kernels.cuh"

namespace moe_kernels::gemm::MOE_KERNELS_TARGET {
namespace {

// A tensor map of 64 x 64 boxes over `dims` (innermost first, rows `ld` elements apart, 3D maps
// one matrix per expert `expert_stride` elements apart).
template <typename T>
cudaError_t box_map(device::TensorMap* map, const void* data, uint64_t inner, uint64_t outer,
                    int64_t ld, int64_t experts, int64_t expert_stride) {
  const uint64_t dims[3] = {inner, outer, static_cast<uint64_t>(experts)};
  const uint64_t strides[2] = {static_cast<uint64_t>(ld) * sizeof(T),
                               static_cast<uint64_t>(expert_stride) * sizeof(T)};
  const uint32_t box[3] = {64, 64, 1};
  return device::encode_tensor_map(map, experts > 0 ? 3 : 2, data, dims, strides, box,
                                   std::is_same_v<T, device::bf16>);
}

template <typename T>
cudaError_t encode_maps(const GroupedGemmProblem& p, WgmmaMaps* maps) {
  if (p.grouping == Grouping::kRows) {
    const auto n = static_cast<uint64_t>(p.n), k = static_cast<uint64_t>(p.k);
    if (cudaError_t err =
            box_map<T>(&maps->lhs, p.lhs.data, k, static_cast<uint64_t>(p.m), p.lhs.ld, 0, 0);
        err != cudaSuccess) {
      return err;
    }
    return p.rhs.k_major ? box_map<T>(&maps->rhs, p.rhs.data, k, n, p.rhs.ld, p.num_experts,
                                      p.rhs.expert_stride)
                         : box_map<T>(&maps->rhs, p.rhs.data, n, k, p.rhs.ld, p.num_experts,
                                      p.rhs.expert_stride);
  }
  const auto rows = static_cast<uint64_t>(p.k);
  if (cudaError_t err =
          box_map<T>(&maps->lhs, p.lhs.data, static_cast<uint64_t>(p.m), rows, p.lhs.ld, 0, 0);
      err != cudaSuccess) {
    return err;
  }
  return box_map<T>(&maps->rhs, p.rhs.data, static_cast<uint64_t>(p.n), rows, p.rhs.ld, 0, 0);
}

}  // namespace

bool wgmma_supports(const GroupedGemmProblem& p) {
  // Coordinates are int32; the reduction must have a row for the maps' bounds to exist.
  constexpr int64_t kMaxCoordinate = int64_t{1} << 31;
  return p.k > 0 && p.m < kMaxCoordinate && p.n < kMaxCoordinate && p.k < kMaxCoordinate;
}

template <typename T, WgmmaMutation kMutation>
cudaError_t launch_wgmma_gemm(const GroupedGemmProblem& p, cudaStream_t stream) {
  WgmmaMaps maps;
  if (cudaError_t err = encode_maps<T>(p, &maps); err != cudaSuccess) return err;
  return with_layout(p, [&](auto grouping, auto, auto rhs_k_major, auto swiglu) {
    constexpr Grouping kGrouping = decltype(grouping)::value;
    constexpr bool kRhs = decltype(rhs_k_major)::value, kSwiglu = decltype(swiglu)::value;
    // One block per SM: the ring takes most of its shared memory. Under SwiGLU a tile of 128
    // product columns gives 64 output columns.
    return launch_scheduled<wgmma_gemm_kernel<T, kGrouping, kRhs, kSwiglu, kMutation>>(
        p, WgmmaTile::kM, kSwiglu ? WgmmaTile::kN / 2 : WgmmaTile::kN, WgmmaTile::kThreads,
        WgmmaTile::kSharedBytes, 1, stream, maps);
  });
}

template cudaError_t launch_wgmma_gemm<device::bf16, WgmmaMutation::kNone>(
    const GroupedGemmProblem&, cudaStream_t);
template cudaError_t launch_wgmma_gemm<device::fp16, WgmmaMutation::kNone>(
    const GroupedGemmProblem&, cudaStream_t);
#if defined(MOE_KERNELS_EMULATOR)
template cudaError_t launch_wgmma_gemm<device::bf16, WgmmaMutation::kWrongSwizzle>(
    const GroupedGemmProblem&, cudaStream_t);
template cudaError_t launch_wgmma_gemm<device::bf16, WgmmaMutation::kNoWait>(
    const GroupedGemmProblem&, cudaStream_t);
template cudaError_t launch_wgmma_gemm<device::bf16, WgmmaMutation::kWrongParity>(
    const GroupedGemmProblem&, cudaStream_t);
#endif

}  // namespace moe_kernels::gemm::MOE_KERNELS_TARGET
