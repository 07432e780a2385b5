// Backend "torch": the grouped GEMM products through torch._grouped_mm, a baseline on any device
// (SPEC.md section 4). The offsets it takes, the ends of the expert segments, are the cumulative
// sum of tokens_per_expert as int32 on its device, so launching needs no host synchronisation.
//
// What torch._grouped_mm accepts (torch 2.9 to 2.14, CPU and CUDA): fp32, bf16 and fp16
// operands (no fp64), the output in the operands' dtype; each operand row-major or column-major
// with a leading dimension of a multiple of 16 bytes, starting 16-byte aligned (on CUDA; older
// releases ask it on the CPU too); int32 offsets. The ops use its 2d x 3d form (a [M, K] by
// b [E, K, N], either layout of b) and its 2d x 2d form (a^T [K, M] by grad_c [M, N], giving
// [E, K, N]: the weight gradient, zero for an empty expert). How it runs them: on CUDA, bf16 on
// sm_90 and sm_100 is torch's CUTLASS grouped GEMM, with no host synchronisation (torch builds
// with CUDA >= 13.3 may take cuBLASLt's grouped GEMM instead, fp16 too); every other case is
// torch's fallback, one mm per expert after copying the offsets to the host (a synchronisation
// on CUDA). The checks below turn torch's refusals into errors that name the backend and the
// reason; an unaligned view is copied.
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include "common/dispatch.h"
#include "grouped_gemm/grouped_gemm.h"

namespace moe_kernels::gemm {
namespace {

constexpr const char* kTorchBackend = "backend 'torch' (torch._grouped_mm)";

// Its dtypes; and its CUDA kernel (bf16) sets up the experts' problems in one thread block.
void check_torch_operands(const at::Tensor& a, int64_t num_experts) {
  const at::ScalarType dtype = a.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, kTorchBackend,
              " takes float32, bfloat16 or float16 operands, got ", dtype);
  TORCH_CHECK(!a.is_cuda() || dtype != at::kBFloat16 || num_experts <= 1024, kTorchBackend,
              " takes at most 1024 experts for bf16 on CUDA, got ", num_experts);
}

// A dimension that is the leading one of an operand: its rows must be multiples of 16 bytes.
void check_row_bytes(int64_t size, const at::Tensor& like, const char* name) {
  const int64_t per_16_bytes = 16 / static_cast<int64_t>(like.element_size());
  TORCH_CHECK(size % per_16_bytes == 0, kTorchBackend,
              " needs operand rows of a multiple of 16 bytes: ", name, " must be a multiple of ",
              per_16_bytes, " for ", like.scalar_type(), ", got ", size);
}

// The operand as torch._grouped_mm reads it: row-major with the strides of its sizes, starting
// 16-byte aligned. A tensor that is not (a view) is copied.
at::Tensor packed(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  bool usable = reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 16 == 0;
  int64_t stride = 1;
  for (int64_t d = c.dim() - 1; d >= 0; --d) {
    usable = usable && c.stride(d) == stride;
    stride *= std::max<int64_t>(c.size(d), 1);
  }
  return usable ? c : at::empty(c.sizes(), c.options()).copy_(c);
}

// The end row of each expert's segment, int32, on the device of the counts. Counts on the CPU
// are checked (non-negative, summing to at most num_rows), as the library loop checks them; on CUDA
// that would synchronise, so they are trusted there.
at::Tensor segment_ends(const at::Tensor& tokens_per_expert, int64_t num_rows) {
  TORCH_CHECK(num_rows <= std::numeric_limits<int32_t>::max(), kTorchBackend,
              " takes at most 2^31 - 1 rows (int32 offsets), got ", num_rows);
  if (tokens_per_expert.is_cpu()) segment_sizes(tokens_per_expert, num_rows);
  return at::cumsum(tokens_per_expert, 0, at::kInt);
}

}  // namespace

at::Tensor grouped_gemm_torch(const at::Tensor& a_in, const at::Tensor& b_in,
                              const at::Tensor& tokens_per_expert, bool trans_b) {
  check_torch_operands(a_in, tokens_per_expert.size(0));
  const int64_t m = a_in.size(0), k = a_in.size(1), n = b_in.size(trans_b ? 1 : 2);
  check_row_bytes(k, a_in, "K (a.size(1))");
  check_row_bytes(n, a_in, trans_b ? "N (b.size(1))" : "N (b.size(2))");
  const at::Tensor ends = segment_ends(tokens_per_expert, m);
  // Nothing to multiply (torch would launch an empty grid): zeros, the value of an empty sum.
  if (m == 0 || n == 0 || k == 0 || b_in.size(0) == 0) return at::zeros({m, n}, a_in.options());
  const at::Tensor a = packed(a_in), b = packed(b_in);
  return at::_grouped_mm(a, trans_b ? b.transpose(1, 2) : b, ends);
}

// grad_b[e] = a_e^T @ grad_c_e, or grad_c_e^T @ a_e with trans_b: the 2d x 2d form, whose
// segments run along the reduction.
at::Tensor grouped_gemm_wgrad_torch(const at::Tensor& a_in, const at::Tensor& grad_c_in,
                                    const at::Tensor& tokens_per_expert, bool trans_b) {
  const int64_t m = a_in.size(0), k = a_in.size(1), n = grad_c_in.size(1);
  const int64_t num_experts = tokens_per_expert.size(0);
  check_torch_operands(a_in, num_experts);
  check_row_bytes(k, a_in, "K (a.size(1))");
  check_row_bytes(n, a_in, "N (grad_c.size(1))");
  const at::Tensor ends = segment_ends(tokens_per_expert, m);
  if (m == 0 || n == 0 || k == 0 || num_experts == 0) {
    return trans_b ? at::zeros({num_experts, n, k}, a_in.options())
                   : at::zeros({num_experts, k, n}, a_in.options());
  }
  const at::Tensor a = packed(a_in), grad_c = packed(grad_c_in);
  return trans_b ? at::_grouped_mm(grad_c.t(), a, ends) : at::_grouped_mm(a.t(), grad_c, ends);
}

std::tuple<at::Tensor, at::Tensor> grouped_gemm_swiglu_torch(const at::Tensor& a,
                                                             const at::Tensor& b,
                                                             const at::Tensor& tokens_per_expert,
                                                             bool trans_b, bool keep_product,
                                                             const GluParams& glu) {
  return swiglu_of_product(grouped_gemm_torch(a, b, tokens_per_expert, trans_b), keep_product, glu);
}

std::tuple<at::Tensor, at::Tensor> swiglu_of_product(const at::Tensor& pre, bool keep_product,
                                                     const GluParams& glu) {
  const auto gate_up = pre.to(opmath_dtype(pre.scalar_type())).chunk(2, 1);
  at::Tensor gate = gate_up[0], up = gate_up[1];
  if (glu.limit != GluParams{}.limit) {
    gate = gate.clamp_max(glu.limit);
    up = up.clamp(-glu.limit, glu.limit);
  }
  // silu itself where the variant is SwiGLU, so that these backends compute as torch does.
  const at::Tensor activated =
      glu.alpha == 1.0f ? at::silu(gate) : gate * at::sigmoid(gate * glu.alpha);
  const at::Tensor out = glu.up_offset == 0.0f ? activated * up : activated * (up + glu.up_offset);
  return {out.to(pre.scalar_type()), keep_product ? pre : pre.new_empty({0, pre.size(1)})};
}

}  // namespace moe_kernels::gemm
