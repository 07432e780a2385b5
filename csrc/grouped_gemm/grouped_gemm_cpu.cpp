// The grouped GEMM family on the CPU (SPEC.md section 4): the products are one BLAS call per
// expert segment (grouped_gemm_blas.cpp; `backend` changes nothing here), SwiGLU and its
// backward one parallel pass over the rows, computed in the accumulator type.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "common/dispatch.h"
#include "common/nvtx.h"
#include "emu/cpu_or_emulated.h"
#include "grouped_gemm/grouped_gemm.h"
#include "grouped_gemm/swiglu.h"

namespace moe_kernels::gemm {
namespace {

// Rows of at least this many elements in all go to one parallel task.
constexpr int64_t kRowsGrain = 1 << 14;

at::Tensor grouped_gemm_cpu(const at::Tensor& a, const at::Tensor& b,
                            const at::Tensor& tokens_per_expert, bool trans_b,
                            c10::string_view backend) {
  MOE_KERNELS_NVTX_RANGE("grouped_gemm");
  check_grouped_gemm_args(a, b, tokens_per_expert, trans_b, backend);
  return grouped_gemm_blas(a, b, tokens_per_expert, trans_b);
}

at::Tensor grouped_gemm_wgrad_cpu(const at::Tensor& a, const at::Tensor& grad_c,
                                  const at::Tensor& tokens_per_expert, bool trans_b,
                                  c10::string_view backend) {
  MOE_KERNELS_NVTX_RANGE("grouped_gemm_wgrad");
  check_grouped_gemm_wgrad_args(a, grad_c, tokens_per_expert, backend);
  return grouped_gemm_wgrad_blas(a, grad_c, tokens_per_expert, trans_b);
}

// out = silu(pre[:, :F]) * pre[:, F:].
std::tuple<at::Tensor, at::Tensor> grouped_gemm_swiglu_cpu(const at::Tensor& a, const at::Tensor& b,
                                                           const at::Tensor& tokens_per_expert,
                                                           bool trans_b, c10::string_view backend) {
  MOE_KERNELS_NVTX_RANGE("grouped_gemm_swiglu");
  check_grouped_gemm_swiglu_args(a, b, tokens_per_expert, trans_b, backend);
  at::Tensor pre = grouped_gemm_blas(a, b, tokens_per_expert, trans_b);
  const int64_t rows = pre.size(0), half = pre.size(1) / 2;
  auto out = at::empty({rows, half}, pre.options());
  MOE_KERNELS_DISPATCH_FLOATING(pre.scalar_type(), "grouped_gemm_swiglu_cpu", [&] {
    using acc = at::opmath_type<scalar_t>;
    const scalar_t* p = pre.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, kRowsGrain / std::max<int64_t>(half, 1) + 1,
                     [&](int64_t r0, int64_t r1) {
                       for (int64_t r = r0; r < r1; ++r) {
                         const scalar_t* gate = p + r * 2 * half;
                         for (int64_t c = 0; c < half; ++c) {
                           o[r * half + c] = static_cast<scalar_t>(
                               swiglu(static_cast<acc>(gate[c]), static_cast<acc>(gate[half + c])));
                         }
                       }
                     });
  });
  return {out, pre};
}

at::Tensor swiglu_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& pre_in) {
  MOE_KERNELS_NVTX_RANGE("swiglu_backward");
  check_swiglu_backward_args(grad_out_in, pre_in);
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor pre = pre_in.contiguous();
  const int64_t rows = pre.size(0), half = grad_out.size(1);
  auto grad_pre = at::empty_like(pre);
  MOE_KERNELS_DISPATCH_FLOATING(pre.scalar_type(), "swiglu_backward_cpu", [&] {
    using acc = at::opmath_type<scalar_t>;
    const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* p = pre.const_data_ptr<scalar_t>();
    scalar_t* d = grad_pre.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, kRowsGrain / std::max<int64_t>(half, 1) + 1,
                     [&](int64_t r0, int64_t r1) {
                       for (int64_t r = r0; r < r1; ++r) {
                         for (int64_t c = 0; c < half; ++c) {
                           acc grad_gate, grad_up;
                           swiglu_grad(static_cast<acc>(p[r * 2 * half + c]),
                                       static_cast<acc>(p[r * 2 * half + half + c]),
                                       static_cast<acc>(g[r * half + c]), &grad_gate, &grad_up);
                           d[r * 2 * half + c] = static_cast<scalar_t>(grad_gate);
                           d[r * 2 * half + half + c] = static_cast<scalar_t>(grad_up);
                         }
                       }
                     });
  });
  return grad_pre;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_kernels, CPU, m) {
  emu::impl_cpu_or_emulated<&grouped_gemm_cpu, &emulated::grouped_gemm_cuda>(m, "grouped_gemm");
  emu::impl_cpu_or_emulated<&grouped_gemm_wgrad_cpu, &emulated::grouped_gemm_wgrad_cuda>(
      m, "grouped_gemm_wgrad");
  emu::impl_cpu_or_emulated<&grouped_gemm_swiglu_cpu, &emulated::grouped_gemm_swiglu_cuda>(
      m, "grouped_gemm_swiglu");
  emu::impl_cpu_or_emulated<&swiglu_backward_cpu, &emulated::swiglu_backward_cuda>(
      m, "swiglu_backward");
}

}  // namespace moe_kernels::gemm
