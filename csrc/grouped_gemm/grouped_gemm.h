// Argument checks of the grouped GEMM family, shared by every backend (SPEC.md section 4), and
// the declarations its files share.
#pragma once

#include <array>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "grouped_gemm/glu_params.h"

namespace moe_kernels::gemm {

// What the `backend` argument of the products asks for. On CUDA tensors (and on the CPU emulator):
// kAuto the fastest of this package's kernels the device has ("auto", and its older name
// "kernel"), kWgmma / kMma one of them by name (the sm_90a wgmma + TMA kernel, the mma.sync
// kernel), kCublas one cuBLAS GEMM per expert, kTorch torch._grouped_mm
// (grouped_gemm_torch.cpp). On native CPU tensors kAuto and kCublas are the per-expert BLAS
// loop, kTorch torch._grouped_mm, and the CUDA kernels by name are refused (cpu_runs_torch).
enum class Backend : int { kAuto, kWgmma, kMma, kCublas, kTorch };

inline constexpr std::array<std::pair<std::string_view, Backend>, 6> kBackends{{
    {"auto", Backend::kAuto},
    {"kernel", Backend::kAuto},
    {"wgmma", Backend::kWgmma},
    {"mma", Backend::kMma},
    {"cublas", Backend::kCublas},
    {"torch", Backend::kTorch},
}};

// The Backend a name stands for; any other name is an error that lists the choices.
inline Backend check_backend(std::string_view backend) {
  std::string choices;
  for (const auto& [name, value] : kBackends) {
    if (backend == name) return value;
    choices += (choices.empty() ? "'" : ", '") + std::string(name) + "'";
  }
  TORCH_CHECK(false, "backend must be one of ", choices, ", got '", backend, "'");
}

// The backend of a product on native CPU tensors: true for "torch" (grouped_gemm_torch.cpp),
// false for the CPU path ("auto", "kernel", "cublas"); a CUDA kernel by name is an error.
inline bool cpu_runs_torch(Backend backend, std::string_view name) {
  TORCH_CHECK(backend != Backend::kWgmma && backend != Backend::kMma, "backend '", name,
              "' runs on CUDA tensors (or on the CPU emulator under moe_kernels.emulate())");
  return backend == Backend::kTorch;
}

// a [M, K] and the counts of its row segments, tokens_per_expert [E]: what every product reads.
inline void check_segmented_rows(const at::Tensor& a, const at::Tensor& tokens_per_expert) {
  check_dim(a, 2, "a");
  check_floating(a, "a");
  check_dim(tokens_per_expert, 1, "tokens_per_expert");
  check_integer(tokens_per_expert, "tokens_per_expert");
  check_same_device(tokens_per_expert, a, "tokens_per_expert", "a");
}

// a [M, K]; b [E, K, N] (or [E, N, K] with trans_b); tokens_per_expert [E].
// Each check_*_args returns the Backend that `backend` names.
inline Backend check_grouped_gemm_args(const at::Tensor& a, const at::Tensor& b,
                                       const at::Tensor& tokens_per_expert, bool trans_b,
                                       std::string_view backend) {
  check_segmented_rows(a, tokens_per_expert);
  check_dim(b, 3, "b");
  check_same_dtype(b, a, "b", "a");
  check_same_device(b, a, "b", "a");
  check_size(tokens_per_expert, 0, b.size(0), "tokens_per_expert", "num_experts (b.size(0))");
  check_size(b, trans_b ? 2 : 1, a.size(1), "b", "a.size(1) (K)");
  return check_backend(backend);
}

// As grouped_gemm, and b's N columns are [gate | up].
inline Backend check_grouped_gemm_swiglu_args(const at::Tensor& a, const at::Tensor& b,
                                              const at::Tensor& tokens_per_expert, bool trans_b,
                                              std::string_view backend) {
  const Backend choice = check_grouped_gemm_args(a, b, tokens_per_expert, trans_b, backend);
  const int64_t n = b.size(trans_b ? 1 : 2);
  TORCH_CHECK(n % 2 == 0, "b must have an even number of output columns for SwiGLU ([gate | up]), ",
              "got ", n);
  return choice;
}

// a [M, K]; grad_c [M, N]; tokens_per_expert [E].
inline Backend check_grouped_gemm_wgrad_args(const at::Tensor& a, const at::Tensor& grad_c,
                                             const at::Tensor& tokens_per_expert,
                                             std::string_view backend) {
  check_segmented_rows(a, tokens_per_expert);
  check_dim(grad_c, 2, "grad_c");
  check_same_dtype(grad_c, a, "grad_c", "a");
  check_same_device(grad_c, a, "grad_c", "a");
  check_size(grad_c, 0, a.size(0), "grad_c", "a.size(0) (M)");
  return check_backend(backend);
}

// The SwiGLU variant of alpha, limit and up_offset (swiglu.h): finite, and a limit above 0.
inline GluParams check_glu_params(double alpha, std::optional<double> limit, double up_offset) {
  check_finite(alpha, "alpha");
  check_finite(up_offset, "up_offset");
  GluParams glu{static_cast<float>(alpha), GluParams{}.limit, static_cast<float>(up_offset)};
  if (limit.has_value()) {
    check_finite(*limit, "limit");
    TORCH_CHECK(*limit > 0, "limit must be > 0 (or None: no clamp), got ", *limit);
    glu.limit = static_cast<float>(*limit);
  }
  return glu;
}

// pre [M, 2F].
inline void check_swiglu_args(const at::Tensor& pre) {
  check_dim(pre, 2, "pre");
  check_floating(pre, "pre");
  TORCH_CHECK(pre.size(1) % 2 == 0, "pre must have an even number of columns ([gate | up]), got ",
              pre.size(1));
}

// grad_out [M, F]; pre [M, 2F].
inline void check_swiglu_backward_args(const at::Tensor& grad_out, const at::Tensor& pre) {
  check_dim(grad_out, 2, "grad_out");
  check_floating(grad_out, "grad_out");
  check_dim(pre, 2, "pre");
  check_same_dtype(pre, grad_out, "pre", "grad_out");
  check_same_device(pre, grad_out, "pre", "grad_out");
  check_size(pre, 0, grad_out.size(0), "pre", "grad_out.size(0)");
  check_size(pre, 1, 2 * grad_out.size(1), "pre", "2 * grad_out.size(1)");
}

// One library GEMM per expert segment (grouped_gemm_blas.cpp), on any device: the CPU ops, and
// the CUDA "cublas" backend. They read tokens_per_expert on the host (a synchronisation on CUDA)
// and check it: non-negative, summing to at most M (rows past the segments are no expert's: the
// kept rows of capacity routing, then permute's zero rows; their output rows are not written).
// `epilogue(c_e, first_row)`, when given, runs on each expert's output rows right after its GEMM,
// on the thread that ran it, while they are in cache. Without `keep_product` the epilogue is the
// product's only reader: it gets the rows in blocks of a reused buffer, and the result is empty
// ([0, N]). A whole-product buffer would be fresh memory on every call (larger than what the
// allocator keeps), each page zeroed on first touch: 2-7% of the fp32 forward of
// bench_transformers' blocks on the CPU, 12-18% in bf16. Segment sizes on the host (a
// synchronisation on CUDA), checked: non-negative, covering at most `num_rows` rows.
std::vector<int64_t> segment_sizes(const at::Tensor& tokens_per_expert, int64_t num_rows);
using SegmentEpilogue = std::function<void(const at::Tensor& c_e, int64_t first_row)>;
at::Tensor grouped_gemm_blas(const at::Tensor& a, const at::Tensor& b,
                             const at::Tensor& tokens_per_expert, bool trans_b,
                             const SegmentEpilogue& epilogue = {}, bool keep_product = true);
at::Tensor grouped_gemm_wgrad_blas(const at::Tensor& a, const at::Tensor& grad_c,
                                   const at::Tensor& tokens_per_expert, bool trans_b);

// The products through torch._grouped_mm (backend "torch", grouped_gemm_torch.cpp), on any
// device: offsets are the cumulative sum of tokens_per_expert as int32 on its device, so nothing
// waits for the device (torch's own fallback may: see there). Operands must be fp32, bf16 or
// fp16 with K and N multiples of 16 bytes; anything else is an error naming the backend.
at::Tensor grouped_gemm_torch(const at::Tensor& a, const at::Tensor& b,
                              const at::Tensor& tokens_per_expert, bool trans_b);
at::Tensor grouped_gemm_wgrad_torch(const at::Tensor& a, const at::Tensor& grad_c,
                                    const at::Tensor& tokens_per_expert, bool trans_b);
std::tuple<at::Tensor, at::Tensor> grouped_gemm_swiglu_torch(const at::Tensor& a,
                                                             const at::Tensor& b,
                                                             const at::Tensor& tokens_per_expert,
                                                             bool trans_b, bool keep_product,
                                                             const GluParams& glu);

// SwiGLU of a library product pre = [gate | up] ([M, 2F]): swiglu(gate, up) in the accumulator
// type, rounded once to pre's dtype (what the fused epilogue computes), for the backends whose
// product is not fused with it ("cublas" on CUDA, "torch"); returned with pre, or with an empty
// [0, 2F] when the product is not kept (grouped_gemm_swiglu's two outputs).
std::tuple<at::Tensor, at::Tensor> swiglu_of_product(const at::Tensor& pre, bool keep_product,
                                                     const GluParams& glu);

namespace cuda {
// The kernel backend="auto" runs the products with on a CUDA device of compute capability
// major.minor, for bf16/fp16 operands with K and N multiples of 8 (fp32, fp64 and unaligned
// shapes run "simt" on every GPU): "wgmma" (the sm_90a wgmma + TMA kernel), "mma" (mma.sync,
// from sm_80) or "simt" (grouped_gemm_cuda.cpp; build_info() reports it per device).
std::string auto_kernel_name(int major, int minor);
}  // namespace cuda

namespace emulated {
// The CUDA ops run on the CPU emulator (grouped_gemm_cuda.cpp compiled for it).
at::Tensor grouped_gemm_cuda(const at::Tensor& a, const at::Tensor& b,
                             const at::Tensor& tokens_per_expert, bool trans_b,
                             c10::string_view backend);
at::Tensor grouped_gemm_wgrad_cuda(const at::Tensor& a, const at::Tensor& grad_c,
                                   const at::Tensor& tokens_per_expert, bool trans_b,
                                   c10::string_view backend);
std::tuple<at::Tensor, at::Tensor> grouped_gemm_swiglu_cuda(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& tokens_per_expert, bool trans_b,
    c10::string_view backend, bool keep_product, double alpha, std::optional<double> limit,
    double up_offset);
at::Tensor swiglu_cuda(const at::Tensor& pre, double alpha, std::optional<double> limit,
                       double up_offset);
at::Tensor swiglu_backward_cuda(const at::Tensor& grad_out, const at::Tensor& pre, double alpha,
                                std::optional<double> limit, double up_offset);
}  // namespace emulated

}  // namespace moe_kernels::gemm
