// The parameters of biased_topk as plain values: torch-free, so the CPU kernel, the CUDA kernels
// and the emulator all take the same struct (SPEC.md section 1).
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace moe_kernels::routing {

enum class ScoreFn { kSigmoid, kSoftmax, kSqrtSoftplus };

// How a token's k weights come from its k scores: w_j = scale * s_j / divisor. Normalised, the
// divisor is max(sum_j s_j + norm_eps, norm_min) (AFMoE and LFM2 add an epsilon to the sum, ERNIE
// floors it); else 1.
struct WeightScaling {
  bool normalize;
  double norm_eps;
  double norm_min;
  double scale;

  // The divisor of the scores; 0 where the k scores (never negative) are all 0 and nothing
  // offsets their sum, whose weights stay 0. NaN where the sum is.
  template <typename acc_t>
  MOE_KERNELS_HOST_DEVICE acc_t divisor(acc_t sum) const {
    if (!normalize) return acc_t(1);
    const acc_t shifted = sum + static_cast<acc_t>(norm_eps);
    return shifted < static_cast<acc_t>(norm_min) ? static_cast<acc_t>(norm_min) : shifted;
  }

  // Whether the divisor moves with the sum, so that the weights' gradient flows through it.
  template <typename acc_t>
  MOE_KERNELS_HOST_DEVICE bool follows_sum(acc_t sum) const {
    return normalize && !(sum + static_cast<acc_t>(norm_eps) < static_cast<acc_t>(norm_min));
  }

  template <typename acc_t>
  MOE_KERNELS_HOST_DEVICE acc_t weight(acc_t score, acc_t divisor) const {
    return divisor != acc_t(0) ? score / divisor * static_cast<acc_t>(scale) : acc_t(0);
  }
};

struct RoutingParams {
  int64_t num_tokens;
  int64_t num_experts;
  int64_t topk;
  int64_t n_groups;
  int64_t topk_groups;
  int64_t experts_per_group;
  // How many of a group's best choice values sum to its score: DeepSeek-V3's "top2" rule sums
  // min(2, E/G); Megatron-Core's "topk_per_group" sums k / topk_groups.
  int64_t group_score_size;
  ScoreFn score_fn;
  // The choice adds the bias to the logits rather than the scores (Kolibri-1); the weights are
  // the scores either way.
  bool choose_on_logits;
  WeightScaling scaling;
};

}  // namespace moe_kernels::routing
