// The parameters of biased_topk as plain values: torch-free, so the CPU kernel, the CUDA kernels
// and the emulator all take the same struct (SPEC.md section 1).
#pragma once

#include <cstdint>

namespace moe_kernels::routing {

enum class ScoreFn { kSigmoid, kSoftmax, kSqrtSoftplus };

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
  bool normalize;
  double scale;
};

}  // namespace moe_kernels::routing
