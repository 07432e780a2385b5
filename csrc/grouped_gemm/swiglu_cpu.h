// SwiGLU and its gradient over rows on the CPU, each in one pass: the operands are read once,
// widened to the accumulator type in registers, and each result rounded once into its output.
// Vectorised with ATen's Vectorized for the instruction set torch itself runs on this machine
// (at::get_cpu_capability(): DEFAULT, AVX2 or AVX512; ATEN_CPU_CAPABILITY respected), with the
// formulas of torch's silu and silu_backward and its exp (Sleef's): bf16 and fp16 results equal
// those ops composed in fp32 and rounded once; fp32 and fp64 ones differ from them by rounding
// only (torch's kernels for those types order the arithmetic differently). Callers split the
// rows over threads.
#pragma once

#include <ATen/ATen.h>

#include "grouped_gemm/glu_params.h"

namespace moe_kernels::gemm {

// out = swiglu(pre[:, :half], pre[:, half:]) (the variant `glu`, swiglu.h) for pre [R, 2 half]
// and out [R, half] of one dtype, each with unit column stride.
void swiglu_rows(const at::Tensor& pre, const at::Tensor& out, const GluParams& glu);

// grad_pre = the gradient of sum(grad_out * swiglu(gate, up)) for pre = [gate | up] (grad_pre
// like pre); grad_out may have any strides (a chunk without unit column stride is copied first).
void swiglu_backward_rows(const at::Tensor& grad_out, const at::Tensor& pre,
                          const at::Tensor& grad_pre, const GluParams& glu);

}  // namespace moe_kernels::gemm
