// Torch-free entry points of the device routing kernels: pointers, sizes, a stream.
#pragma once

#include <cstdint>

#include "device/runtime_api.h"
#include "device/types.h"
#include "routing/routing_types.h"

namespace moe_kernels::routing::MOE_KERNELS_TARGET {

// The kernels keep one token's experts in the registers of a warp (16 per lane) and its group
// scores too (2 per lane).
constexpr int64_t kMaxRoutingExperts = 512;
constexpr int64_t kMaxRoutingGroups = 64;

// weights and ids [T, k]; counts [E] int64, zeroed by the caller (the kernel adds to it), of the
// tokens whose token_mask is true (every token when it is null).
template <typename scalar_t>
cudaError_t launch_biased_topk(const scalar_t* logits, const float* bias, const bool* token_mask,
                               const RoutingParams& p, device::acc_t<scalar_t>* weights,
                               int64_t* ids, int64_t* counts, cudaStream_t stream);

// grad_logits [T, E] from grad_weights [T, k] (fp32, fp64 for fp64 logits) and ids [T, k].
template <typename scalar_t>
cudaError_t launch_biased_topk_backward(const device::acc_t<scalar_t>* grad_weights,
                                        const scalar_t* logits, const int64_t* ids,
                                        int64_t num_tokens, int64_t num_experts, int64_t topk,
                                        ScoreFn score_fn, const WeightScaling& scaling,
                                        scalar_t* grad_logits, cudaStream_t stream);

}  // namespace moe_kernels::routing::MOE_KERNELS_TARGET
