// update_bias for CUDA tensors: checks, device guard, current stream; no host synchronisation.
// Compiled twice: for the CUDA build, and for the CPU emulator (moe_kernels.emulate()).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "balance/bias_update.h"
#include "balance/bias_update_launch.h"
#include "common/dispatch.h"
#include "common/nvtx.h"
#include "device/torch_device.h"

namespace moe_kernels::balance::MOE_KERNELS_TARGET {

void update_bias_cuda(const at::Tensor& bias, const at::Tensor& tokens_per_expert_in, double rate,
                      c10::string_view rule_name, bool centered) {
  MOE_KERNELS_NVTX_RANGE("update_bias");
  const BiasRule rule = check_update_bias_args(bias, tokens_per_expert_in, rate, rule_name);
  const device::DeviceGuard guard(bias.device());
  const at::Tensor counts = tokens_per_expert_in.contiguous();
  MOE_KERNELS_DISPATCH_INDEX(counts.scalar_type(), "update_bias_cuda", [&] {
    device::check_launch(launch_update_bias<index_t>(
        bias.mutable_data_ptr<float>(), counts.const_data_ptr<index_t>(), bias.size(0), rate, rule,
        centered, device::current_stream()));
  });
}

}  // namespace moe_kernels::balance::MOE_KERNELS_TARGET

#if !defined(MOE_KERNELS_EMULATOR)
TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) {
  m.impl("update_bias", &moe_kernels::balance::cuda::update_bias_cuda);
}
#endif
