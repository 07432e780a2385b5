// Argument checks of the grouped GEMM family, shared by every backend (SPEC.md section 4), and
// the declarations its files share.
#pragma once

#include <functional>
#include <string_view>
#include <tuple>

#include "common/checks.h"

namespace moe_kernels::gemm {

// backend: "kernel" (this package's kernels) or "cublas" (one library GEMM per expert: cuBLAS
// on CUDA tensors; on the CPU both are the per-expert BLAS loop).
inline void check_backend(std::string_view backend) {
  check_choice(backend, {"kernel", "cublas"}, "backend");
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
inline void check_grouped_gemm_args(const at::Tensor& a, const at::Tensor& b,
                                    const at::Tensor& tokens_per_expert, bool trans_b,
                                    std::string_view backend) {
  check_segmented_rows(a, tokens_per_expert);
  check_dim(b, 3, "b");
  check_same_dtype(b, a, "b", "a");
  check_same_device(b, a, "b", "a");
  check_size(tokens_per_expert, 0, b.size(0), "tokens_per_expert", "num_experts (b.size(0))");
  check_size(b, trans_b ? 2 : 1, a.size(1), "b", "a.size(1) (K)");
  check_backend(backend);
}

// As grouped_gemm, and b's N columns are [gate | up].
inline void check_grouped_gemm_swiglu_args(const at::Tensor& a, const at::Tensor& b,
                                           const at::Tensor& tokens_per_expert, bool trans_b,
                                           std::string_view backend) {
  check_grouped_gemm_args(a, b, tokens_per_expert, trans_b, backend);
  const int64_t n = b.size(trans_b ? 1 : 2);
  TORCH_CHECK(n % 2 == 0, "b must have an even number of output columns for SwiGLU ([gate | up]), ",
              "got ", n);
}

// a [M, K]; grad_c [M, N]; tokens_per_expert [E].
inline void check_grouped_gemm_wgrad_args(const at::Tensor& a, const at::Tensor& grad_c,
                                          const at::Tensor& tokens_per_expert,
                                          std::string_view backend) {
  check_segmented_rows(a, tokens_per_expert);
  check_dim(grad_c, 2, "grad_c");
  check_same_dtype(grad_c, a, "grad_c", "a");
  check_same_device(grad_c, a, "grad_c", "a");
  check_size(grad_c, 0, a.size(0), "grad_c", "a.size(0) (M)");
  check_backend(backend);
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
// and check it: non-negative, summing to M. `epilogue(c_e, first_row)`, when given, runs on each
// expert's output rows right after its GEMM, on the thread that ran it, while they are in cache.
using SegmentEpilogue = std::function<void(const at::Tensor& c_e, int64_t first_row)>;
at::Tensor grouped_gemm_blas(const at::Tensor& a, const at::Tensor& b,
                             const at::Tensor& tokens_per_expert, bool trans_b,
                             const SegmentEpilogue& epilogue = {});
at::Tensor grouped_gemm_wgrad_blas(const at::Tensor& a, const at::Tensor& grad_c,
                                   const at::Tensor& tokens_per_expert, bool trans_b);

namespace emulated {
// The CUDA ops run on the CPU emulator (grouped_gemm_cuda.cpp compiled for it).
at::Tensor grouped_gemm_cuda(const at::Tensor& a, const at::Tensor& b,
                             const at::Tensor& tokens_per_expert, bool trans_b,
                             c10::string_view backend);
at::Tensor grouped_gemm_wgrad_cuda(const at::Tensor& a, const at::Tensor& grad_c,
                                   const at::Tensor& tokens_per_expert, bool trans_b,
                                   c10::string_view backend);
std::tuple<at::Tensor, at::Tensor> grouped_gemm_swiglu_cuda(const at::Tensor& a,
                                                            const at::Tensor& b,
                                                            const at::Tensor& tokens_per_expert,
                                                            bool trans_b, c10::string_view backend);
at::Tensor swiglu_backward_cuda(const at::Tensor& grad_out, const at::Tensor& pre);
}  // namespace emulated

}  // namespace moe_kernels::gemm
