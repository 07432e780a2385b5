// The argument checks of biased_topk and its backward, shared by every backend (SPEC.md
// section 1).
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <optional>
#include <string_view>
#include <tuple>
#include <utility>

#include "common/checks.h"
#include "common/dispatch.h"
#include "routing/routing_types.h"

namespace moe_kernels::routing {

inline ScoreFn parse_score_fn(std::string_view score_fn) {
  check_choice(score_fn, {"sigmoid", "softmax", "sqrtsoftplus"}, "score_fn");
  if (score_fn == "sigmoid") return ScoreFn::kSigmoid;
  return score_fn == "softmax" ? ScoreFn::kSoftmax : ScoreFn::kSqrtSoftplus;
}

inline WeightScaling check_weight_scaling(bool normalize, double scale, double norm_eps,
                                          double norm_min) {
  check_finite(scale, "scale");
  TORCH_CHECK(std::isfinite(norm_eps) && norm_eps >= 0, "norm_eps must be finite and >= 0, got ",
              norm_eps);
  TORCH_CHECK(std::isfinite(norm_min) && norm_min >= 0, "norm_min must be finite and >= 0, got ",
              norm_min);
  return WeightScaling{normalize, norm_eps, norm_min, scale};
}

inline RoutingParams check_biased_topk_args(
    const at::Tensor& logits, const std::optional<at::Tensor>& bias, int64_t k,
    std::string_view score_fn, int64_t n_groups, int64_t topk_groups, bool normalize, double scale,
    std::string_view group_score, const std::optional<at::Tensor>& token_mask, double norm_eps,
    double norm_min, std::string_view choose_on) {
  check_dim(logits, 2, "logits");
  check_floating(logits, "logits");
  const int64_t num_experts = logits.size(1);
  TORCH_CHECK(num_experts >= 1, "logits must have at least one expert column, got shape ",
              logits.sizes());
  if (bias.has_value()) {
    check_dim(*bias, 1, "bias");
    check_dtype(*bias, at::kFloat, "bias");
    check_same_device(*bias, logits, "bias", "logits");
    check_size(*bias, 0, num_experts, "bias", "num_experts");
  }
  TORCH_CHECK(k >= 1 && k <= num_experts, "k must be in [1, num_experts=", num_experts, "], got ",
              k);
  TORCH_CHECK(n_groups >= 1 && num_experts % n_groups == 0, "n_groups must be >= 1 and divide ",
              "num_experts=", num_experts, ", got ", n_groups);
  TORCH_CHECK(topk_groups >= 1 && topk_groups <= n_groups,
              "topk_groups must be in [1, n_groups=", n_groups, "], got ", topk_groups);
  const int64_t experts_per_group = num_experts / n_groups;
  TORCH_CHECK(topk_groups * experts_per_group >= k,
              "topk_groups * (num_experts / n_groups) = ", topk_groups * experts_per_group,
              " must be >= k=", k, " (too few experts left to choose from)");
  if (token_mask.has_value()) {
    check_dim(*token_mask, 1, "token_mask");
    check_dtype(*token_mask, at::kBool, "token_mask");
    check_same_device(*token_mask, logits, "token_mask", "logits");
    check_size(*token_mask, 0, logits.size(0), "token_mask", "num_tokens");
  }
  const WeightScaling scaling = check_weight_scaling(normalize, scale, norm_eps, norm_min);
  check_choice(group_score, {"top2", "topk_per_group", "max"}, "group_score");
  check_choice(choose_on, {"scores", "logits"}, "choose_on");
  int64_t group_score_size = group_score == "max" ? 1 : std::min<int64_t>(2, experts_per_group);
  if (group_score == "topk_per_group") {
    TORCH_CHECK(k % topk_groups == 0, "group_score='topk_per_group' needs topk_groups to divide ",
                "k=", k, ", got topk_groups=", topk_groups);
    group_score_size = k / topk_groups;
  }
  return RoutingParams{logits.size(0),
                       num_experts,
                       k,
                       n_groups,
                       topk_groups,
                       experts_per_group,
                       group_score_size,
                       parse_score_fn(score_fn),
                       choose_on == "logits",
                       scaling};
}

// biased_topk's outputs on the device of logits: weights [T, k] in opmath (fp32, fp64 for fp64),
// ids [T, k] int64, and zeroed counts [E] int64 that the kernels add to.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_routing_outputs(
    const at::Tensor& logits, const RoutingParams& p) {
  return {
      at::empty({p.num_tokens, p.topk}, logits.options().dtype(opmath_dtype(logits.scalar_type()))),
      at::empty({p.num_tokens, p.topk}, logits.options().dtype(at::kLong)),
      at::zeros({p.num_experts}, logits.options().dtype(at::kLong))};
}

// Checks of biased_topk_backward; the range of topk_ids is checked by the CPU op only (on CUDA it
// would synchronise the host, and the kernel skips ids outside [0, E) instead).
inline std::pair<ScoreFn, WeightScaling> check_biased_topk_backward_args(
    const at::Tensor& grad_weights, const at::Tensor& logits, const at::Tensor& topk_ids,
    std::string_view score_fn, bool normalize, double scale, double norm_eps, double norm_min) {
  check_dim(logits, 2, "logits");
  check_floating(logits, "logits");
  check_dim(topk_ids, 2, "topk_ids");
  check_integer(topk_ids, "topk_ids");
  check_size(topk_ids, 0, logits.size(0), "topk_ids", "num_tokens");
  check_dim(grad_weights, 2, "grad_weights");
  check_dtype(grad_weights, opmath_dtype(logits.scalar_type()), "grad_weights");
  TORCH_CHECK(grad_weights.sizes() == topk_ids.sizes(), "grad_weights must have the shape of ",
              "topk_ids ", topk_ids.sizes(), ", got ", grad_weights.sizes());
  check_same_device(topk_ids, logits, "topk_ids", "logits");
  check_same_device(grad_weights, logits, "grad_weights", "logits");
  return {parse_score_fn(score_fn), check_weight_scaling(normalize, scale, norm_eps, norm_min)};
}

namespace emulated {
// The CUDA ops run on the CPU emulator (routing_cuda.cpp compiled for it).
std::tuple<at::Tensor, at::Tensor, at::Tensor> biased_topk_cuda(
    const at::Tensor& logits, const std::optional<at::Tensor>& bias, int64_t k,
    c10::string_view score_fn, int64_t n_groups, int64_t topk_groups, bool normalize, double scale,
    c10::string_view group_score, const std::optional<at::Tensor>& token_mask, double norm_eps,
    double norm_min, c10::string_view choose_on);
at::Tensor biased_topk_backward_cuda(const at::Tensor& grad_weights, const at::Tensor& logits,
                                     const at::Tensor& topk_ids, c10::string_view score_fn,
                                     bool normalize, double scale, double norm_eps,
                                     double norm_min);
}  // namespace emulated

}  // namespace moe_kernels::routing
