// The grouped GEMM family on the CPU (SPEC.md section 4): the products are one BLAS call per
// expert segment (grouped_gemm_blas.cpp; backend "torch" runs torch._grouped_mm instead,
// grouped_gemm_torch.cpp, and the CUDA kernels by name are refused), SwiGLU and its
// backward one parallel pass over the rows (swiglu_cpu.h: fused, vectorised, in the accumulator
// type, with the arithmetic of torch's silu and silu_backward).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "common/nvtx.h"
#include "common/parallel.h"
#include "emu/cpu_or_emulated.h"
#include "grouped_gemm/grouped_gemm.h"
#include "grouped_gemm/swiglu_cpu.h"

namespace moe_kernels::gemm {
namespace {

// SwiGLU runs on chunks of rows, the threads taking whole chunks: small enough to split a
// block of rows evenly, large enough that a thread's start costs nothing beside its chunk.
constexpr int64_t kChunkElements = 1 << 17;

template <typename Body>
void for_row_chunks(int64_t rows, int64_t row_elements, const Body& body) {
  const int64_t chunk = std::max<int64_t>(1, kChunkElements / std::max<int64_t>(row_elements, 1));
  parallel_for_in_caller_state(0, (rows + chunk - 1) / chunk, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) body(c * chunk, std::min(chunk, rows - c * chunk));
  });
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

// out = swiglu(pre[:, :F], pre[:, F:]), each expert's rows (or block of rows, when the product
// is not kept) right after its GEMM.
std::tuple<at::Tensor, at::Tensor> grouped_gemm_swiglu_cpu(const at::Tensor& a, const at::Tensor& b,
                                                           const at::Tensor& tokens_per_expert,
                                                           bool trans_b, c10::string_view backend,
                                                           bool keep_product, double alpha,
                                                           std::optional<double> limit,
                                                           double up_offset) {
  MOE_KERNELS_NVTX_RANGE("grouped_gemm_swiglu");
  const Backend choice = check_grouped_gemm_swiglu_args(a, b, tokens_per_expert, trans_b, backend);
  const GluParams glu = check_glu_params(alpha, limit, up_offset);
  if (cpu_runs_torch(choice, backend)) {
    return grouped_gemm_swiglu_torch(a, b, tokens_per_expert, trans_b, keep_product, glu);
  }
  const int64_t half = b.size(trans_b ? 1 : 2) / 2;
  auto out = at::empty({a.size(0), half}, a.options());
  at::Tensor pre = grouped_gemm_blas(
      a, b, tokens_per_expert, trans_b,
      [&](const at::Tensor& pre_e, int64_t first_row) {
        const at::Tensor out_e = out.narrow(0, first_row, pre_e.size(0));
        for_row_chunks(pre_e.size(0), pre_e.size(1), [&](int64_t row, int64_t rows) {
          swiglu_rows(pre_e.narrow(0, row, rows), out_e.narrow(0, row, rows), glu);
        });
      },
      keep_product);
  return {out, pre};
}

at::Tensor swiglu_cpu(const at::Tensor& pre_in, double alpha, std::optional<double> limit,
                      double up_offset) {
  MOE_KERNELS_NVTX_RANGE("swiglu");
  check_swiglu_args(pre_in);
  const GluParams glu = check_glu_params(alpha, limit, up_offset);
  const at::Tensor pre = pre_in.stride(1) == 1 ? pre_in : pre_in.contiguous();
  auto out = at::empty({pre.size(0), pre.size(1) / 2}, pre.options());
  for_row_chunks(pre.size(0), pre.size(1), [&](int64_t row, int64_t rows) {
    swiglu_rows(pre.narrow(0, row, rows), out.narrow(0, row, rows), glu);
  });
  return out;
}

// Chunks are views: any strides of grad_out do, including the broadcast gradient of a sum.
at::Tensor swiglu_backward_cpu(const at::Tensor& grad_out, const at::Tensor& pre_in, double alpha,
                               std::optional<double> limit, double up_offset) {
  MOE_KERNELS_NVTX_RANGE("swiglu_backward");
  check_swiglu_backward_args(grad_out, pre_in);
  const GluParams glu = check_glu_params(alpha, limit, up_offset);
  const at::Tensor pre = pre_in.stride(1) == 1 ? pre_in : pre_in.contiguous();
  auto grad_pre = at::empty(pre.sizes(), pre.options());
  for_row_chunks(pre.size(0), pre.size(1), [&](int64_t row, int64_t rows) {
    swiglu_backward_rows(grad_out.narrow(0, row, rows), pre.narrow(0, row, rows),
                         grad_pre.narrow(0, row, rows), glu);
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
  emu::impl_cpu_or_emulated<&swiglu_cpu, &emulated::swiglu_cuda>(m, "swiglu");
  emu::impl_cpu_or_emulated<&swiglu_backward_cpu, &emulated::swiglu_backward_cuda>(
      m, "swiglu_backward");
}

}  // namespace moe_kernels::gemm
