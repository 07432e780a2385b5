#include <type_traits>

#include "device/launch.h"
#include "routing/routing_kernels.cuh"
#include "routing/routing_launch.h"

namespace moe_kernels::routing::MOE_KERNELS_TARGET {
namespace {

// Calls f(std::integral_constant<int, kSlots>) with the fewest slots (a power of two) that hold
// num_experts experts per warp.
template <typename F>
cudaError_t with_slots(int64_t num_experts, F&& f) {
  const int64_t slots = (num_experts + kWarpSize - 1) / kWarpSize;
  if (slots <= 1) return f(std::integral_constant<int, 1>{});
  if (slots <= 2) return f(std::integral_constant<int, 2>{});
  if (slots <= 4) return f(std::integral_constant<int, 4>{});
  if (slots <= 8) return f(std::integral_constant<int, 8>{});
  static_assert(kMaxRoutingExperts == kMaxSlots * kWarpSize && kMaxRoutingGroups == kMaxGroups);
  return f(std::integral_constant<int, kMaxSlots>{});
}

// One warp per token in flight; a few blocks per SM are enough for this latency-bound work and
// keep the per-block histogram flush (E atomics per block) cheap.
cudaError_t token_grid(int64_t num_tokens, size_t shared_bytes, device::LaunchConfig* config) {
  *config = device::LaunchConfig{dim3(1), dim3(kRoutingWarps * kWarpSize), shared_bytes};
  return device::grid_stride_blocks(num_tokens, kRoutingWarps, 8, &config->grid);
}

}  // namespace

template <typename scalar_t>
cudaError_t launch_biased_topk(const scalar_t* logits, const float* bias, const bool* token_mask,
                               const RoutingParams& p, device::acc_t<scalar_t>* weights,
                               int64_t* ids, int64_t* counts, cudaStream_t stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  device::LaunchConfig config;
  const size_t shared =
      routing_shared_bytes<device::acc_t<scalar_t>>(p.num_experts, p.n_groups > 1);
  if (cudaError_t err = token_grid(p.num_tokens, shared, &config); err != cudaSuccess) return err;
  return with_slots(p.num_experts, [&](auto slots) {
    return device::launch<biased_topk_kernel<scalar_t, decltype(slots)::value>>(
        config, stream, logits, bias, token_mask, p, weights, ids,
        reinterpret_cast<unsigned long long*>(counts));
  });
}

template <typename scalar_t>
cudaError_t launch_biased_topk_backward(const device::acc_t<scalar_t>* grad_weights,
                                        const scalar_t* logits, const int64_t* ids,
                                        int64_t num_tokens, int64_t num_experts, int64_t topk,
                                        ScoreFn score_fn, const WeightScaling& scaling,
                                        scalar_t* grad_logits, cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  device::LaunchConfig config;
  const size_t shared = routing_backward_shared_bytes<device::acc_t<scalar_t>>(num_experts);
  if (cudaError_t err = token_grid(num_tokens, shared, &config); err != cudaSuccess) return err;
  return with_slots(num_experts, [&](auto slots) {
    return device::launch<biased_topk_backward_kernel<scalar_t, decltype(slots)::value>>(
        config, stream, grad_weights, logits, ids, num_tokens, static_cast<int>(num_experts),
        static_cast<int>(topk), score_fn, scaling, grad_logits);
  });
}

#define MOE_KERNELS_INSTANTIATE_ROUTING(scalar_t)                                                 \
  template cudaError_t launch_biased_topk<scalar_t>(                                              \
      const scalar_t*, const float*, const bool*, const RoutingParams&, device::acc_t<scalar_t>*, \
      int64_t*, int64_t*, cudaStream_t);                                                          \
  template cudaError_t launch_biased_topk_backward<scalar_t>(                                     \
      const device::acc_t<scalar_t>*, const scalar_t*, const int64_t*, int64_t, int64_t, int64_t, \
      ScoreFn, const WeightScaling&, scalar_t*, cudaStream_t);
MOE_KERNELS_INSTANTIATE_ROUTING(float)
MOE_KERNELS_INSTANTIATE_ROUTING(double)
MOE_KERNELS_INSTANTIATE_ROUTING(device::bf16)
MOE_KERNELS_INSTANTIATE_ROUTING(device::fp16)

}  // namespace moe_kernels::routing::MOE_KERNELS_TARGET
