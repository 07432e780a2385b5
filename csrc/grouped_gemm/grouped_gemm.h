// Argument checks of the grouped GEMM family, shared by every backend (SPEC.md section 4).
#pragma once

#include "common/checks.h"

namespace moe_kernels::gemm {

// a [M, K]; b [E, K, N] (or [E, N, K] with trans_b); tokens_per_expert [E].
inline void check_grouped_gemm_args(const at::Tensor& a, const at::Tensor& b,
                                    const at::Tensor& tokens_per_expert, bool trans_b) {
  check_dim(a, 2, "a");
  check_floating(a, "a");
  check_dim(b, 3, "b");
  check_same_dtype(b, a, "b", "a");
  check_same_device(b, a, "b", "a");
  check_dim(tokens_per_expert, 1, "tokens_per_expert");
  check_integer(tokens_per_expert, "tokens_per_expert");
  check_size(tokens_per_expert, 0, b.size(0), "tokens_per_expert", "num_experts (b.size(0))");
  check_size(b, trans_b ? 2 : 1, a.size(1), "b", "a.size(1) (K)");
}

// a [M, K]; grad_c [M, N]; tokens_per_expert [E].
inline void check_grouped_gemm_wgrad_args(const at::Tensor& a, const at::Tensor& grad_c,
                                          const at::Tensor& tokens_per_expert) {
  check_dim(a, 2, "a");
  check_floating(a, "a");
  check_dim(grad_c, 2, "grad_c");
  check_same_dtype(grad_c, a, "grad_c", "a");
  check_same_device(grad_c, a, "grad_c", "a");
  check_size(grad_c, 0, a.size(0), "grad_c", "a.size(0) (M)");
  check_dim(tokens_per_expert, 1, "tokens_per_expert");
  check_integer(tokens_per_expert, "tokens_per_expert");
}

}  // namespace moe_kernels::gemm
