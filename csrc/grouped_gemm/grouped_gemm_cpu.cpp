// The grouped GEMM family on the CPU (SPEC.md section 4): the products are one BLAS call per
// expert segment (grouped_gemm_blas.cpp; backend "torch" runs torch._grouped_mm instead,
// grouped_gemm_torch.cpp, and the CUDA kernels by name are refused), SwiGLU and its
// backward one parallel pass over the rows, computed in the accumulator type (the arithmetic of
// torch's silu and silu_backward, the formulas of swiglu.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "common/dispatch.h"
#include "common/nvtx.h"
#include "common/parallel.h"
#include "emu/cpu_or_emulated.h"
#include "grouped_gemm/grouped_gemm.h"

namespace moe_kernels::gemm {
namespace {

// SwiGLU runs on chunks of rows small enough for the cache, each converted to the accumulator
// type once and computed with torch's vectorised silu kernels (one rounding to the output).
constexpr int64_t kChunkElements = 1 << 17;

template <typename Body>
void for_row_chunks(int64_t rows, int64_t row_elements, const Body& body) {
  const int64_t chunk = std::max<int64_t>(1, kChunkElements / std::max<int64_t>(row_elements, 1));
  parallel_for_in_caller_state(0, (rows + chunk - 1) / chunk, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) body(c * chunk, std::min(chunk, rows - c * chunk));
  });
}

// compute(target) writes into dst itself when dst has the accumulator type (fp32: no temporary,
// no copy), else into a temporary of that type, rounded once into dst.
template <typename Compute>
void compute_into(const at::Tensor& dst, at::ScalarType acc, const Compute& compute) {
  if (dst.scalar_type() == acc) {
    at::Tensor target = dst;
    compute(target);
    return;
  }
  at::Tensor target = at::empty(dst.sizes(), dst.options().dtype(acc));
  compute(target);
  dst.copy_(target);
}

at::Tensor grouped_gemm_cpu(const at::Tensor& a, const at::Tensor& b,
                            const at::Tensor& tokens_per_expert, bool trans_b,
                            c10::string_view backend) {
  MOE_KERNELS_NVTX_RANGE("grouped_gemm");
  if (cpu_runs_torch(check_grouped_gemm_args(a, b, tokens_per_expert, trans_b, backend), backend)) {
    return grouped_gemm_torch(a, b, tokens_per_expert, trans_b);
  }
  return grouped_gemm_blas(a, b, tokens_per_expert, trans_b);
}

at::Tensor grouped_gemm_wgrad_cpu(const at::Tensor& a, const at::Tensor& grad_c,
                                  const at::Tensor& tokens_per_expert, bool trans_b,
                                  c10::string_view backend) {
  MOE_KERNELS_NVTX_RANGE("grouped_gemm_wgrad");
  if (cpu_runs_torch(check_grouped_gemm_wgrad_args(a, grad_c, tokens_per_expert, backend),
                     backend)) {
    return grouped_gemm_wgrad_torch(a, grad_c, tokens_per_expert, trans_b);
  }
  return grouped_gemm_wgrad_blas(a, grad_c, tokens_per_expert, trans_b);
}

// out = silu(pre[:, :F]) * pre[:, F:], each expert's rows (or block of rows, when the product is
// not kept) right after its GEMM.
std::tuple<at::Tensor, at::Tensor> grouped_gemm_swiglu_cpu(const at::Tensor& a, const at::Tensor& b,
                                                           const at::Tensor& tokens_per_expert,
                                                           bool trans_b, c10::string_view backend,
                                                           bool keep_product) {
  MOE_KERNELS_NVTX_RANGE("grouped_gemm_swiglu");
  if (cpu_runs_torch(check_grouped_gemm_swiglu_args(a, b, tokens_per_expert, trans_b, backend),
                     backend)) {
    return grouped_gemm_swiglu_torch(a, b, tokens_per_expert, trans_b, keep_product);
  }
  const int64_t half = b.size(trans_b ? 1 : 2) / 2;
  auto out = at::empty({a.size(0), half}, a.options());
  const at::ScalarType acc = opmath_dtype(a.scalar_type());
  at::Tensor pre = grouped_gemm_blas(
      a, b, tokens_per_expert, trans_b,
      [&](const at::Tensor& pre_e, int64_t first_row) {
        const at::Tensor out_e = out.narrow(0, first_row, pre_e.size(0));
        for_row_chunks(pre_e.size(0), pre_e.size(1), [&](int64_t row, int64_t rows) {
          const at::Tensor chunk = pre_e.narrow(0, row, rows);
          compute_into(out_e.narrow(0, row, rows), acc, [&](at::Tensor& h) {
            at::silu_out(h, chunk.narrow(1, 0, half).to(acc));
            h.mul_(chunk.narrow(1, half, half).to(acc));
          });
        });
      },
      keep_product);
  return {out, pre};
}

// Chunks are views: any strides do, including the broadcast gradient of a sum.
at::Tensor swiglu_backward_cpu(const at::Tensor& grad_out, const at::Tensor& pre) {
  MOE_KERNELS_NVTX_RANGE("swiglu_backward");
  check_swiglu_backward_args(grad_out, pre);
  const at::AutoDispatchBelowAutograd below_autograd;  // out= ops, as in grouped_gemm_blas
  const int64_t half = grad_out.size(1);
  auto grad_pre = at::empty(pre.sizes(), pre.options());
  const at::ScalarType acc = opmath_dtype(pre.scalar_type());
  for_row_chunks(pre.size(0), pre.size(1), [&](int64_t row, int64_t rows) {
    const at::Tensor chunk = pre.narrow(0, row, rows);
    const at::Tensor gate = chunk.narrow(1, 0, half).to(acc);
    const at::Tensor up = chunk.narrow(1, half, half).to(acc);
    const at::Tensor grad = grad_out.narrow(0, row, rows).to(acc);
    const at::Tensor grad_rows = grad_pre.narrow(0, row, rows);
    compute_into(grad_rows.narrow(1, half, half), acc, [&](at::Tensor& grad_up) {
      at::silu_out(grad_up, gate);
      grad_up.mul_(grad);
    });
    compute_into(grad_rows.narrow(1, 0, half), acc,
                 [&](at::Tensor& grad_gate) { at::silu_backward_out(grad_gate, grad * up, gate); });
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
