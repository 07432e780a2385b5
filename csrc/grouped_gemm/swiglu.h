// SwiGLU, silu(gate) * up, and its gradient, in the accumulator type: the arithmetic of the
// GEMM epilogue and of the CUDA kernels (the same formulas as torch's silu and silu_backward,
// which the CPU ops follow). Its variants are one formula with three parameters (GluParams):
//   g = min(gate, limit), u = clamp(up, -limit, limit), out = g * sigmoid(alpha * g) * (u + offset)
// which is SwiGLU at alpha 1, no limit and offset 0, gpt-oss's clamped alpha-SwiGLU at (1.702,
// 7, 1), and the clamped SwiGLU of GLM-5-Next or DeepSeek-V4 at (1, limit, 0).
#pragma once

#include "common/host_device.h"
#include "common/math.h"
#include "grouped_gemm/glu_params.h"

namespace moe_kernels::gemm {

// Comparisons, not fmin/fmax, so that a NaN stays a NaN (as torch.clamp keeps it).
template <typename acc>
MOE_KERNELS_HOST_DEVICE acc clamp_gate(acc gate, const GluParams& p) {
  return gate > acc(p.limit) ? acc(p.limit) : gate;
}

template <typename acc>
MOE_KERNELS_HOST_DEVICE acc clamp_up(acc up, const GluParams& p) {
  if (up > acc(p.limit)) return acc(p.limit);
  return up < -acc(p.limit) ? -acc(p.limit) : up;
}

template <typename acc>
MOE_KERNELS_HOST_DEVICE acc swiglu(acc gate, acc up, const GluParams& p = {}) {
  const acc g = clamp_gate(gate, p);
  return g * sigmoid_of(acc(p.alpha) * g) * (clamp_up(up, p) + acc(p.up_offset));
}

// d(f(g) * (u + offset)) with f(g) = g * s, s = sigmoid(alpha * g): f'(g) = s + alpha * g * s *
// (1 - s); an input at or past the limit passes no gradient (as torch.clamp's backward from
// torch 2.14, which passes it strictly inside), and a NaN stays a NaN.
template <typename acc>
MOE_KERNELS_HOST_DEVICE void swiglu_grad(acc gate, acc up, acc grad, acc* grad_gate, acc* grad_up,
                                         const GluParams& p = {}) {
  const acc g = clamp_gate(gate, p), u = clamp_up(up, p) + acc(p.up_offset);
  const acc s = sigmoid_of(acc(p.alpha) * g);
  *grad_gate =
      gate >= acc(p.limit) ? acc(0) : grad * u * s * (acc(1) + acc(p.alpha) * g * (acc(1) - s));
  *grad_up = up >= acc(p.limit) || up <= -acc(p.limit) ? acc(0) : grad * g * s;
}

}  // namespace moe_kernels::gemm
