// expert_histogram for CUDA tensors: checks, device guard, allocation, current stream. Compiled
// twice: for the CUDA build, and for the CPU emulator (moe_kernels.emulate()).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/dispatch.h"
#include "common/nvtx.h"
#include "device/torch_device.h"
#include "routing/histogram.h"
#include "routing/histogram_launch.h"

namespace moe_kernels::routing::MOE_KERNELS_TARGET {

at::Tensor expert_histogram_cuda(const at::Tensor& topk_ids_in, int64_t num_experts) {
  MOE_KERNELS_NVTX_RANGE("expert_histogram");
  check_expert_histogram_args(topk_ids_in, num_experts);
  TORCH_CHECK(num_experts <= kMaxHistogramExperts, "num_experts must be <= ", kMaxHistogramExperts,
              " on CUDA, got ", num_experts);
  const device::DeviceGuard guard(topk_ids_in.device());
  const at::Tensor topk_ids = topk_ids_in.contiguous();
  auto counts = at::zeros({num_experts}, topk_ids.options().dtype(at::kLong));
  MOE_KERNELS_DISPATCH_INDEX(topk_ids.scalar_type(), "expert_histogram_cuda", [&] {
    device::check_launch(launch_expert_histogram<index_t>(
        topk_ids.const_data_ptr<index_t>(), topk_ids.numel(), num_experts,
        counts.mutable_data_ptr<int64_t>(), device::current_stream()));
  });
  return counts;
}

}  // namespace moe_kernels::routing::MOE_KERNELS_TARGET

#if !defined(MOE_KERNELS_EMULATOR)
TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) {
  m.impl("expert_histogram", &moe_kernels::routing::cuda::expert_histogram_cuda);
}
#endif
