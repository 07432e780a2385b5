// The libm functions (and the sigmoid) the kernels' arithmetic needs, for float and double alike,
// on every backend: CUDA's device functions in kernels, the host's libm on the CPU and the
// emulator.
#pragma once

#include <math.h>

#include "common/host_device.h"

namespace moe_kernels {

MOE_KERNELS_HOST_DEVICE float exp_of(float x) { return ::expf(x); }
MOE_KERNELS_HOST_DEVICE double exp_of(double x) { return ::exp(x); }
MOE_KERNELS_HOST_DEVICE float log1p_of(float x) { return ::log1pf(x); }
MOE_KERNELS_HOST_DEVICE double log1p_of(double x) { return ::log1p(x); }
MOE_KERNELS_HOST_DEVICE float sqrt_of(float x) { return ::sqrtf(x); }
MOE_KERNELS_HOST_DEVICE double sqrt_of(double x) { return ::sqrt(x); }

template <typename acc>
MOE_KERNELS_HOST_DEVICE acc sigmoid_of(acc x) {
  return acc(1) / (acc(1) + exp_of(-x));
}

}  // namespace moe_kernels
