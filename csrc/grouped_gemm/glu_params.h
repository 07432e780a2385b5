// The parameters of the SwiGLU variants (swiglu.h has the formula), in a header of its own:
// the per-instruction-set CPU kernels include it without the host/device functions.
#pragma once

#include <limits>

namespace moe_kernels::gemm {

// g = min(gate, limit), u = clamp(up, -limit, limit), out = g * sigmoid(alpha * g) * (u + offset).
struct GluParams {
  float alpha = 1.0f;
  float limit = std::numeric_limits<float>::infinity();  // no clamp
  float up_offset = 0.0f;
};

}  // namespace moe_kernels::gemm
