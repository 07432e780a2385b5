// biased_topk on the CPU: score function, loss-free bias, group-limited top-k, unbiased
// weights and the per-expert histogram in one pass over each token's logits (SPEC.md section 1).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <numeric>
#include <tuple>
#include <vector>

#include "common/dispatch.h"
#include "common/nvtx.h"
#include "common/optional_tensor.h"
#include "emu/cpu_or_emulated.h"
#include "routing/histogram_cpu.h"
#include "routing/routing_params.h"
#include "routing/score_fn.h"

namespace moe_kernels::routing {
namespace {

// Enough tokens per parallel chunk that scheduling costs little next to the work.
int64_t token_grain(int64_t num_experts) { return std::max<int64_t>(1, 16384 / num_experts); }

template <typename scalar_t, typename acc_t>
void compute_scores(const scalar_t* logits, int64_t num_experts, ScoreFn score_fn, acc_t* scores) {
  if (score_fn != ScoreFn::kSoftmax) {
    for (int64_t e = 0; e < num_experts; ++e) {
      scores[e] = elementwise_score(score_fn, static_cast<acc_t>(logits[e]));
    }
    return;
  }
  // std::max skips a NaN here, and the NaN then reaches every score through the sum, as in
  // torch.softmax.
  acc_t max_logit = -std::numeric_limits<acc_t>::infinity();
  for (int64_t e = 0; e < num_experts; ++e) max_logit = std::max(max_logit, acc_t(logits[e]));
  acc_t sum = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    scores[e] = std::exp(static_cast<acc_t>(logits[e]) - max_logit);
    sum += scores[e];
  }
  for (int64_t e = 0; e < num_experts; ++e) scores[e] /= sum;
}

// Descending choice, ties to the lower index: the same order on every backend.
template <typename acc_t>
struct ByChoice {
  const acc_t* choice;
  bool operator()(int64_t a, int64_t b) const {
    return choice[a] > choice[b] || (choice[a] == choice[b] && a < b);
  }
};

template <typename acc_t>
struct TokenScratch {
  explicit TokenScratch(const RoutingParams& p)
      : scores(p.num_experts),
        choice(p.num_experts),
        group_scores(p.n_groups),
        group_values(p.experts_per_group),
        groups(p.n_groups),
        candidates(p.num_experts) {}
  std::vector<acc_t> scores, choice, group_scores, group_values;
  std::vector<int64_t> groups, candidates;
};

// Fills ids[0..k) with the chosen experts of one token, best first. Under group-limited routing
// the experts outside the kept groups are never candidates: the SPEC's "-inf" mask, without
// the risk of a masked expert winning a tie.
template <typename acc_t>
void select_experts(const RoutingParams& p, TokenScratch<acc_t>& s, int64_t* ids) {
  const int64_t E = p.num_experts;
  int64_t num_candidates = E;
  if (p.n_groups == 1) {
    std::iota(s.candidates.begin(), s.candidates.end(), int64_t{0});
  } else {
    const int64_t epg = p.experts_per_group;
    for (int64_t g = 0; g < p.n_groups; ++g) {
      std::copy_n(s.choice.begin() + g * epg, epg, s.group_values.begin());
      std::partial_sort(s.group_values.begin(), s.group_values.begin() + p.group_score_size,
                        s.group_values.end(), std::greater<acc_t>());
      acc_t sum = 0;
      for (int64_t i = 0; i < p.group_score_size; ++i) sum += s.group_values[i];
      s.group_scores[g] = sum;
    }
    std::iota(s.groups.begin(), s.groups.end(), int64_t{0});
    std::partial_sort(s.groups.begin(), s.groups.begin() + p.topk_groups, s.groups.end(),
                      ByChoice<acc_t>{s.group_scores.data()});
    num_candidates = 0;
    for (int64_t i = 0; i < p.topk_groups; ++i) {
      for (int64_t e = 0; e < epg; ++e) s.candidates[num_candidates++] = s.groups[i] * epg + e;
    }
  }
  std::partial_sort(s.candidates.begin(), s.candidates.begin() + p.topk,
                    s.candidates.begin() + num_candidates, ByChoice<acc_t>{s.choice.data()});
  std::copy_n(s.candidates.begin(), p.topk, ids);
}

template <typename scalar_t>
void biased_topk_kernel(const RoutingParams& p, const at::Tensor& logits, const float* bias,
                        const bool* token_mask, at::Tensor& weights, at::Tensor& ids,
                        at::Tensor& counts) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* logits_ptr = logits.const_data_ptr<scalar_t>();
  acc_t* weights_ptr = weights.mutable_data_ptr<acc_t>();
  int64_t* ids_ptr = ids.mutable_data_ptr<int64_t>();
  int64_t* counts_ptr = counts.mutable_data_ptr<int64_t>();
  std::mutex merge_mutex;

