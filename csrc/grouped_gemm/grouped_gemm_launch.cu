#include <type_traits>

#include "device/launch.h"
#include "device/pack.h"
#include "device/tensor_core.h"
#include "grouped_gemm/grouped_gemm_launch.h"
#include "grouped_gemm/grouped_gemm_wgmma_launch.h"
#include "grouped_gemm/scheduled_launch.h"
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

bool aligned(const void* data, int64_t ld, int64_t element_bytes, int64_t alignment) {
  return reinterpret_cast<uintptr_t>(data) % alignment == 0 && ld * element_bytes % alignment == 0;
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
  if (major == 9 && minor == 0 && kHasWgmmaKernel) return GemmPath::kWgmma;
  return major >= 8 ? GemmPath::kTensorCore : GemmPath::kSimt;
}

namespace {

// The kernel a request runs on this device for this problem, or cudaErrorNotSupported for a
// named kernel that cannot run it.
template <typename T>
cudaError_t resolve_path(const GroupedGemmProblem& p, GemmKernel kernel, GemmPath* path) {
  const GemmPath fits = gemm_path<T>(p);
  if (fits == GemmPath::kSimt) {
    *path = GemmPath::kSimt;
    return kernel == GemmKernel::kAuto ? cudaSuccess : cudaErrorNotSupported;
  }
  int device = 0, major = 0, minor = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (err != cudaSuccess) return err;
  const bool wgmma = auto_gemm_path(major, minor) == GemmPath::kWgmma && wgmma_supports(p);
  switch (kernel) {
    case GemmKernel::kWgmma:
      *path = GemmPath::kWgmma;
      return wgmma ? cudaSuccess : cudaErrorNotSupported;
    case GemmKernel::kMma:
      *path = GemmPath::kTensorCore;
      return major >= 8 ? cudaSuccess : cudaErrorNotSupported;
    default:
      *path = wgmma                                             ? GemmPath::kWgmma
              : auto_gemm_path(major, minor) == GemmPath::kSimt ? GemmPath::kSimt
                                                                : GemmPath::kTensorCore;
      return cudaSuccess;
  }
}

}  // namespace

template <typename T>
cudaError_t launch_grouped_gemm(const GroupedGemmProblem& problem, GemmKernel kernel,
                                cudaStream_t stream) {
  GroupedGemmProblem p = problem;
  const int64_t elements = static_cast<int64_t>(sizeof(T));
  p.paired_output = aligned(p.out.data, p.out.ld, elements, 2 * elements) &&
                    (p.grouping == Grouping::kRows || p.out.expert_stride % 2 == 0) &&
                    (!p.swiglu || (aligned(p.pre.data, p.pre.ld, elements, 2 * elements) &&
                                   p.swiglu_half % 2 == 0));
  if (p.num_experts == 0 || p.m == 0 || output_columns(p) == 0) return cudaSuccess;
  GemmPath path = GemmPath::kSimt;
  if (cudaError_t err = resolve_path<T>(p, kernel, &path); err != cudaSuccess) return err;
  if constexpr (device::kIsTensorCoreType<T> && kHasWgmmaKernel) {
    if (path == GemmPath::kWgmma) return launch_wgmma_gemm<T, WgmmaMutation{}>(p, stream);
  }
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

namespace {

// Calls launch(config, kVec) for an elementwise SwiGLU kernel over rows of `half` pairs, in packs
// of the widest width the pointers allow (rows of 2 * half elements, up halves `half` in).
template <typename T, typename Launch>
cudaError_t launch_swiglu_elementwise(int64_t rows, int64_t half,
                                      std::initializer_list<const void*> pointers,
                                      const Launch& launch) {
  if (rows == 0 || half == 0) return cudaSuccess;
  return device::with_pack_width<T>(half, pointers, [&](auto vec) {
    constexpr int kVec = decltype(vec)::value;
    device::LaunchConfig config{dim3(), dim3(kSwigluThreads)};
    if (cudaError_t err =
            device::grid_stride_blocks(rows * (half / kVec), kSwigluThreads, 8, &config.grid);
        err != cudaSuccess) {
      return err;
    }
    return launch(config, vec);
  });
}

}  // namespace

template <typename T>
cudaError_t launch_swiglu(const T* pre, int64_t rows, int64_t half, GluParams glu, T* out,
                          cudaStream_t stream) {
  return launch_swiglu_elementwise<T>(rows, half, {pre, out}, [&](const auto& config, auto vec) {
    return device::launch<swiglu_kernel<T, decltype(vec)::value>>(config, stream, pre, rows, half,
                                                                  glu, out);
  });
}

template <typename T>
cudaError_t launch_swiglu_backward(const T* grad_out, const T* pre, int64_t rows, int64_t half,
                                   GluParams glu, T* grad_pre, cudaStream_t stream) {
  return launch_swiglu_elementwise<T>(
      rows, half, {grad_out, pre, grad_pre}, [&](const auto& config, auto vec) {
        return device::launch<swiglu_backward_kernel<T, decltype(vec)::value>>(
            config, stream, grad_out, pre, rows, half, glu, grad_pre);
      });
}

#define MOE_KERNELS_INSTANTIATE_GROUPED_GEMM(T)                                                   \
  template GemmPath gemm_path<T>(const GroupedGemmProblem&);                                      \
  template cudaError_t launch_grouped_gemm<T>(const GroupedGemmProblem&, GemmKernel,              \
                                              cudaStream_t);                                      \
  template cudaError_t launch_swiglu<T>(const T*, int64_t, int64_t, GluParams, T*, cudaStream_t); \
  template cudaError_t launch_swiglu_backward<T>(const T*, const T*, int64_t, int64_t, GluParams, \
                                                 T*, cudaStream_t);
MOE_KERNELS_INSTANTIATE_GROUPED_GEMM(float)
MOE_KERNELS_INSTANTIATE_GROUPED_GEMM(double)
MOE_KERNELS_INSTANTIATE_GROUPED_GEMM(device::bf16)
MOE_KERNELS_INSTANTIATE_GROUPED_GEMM(device::fp16)
#undef MOE_KERNELS_INSTANTIATE_GROUPED_GEMM

}  // namespace moe_kernels::gemm::MOE_KERNELS_TARGET
