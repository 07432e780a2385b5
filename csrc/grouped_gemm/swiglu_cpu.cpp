// The instruction set's copy of the SwiGLU row loops (swiglu_cpu_kernel.cpp), and the tensor
// front of swiglu_cpu.h.
#include "grouped_gemm/swiglu_cpu.h"

#include <ATen/Version.h>

#include <string>

#include "grouped_gemm/swiglu_cpu_kernel.h"

namespace moe_kernels::gemm {

namespace DEFAULT {
extern const SwigluRowKernels kSwigluRowKernels;
}
#if defined(MOE_KERNELS_X86_CPU_CAPABILITIES)
namespace AVX2 {
extern const SwigluRowKernels kSwigluRowKernels;
}
namespace AVX512 {
extern const SwigluRowKernels kSwigluRowKernels;
}
#endif

namespace {

// The copy of the instruction set torch runs its own kernels with.
const SwigluRowKernels& row_kernels() {
  static const SwigluRowKernels& chosen = []() -> const SwigluRowKernels& {
#if defined(MOE_KERNELS_X86_CPU_CAPABILITIES)
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512") return AVX512::kSwigluRowKernels;
    if (capability == "AVX2") return AVX2::kSwigluRowKernels;
#endif
    return DEFAULT::kSwigluRowKernels;
  }();
  return chosen;
}

Rows rows_of(const at::Tensor& t) { return {t.const_data_ptr(), t.stride(0)}; }

MutableRows mutable_rows_of(const at::Tensor& t) { return {t.mutable_data_ptr(), t.stride(0)}; }

}  // namespace

void swiglu_rows(const at::Tensor& pre, const at::Tensor& out, const GluParams& glu) {
  TORCH_INTERNAL_ASSERT(pre.stride(1) == 1 && out.stride(1) == 1);
  row_kernels().forward(pre.scalar_type(), rows_of(pre), mutable_rows_of(out), out.size(0),
                        out.size(1), glu);
}

void swiglu_backward_rows(const at::Tensor& grad_out, const at::Tensor& pre,
                          const at::Tensor& grad_pre, const GluParams& glu) {
  TORCH_INTERNAL_ASSERT(pre.stride(1) == 1 && grad_pre.stride(1) == 1);
  const at::Tensor grad = grad_out.stride(1) == 1 ? grad_out : grad_out.contiguous();
  row_kernels().backward(pre.scalar_type(), rows_of(grad), rows_of(pre), mutable_rows_of(grad_pre),
                         grad.size(0), grad.size(1), glu);
}

}  // namespace moe_kernels::gemm
