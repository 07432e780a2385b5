// biased_topk and its backward for CUDA tensors: checks, device guard, allocation, current
// stream; no host synchronisation. Compiled twice: for the CUDA build, and for the CPU emulator
// (moe_kernels.emulate()).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/dispatch.h"
#include "common/nvtx.h"
#include "common/optional_tensor.h"
#include "device/torch_device.h"
#include "routing/routing_launch.h"
#include "routing/routing_params.h"

namespace moe_kernels::routing::MOE_KERNELS_TARGET {

namespace {

void check_device_limits(int64_t num_experts, int64_t n_groups) {
  TORCH_CHECK(num_experts <= kMaxRoutingExperts,
              "num_experts (logits.size(1)) must be <= ", kMaxRoutingExperts, " on CUDA, got ",
              num_experts);
  TORCH_CHECK(n_groups <= kMaxRoutingGroups, "n_groups must be <= ", kMaxRoutingGroups,
              " on CUDA, got ", n_groups);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> biased_topk_cuda(
    const at::Tensor& logits_in, const std::optional<at::Tensor>& bias_in, int64_t k,
    c10::string_view score_fn, int64_t n_groups, int64_t topk_groups, bool normalize, double scale,
    c10::string_view group_score, const std::optional<at::Tensor>& token_mask_in, double norm_eps,
    double norm_min, c10::string_view choose_on) {
  MOE_KERNELS_NVTX_RANGE("biased_topk");
  const RoutingParams p =
      check_biased_topk_args(logits_in, bias_in, k, score_fn, n_groups, topk_groups, normalize,
                             scale, group_score, token_mask_in, norm_eps, norm_min, choose_on);
  check_device_limits(p.num_experts, p.n_groups);
  const device::DeviceGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor bias = optional_contiguous(bias_in);
  const at::Tensor token_mask = optional_contiguous(token_mask_in);
  auto [weights, ids, counts] = empty_routing_outputs(logits, p);
  MOE_KERNELS_DISPATCH_FLOATING(logits.scalar_type(), "biased_topk_cuda", [&] {
    device::check_launch(launch_biased_topk(
        device::device_ptr<scalar_t>(logits), optional_data<float>(bias),
        optional_data<bool>(token_mask), p, weights.mutable_data_ptr<at::opmath_type<scalar_t>>(),
        ids.mutable_data_ptr<int64_t>(), counts.mutable_data_ptr<int64_t>(),
        device::current_stream()));
  });
  return {weights, ids, counts};
}

at::Tensor biased_topk_backward_cuda(const at::Tensor& grad_weights_in, const at::Tensor& logits_in,
                                     const at::Tensor& ids_in, c10::string_view score_fn,
                                     bool normalize, double scale, double norm_eps,
                                     double norm_min) {
  MOE_KERNELS_NVTX_RANGE("biased_topk_backward");
  const auto [fn, scaling] = check_biased_topk_backward_args(
      grad_weights_in, logits_in, ids_in, score_fn, normalize, scale, norm_eps, norm_min);
  check_device_limits(logits_in.size(1), 1);
  const device::DeviceGuard guard(logits_in.device());
  const at::Tensor ids = ids_in.to(at::kLong).contiguous();
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor grad_weights = grad_weights_in.contiguous();
  auto grad_logits = at::empty_like(logits);
  MOE_KERNELS_DISPATCH_FLOATING(logits.scalar_type(), "biased_topk_backward_cuda", [&] {
    device::check_launch(launch_biased_topk_backward(
        grad_weights.const_data_ptr<at::opmath_type<scalar_t>>(),
        device::device_ptr<scalar_t>(logits), ids.const_data_ptr<int64_t>(), logits.size(0),
        logits.size(1), ids.size(1), fn, scaling, device::mutable_device_ptr<scalar_t>(grad_logits),
        device::current_stream()));
  });
  return grad_logits;
}

}  // namespace moe_kernels::routing::MOE_KERNELS_TARGET

#if !defined(MOE_KERNELS_EMULATOR)
TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) {
  m.impl("biased_topk", &moe_kernels::routing::cuda::biased_topk_cuda);
  m.impl("biased_topk_backward", &moe_kernels::routing::cuda::biased_topk_backward_cuda);
}
#endif
