// SwiGLU, silu(gate) * up, and its gradient, in the accumulator type: the arithmetic of the
// GEMM epilogue and of the CUDA backward kernel (the same formulas as torch's silu and
// silu_backward, which the CPU ops call).
#pragma once

#include "common/host_device.h"
#include "common/math.h"

namespace moe_kernels::gemm {

template <typename acc>
MOE_KERNELS_HOST_DEVICE acc swiglu(acc gate, acc up) {
  return gate * sigmoid_of(gate) * up;
}

// d(silu(g) * u) = grad * (u * silu'(g), silu(g)), with silu'(g) = s + g * s * (1 - s).
template <typename acc>
MOE_KERNELS_HOST_DEVICE void swiglu_grad(acc gate, acc up, acc grad, acc* grad_gate, acc* grad_up) {
  const acc s = sigmoid_of(gate);
  *grad_gate = grad * up * s * (acc(1) + gate * (acc(1) - s));
  *grad_up = grad * gate * s;
}

}  // namespace moe_kernels::gemm
