// SwiGLU, silu(gate) * up, and its gradient, in the accumulator type: the arithmetic of the
// GEMM epilogue and of the CUDA backward kernel (the same formulas as torch's silu and
// silu_backward, which the CPU ops call).
#pragma once

#include <math.h>

#include "common/host_device.h"

namespace moe_kernels::gemm {

// ::expf / ::exp: the host's libm on the emulator, CUDA's device functions in kernels.
MOE_KERNELS_HOST_DEVICE float exp_of(float x) { return ::expf(x); }
MOE_KERNELS_HOST_DEVICE double exp_of(double x) { return ::exp(x); }

template <typename acc>
MOE_KERNELS_HOST_DEVICE acc sigmoid(acc x) {
  return acc(1) / (acc(1) + exp_of(-x));
}

template <typename acc>
MOE_KERNELS_HOST_DEVICE acc swiglu(acc gate, acc up) {
  return gate * sigmoid(gate) * up;
}

// d(silu(g) * u) = grad * (u * silu'(g), silu(g)), with silu'(g) = s + g * s * (1 - s).
template <typename acc>
MOE_KERNELS_HOST_DEVICE void swiglu_grad(acc gate, acc up, acc grad, acc* grad_gate, acc* grad_up) {
  const acc s = sigmoid(gate);
  *grad_gate = grad * up * s * (acc(1) + gate * (acc(1) - s));
  *grad_up = grad * gate * s;
}

}  // namespace moe_kernels::gemm
