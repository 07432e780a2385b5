// update_bias's argument checks, shared by the CPU and CUDA ops.
#pragma once

#include <string_view>

#include "balance/bias_update_rule.h"
#include "common/checks.h"

namespace moe_kernels::balance {

inline BiasRule check_update_bias_args(const at::Tensor& bias, const at::Tensor& tokens_per_expert,
                                       double rate, std::string_view rule) {
  check_dim(bias, 1, "bias");
  check_dtype(bias, at::kFloat, "bias");
  TORCH_CHECK(bias.is_contiguous(), "bias must be contiguous (it is updated in place)");
  check_dim(tokens_per_expert, 1, "tokens_per_expert");
  check_integer(tokens_per_expert, "tokens_per_expert");
  check_size(tokens_per_expert, 0, bias.size(0), "tokens_per_expert", "bias.size(0)");
  check_same_device(tokens_per_expert, bias, "tokens_per_expert", "bias");
  check_finite(rate, "rate");
  TORCH_CHECK(rate >= 0, "rate must be >= 0, got ", rate);
  check_choice(rule, {"sign", "proportional"}, "rule");
  return rule == "sign" ? BiasRule::kSign : BiasRule::kProportional;
}

namespace emulated {
// The CUDA op run on the CPU emulator (bias_update_cuda.cpp compiled for it).
void update_bias_cuda(const at::Tensor& bias, const at::Tensor& tokens_per_expert, double rate,
                      c10::string_view rule, bool centered);
}  // namespace emulated

}  // namespace moe_kernels::balance
