// The loss-free bias update of one expert (SPEC.md section 2), shared by the CPU and CUDA
// kernels. Computed from integers: sign(mean - count) = sign(total - E * count) exactly, with
// no rounding of the mean.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace moe_kernels::balance {

enum class BiasRule : int { kSign = 0, kProportional = 1 };

// sign rule:         rate * sign(mean - count)
// proportional rule: rate * (mean - count) / mean  (no change when no token was routed)
MOE_KERNELS_HOST_DEVICE float bias_delta(int64_t total, int64_t num_experts, int64_t count,
                                         double rate, BiasRule rule) {
  const int64_t diff = total - num_experts * count;
  if (rule == BiasRule::kSign) {
    return static_cast<float>(rate) * static_cast<float>((diff > 0) - (diff < 0));
  }
  return total == 0
             ? 0.0f
             : static_cast<float>(rate * static_cast<double>(diff) / static_cast<double>(total));
}

}  // namespace moe_kernels::balance
