// The elementwise score functions of biased_topk and their derivatives, in the accumulator type:
// one definition for the CPU kernel, the CUDA kernels and the emulator. Softmax, a function of
// the whole row, is written in each kernel.
#pragma once

#include "common/host_device.h"
#include "common/math.h"
#include "routing/routing_types.h"

namespace moe_kernels::routing {

// sqrt(softplus(x)) (DeepSeek-V4), softplus as torch computes it: x itself above 20.
template <typename acc_t>
MOE_KERNELS_HOST_DEVICE acc_t sqrt_softplus_of(acc_t x) {
  return sqrt_of(x > acc_t(20) ? x : log1p_of(exp_of(x)));
}

// The score of logit x under an elementwise score function (not softmax).
template <typename acc_t>
MOE_KERNELS_HOST_DEVICE acc_t elementwise_score(ScoreFn score_fn, acc_t x) {
  return score_fn == ScoreFn::kSigmoid ? sigmoid_of(x) : sqrt_softplus_of(x);
}

// d(score)/dx from the logit x and its score s: s (1 - s) for sigmoid; sigmoid(x) / (2 s) for
// sqrtsoftplus (softplus' = sigmoid), and 0 where s is 0, its limit as x goes to -inf.
template <typename acc_t>
MOE_KERNELS_HOST_DEVICE acc_t elementwise_score_grad(ScoreFn score_fn, acc_t x, acc_t s) {
  if (score_fn == ScoreFn::kSigmoid) return s * (acc_t(1) - s);
  return s == acc_t(0) ? acc_t(0) : sigmoid_of(x) / (acc_t(2) * s);
}

}  // namespace moe_kernels::routing
