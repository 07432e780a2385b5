// update_bias on the CPU: the loss-free balancing step, in place on the fp32 bias.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "balance/bias_update.h"
#include "common/dispatch.h"
#include "common/nvtx.h"
#include "emu/cpu_or_emulated.h"

namespace moe_kernels::balance {
namespace {

void update_bias_cpu(const at::Tensor& bias, const at::Tensor& tokens_per_expert_in, double rate,
                     c10::string_view rule_name, bool centered) {
  MOE_KERNELS_NVTX_RANGE("update_bias");
  const BiasRule rule = check_update_bias_args(bias, tokens_per_expert_in, rate, rule_name);
  const at::Tensor counts = tokens_per_expert_in.to(at::kLong).contiguous();
  const int64_t num_experts = bias.size(0);
  const int64_t* c = counts.const_data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    TORCH_CHECK(c[e] >= 0, "tokens_per_expert must be >= 0, got ", c[e], " for expert ", e);
    total += c[e];
  }
  int64_t sign_sum = 0;
  for (int64_t e = 0; centered && e < num_experts; ++e) {
    sign_sum += mean_minus_count_sign(total, num_experts, c[e]);
  }
  float* b = bias.mutable_data_ptr<float>();
  for (int64_t e = 0; e < num_experts; ++e)
    b[e] += bias_delta(total, num_experts, c[e], rate, rule, sign_sum);
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_kernels, CPU, m) {
  emu::impl_cpu_or_emulated<&update_bias_cpu, &emulated::update_bias_cuda>(m, "update_bias");
}

}  // namespace moe_kernels::balance