  at::parallel_for(0, p.num_tokens, token_grain(p.num_experts), [&](int64_t begin, int64_t end) {
    TokenScratch<acc_t> s(p);
    ChunkHistogram histogram(p.num_experts);
    for (int64_t t = begin; t < end; ++t) {
      compute_scores(logits_ptr + t * p.num_experts, p.num_experts, p.score_fn, s.scores.data());
      for (int64_t e = 0; e < p.num_experts; ++e) {
        const acc_t chosen_on = p.choose_on_logits
                                    ? static_cast<acc_t>(logits_ptr[t * p.num_experts + e])
                                    : s.scores[e];
        const acc_t c = chosen_on + (bias ? static_cast<acc_t>(bias[e]) : acc_t(0));
        s.choice[e] = std::isnan(c) ? -std::numeric_limits<acc_t>::infinity() : c;
      }
      int64_t* token_ids = ids_ptr + t * p.topk;
      acc_t* token_weights = weights_ptr + t * p.topk;
      select_experts(p, s, token_ids);
      const bool counted = token_mask == nullptr || token_mask[t];
      acc_t sum = 0;
      for (int64_t j = 0; j < p.topk; ++j) {
        token_weights[j] = s.scores[token_ids[j]];
        sum += token_weights[j];
        if (counted) histogram.add(token_ids[j]);
      }
      const acc_t divisor = p.scaling.divisor(sum);
      for (int64_t j = 0; j < p.topk; ++j) {
        token_weights[j] = p.scaling.weight(token_weights[j], divisor);
      }
    }
    histogram.merge_into(counts_ptr, merge_mutex);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> biased_topk_cpu(
    const at::Tensor& logits_in, const std::optional<at::Tensor>& bias_in, int64_t k,
    c10::string_view score_fn, int64_t n_groups, int64_t topk_groups, bool normalize, double scale,
    c10::string_view group_score, const std::optional<at::Tensor>& token_mask_in, double norm_eps,
    double norm_min, c10::string_view choose_on) {
  MOE_KERNELS_NVTX_RANGE("biased_topk");
  const RoutingParams p =
      check_biased_topk_args(logits_in, bias_in, k, score_fn, n_groups, topk_groups, normalize,
                             scale, group_score, token_mask_in, norm_eps, norm_min, choose_on);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor bias = optional_contiguous(bias_in);
  const at::Tensor token_mask = optional_contiguous(token_mask_in);
  auto [weights, ids, counts] = empty_routing_outputs(logits, p);
  MOE_KERNELS_DISPATCH_FLOATING(logits.scalar_type(), "biased_topk_cpu", [&] {
    biased_topk_kernel<scalar_t>(p, logits, optional_data<float>(bias),
                                 optional_data<bool>(token_mask), weights, ids, counts);
  });
  return {weights, ids, counts};
}

// d(loss)/d(logits) given d(loss)/d(topk_weights). With u the divisor (WeightScaling) and
// w_j = scale * s_j / u: dL/ds_j = scale / u * (g_j - [u follows the sum] * sum_i g_i s_i / u),
// then through the score function (sparse for sigmoid, a full-row Jacobian for softmax).
template <typename scalar_t, typename weight_t>
void biased_topk_backward_kernel(const at::Tensor& grad_weights, const at::Tensor& logits,
                                 const at::Tensor& ids, ScoreFn score_fn,
                                 const WeightScaling& scaling, at::Tensor& grad_logits) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = logits.size(0), E = logits.size(1), K = ids.size(1);
  const scalar_t* logits_ptr = logits.const_data_ptr<scalar_t>();
  const weight_t* grad_w_ptr = grad_weights.const_data_ptr<weight_t>();
  const int64_t* ids_ptr = ids.const_data_ptr<int64_t>();
  scalar_t* out_ptr = grad_logits.mutable_data_ptr<scalar_t>();

  at::parallel_for(0, T, token_grain(E), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scores(E), grad_scores(E);
    for (int64_t t = begin; t < end; ++t) {
      compute_scores(logits_ptr + t * E, E, score_fn, scores.data());
      std::fill(grad_scores.begin(), grad_scores.end(), acc_t(0));
      const int64_t* token_ids = ids_ptr + t * K;
      const weight_t* g = grad_w_ptr + t * K;
      acc_t sum = 0, dot = 0;
      for (int64_t j = 0; j < K; ++j) {
        sum += scores[token_ids[j]];
        dot += static_cast<acc_t>(g[j]) * scores[token_ids[j]];
      }
      const acc_t u = scaling.divisor(sum);
      if (u != acc_t(0)) {  // a zero sum leaves the weights constant at zero
        const acc_t correction = scaling.follows_sum(sum) ? dot / u : acc_t(0);
        for (int64_t j = 0; j < K; ++j) {
          grad_scores[token_ids[j]] +=
              static_cast<acc_t>(scaling.scale) / u * (static_cast<acc_t>(g[j]) - correction);
        }
      }
      const scalar_t* row = logits_ptr + t * E;
      scalar_t* out = out_ptr + t * E;
      if (score_fn != ScoreFn::kSoftmax) {
        for (int64_t e = 0; e < E; ++e) {
          out[e] = grad_scores[e] *
                   elementwise_score_grad(score_fn, static_cast<acc_t>(row[e]), scores[e]);
        }
      } else {
        acc_t inner = 0;
        for (int64_t e = 0; e < E; ++e) inner += grad_scores[e] * scores[e];
        for (int64_t e = 0; e < E; ++e) out[e] = scores[e] * (grad_scores[e] - inner);
      }
    }
  });
}

at::Tensor biased_topk_backward_cpu(const at::Tensor& grad_weights_in, const at::Tensor& logits_in,
                                    const at::Tensor& ids_in, c10::string_view score_fn,
                                    bool normalize, double scale, double norm_eps,
                                    double norm_min) {
  MOE_KERNELS_NVTX_RANGE("biased_topk_backward");
  const auto [fn, scaling] = check_biased_topk_backward_args(
      grad_weights_in, logits_in, ids_in, score_fn, normalize, scale, norm_eps, norm_min);
  check_index_range(ids_in, logits_in.size(1), "topk_ids", "num_experts");
  const at::Tensor ids = ids_in.to(at::kLong).contiguous();
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor grad_weights = grad_weights_in.contiguous();
  auto grad_logits = at::empty_like(logits);
  MOE_KERNELS_DISPATCH_FLOATING(logits.scalar_type(), "biased_topk_backward_cpu", [&] {
    using weight_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    biased_topk_backward_kernel<scalar_t, weight_t>(grad_weights, logits, ids, fn, scaling,
                                                    grad_logits);
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_kernels, CPU, m) {
  emu::impl_cpu_or_emulated<&biased_topk_cpu, &emulated::biased_topk_cuda>(m, "biased_topk");
  emu::impl_cpu_or_emulated<&biased_topk_backward_cpu, &emulated::biased_topk_backward_cuda>(
      m, "biased_topk_backward");
}

}  // namespace moe_kernels::routing
