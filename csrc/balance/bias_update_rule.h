// The loss-free bias update of one expert (SPEC.md section 2), shared by the CPU and CUDA
// kernels. Computed from integers: sign(mean - count) = sign(total - E * count) exactly, with
// no rounding of the mean.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace moe_kernels::balance {

enum class BiasRule : int { kSign = 0, kProportional = 1 };

// sign(mean - count) = sign(total - E * count), from integers.
MOE_KERNELS_HOST_DEVICE int64_t mean_minus_count_sign(int64_t total, int64_t num_experts,
                                                      int64_t count) {
  const int64_t diff = total - num_experts * count;
  return (diff > 0) - (diff < 0);
}

// sign rule:         rate * (sign(mean - count) - sign_sum / E)
// proportional rule: rate * (mean - count) / mean  (no change when no token was routed)
// sign_sum is 0, or for a mean-centred update the sum of every expert's sign: the update then
// moves the biases' mean by nothing (the proportional rule's updates sum to zero already).
MOE_KERNELS_HOST_DEVICE float bias_delta(int64_t total, int64_t num_experts, int64_t count,
                                         double rate, BiasRule rule, int64_t sign_sum) {
  if (rule == BiasRule::kSign) {
    const double sign = static_cast<double>(mean_minus_count_sign(total, num_experts, count));
    return static_cast<float>(
        rate * (sign - static_cast<double>(sign_sum) / static_cast<double>(num_experts)));
  }
  const int64_t diff = total - num_experts * count;
  return total == 0
             ? 0.0f
             : static_cast<float>(rate * static_cast<double>(diff) / static_cast<double>(total));
}

}  // namespace moe_kernels::balance
