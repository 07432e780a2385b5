// biased_topk and its backward on the GPU (SPEC.md section 1). Torch-free: compiled by nvcc, and
// by the CPU emulator.
//
// One warp routes one token at a time. Lane l holds experts l, l + 32, ... in kSlots registers
// (coalesced loads; kSlots = ceil(E / 32), so E <= 32 * kMaxSlots). Selection is k rounds of a
// warp-wide argmax on (choice, lower index first): the same total order as the CPU kernel, so
// ids agree exactly on tie-free inputs. The per-expert histogram is counted in shared memory and
// added to the global counts once per block.
#pragma once

#include <cstdint>
#include <limits>

#include "device/runtime.h"
#include "device/types.h"
#include "device/warp.h"
#include "routing/routing_types.h"
#include "routing/score_fn.h"

namespace moe_kernels::routing::MOE_KERNELS_TARGET {

using device::kFullWarp;
using device::kWarpSize;

constexpr int kRoutingWarps = 4;  // warps per block
constexpr int kMaxSlots = 16;     // experts per lane: E <= 512
constexpr int kMaxGroups = 64;    // a lane scores two groups

template <typename acc_t>
__device__ __forceinline__ acc_t negative_infinity() {
  return -std::numeric_limits<acc_t>::infinity();
}

// A candidate of the warp argmax. key = 0x10000 | (0xffff - index) for a live candidate, 0 for
// none, so that comparing keys puts live before none and the lower index first.
template <typename acc_t>
struct Candidate {
  acc_t value;
  int key;
};

template <typename acc_t>
__device__ __forceinline__ Candidate<acc_t> candidate(acc_t value, int index) {
  return {value, 0x10000 | (0xffff - index)};
}

template <typename acc_t>
__device__ __forceinline__ int index_of(const Candidate<acc_t>& c) {
  return 0xffff - (c.key & 0xffff);
}

template <typename acc_t>
__device__ __forceinline__ bool better(const Candidate<acc_t>& a, const Candidate<acc_t>& b) {
  if ((a.key >> 16) != (b.key >> 16)) return a.key > b.key;
  if (a.value != b.value) return a.value > b.value;
  return a.key > b.key;
}

// The best candidate of the warp, in every lane.
template <typename acc_t>
__device__ __forceinline__ Candidate<acc_t> warp_best(Candidate<acc_t> c) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const Candidate<acc_t> other{__shfl_xor_sync(kFullWarp, c.value, offset),
                                 __shfl_xor_sync(kFullWarp, c.key, offset)};
    if (better(other, c)) c = other;
  }
  return c;
}

// The scores of one token, lane-strided; slots past the last expert hold 0.
template <int kSlots, typename scalar_t, typename acc_t>
__device__ __forceinline__ void token_scores(const scalar_t* __restrict__ row, int num_experts,
                                             ScoreFn score_fn, int lane, acc_t (&score)[kSlots]) {
#pragma unroll
  for (int i = 0; i < kSlots; ++i) {
    const int e = i * kWarpSize + lane;
    score[i] = e < num_experts ? static_cast<acc_t>(row[e]) : negative_infinity<acc_t>();
  }
  if (score_fn != ScoreFn::kSoftmax) {
#pragma unroll
    for (int i = 0; i < kSlots; ++i) score[i] = elementwise_score(score_fn, score[i]);
    return;
  }
  acc_t max_logit = negative_infinity<acc_t>();
#pragma unroll
  for (int i = 0; i < kSlots; ++i) max_logit = score[i] > max_logit ? score[i] : max_logit;
  max_logit = device::warp_max(max_logit);
  acc_t sum = 0;
#pragma unroll
  for (int i = 0; i < kSlots; ++i) {
    const int e = i * kWarpSize + lane;
    score[i] = e < num_experts ? exp_of(score[i] - max_logit) : acc_t(0);
    sum += score[i];
  }
  sum = device::warp_sum(sum);
#pragma unroll
  for (int i = 0; i < kSlots; ++i) score[i] /= sum;
}

// Sum of the `count` best of `values[0, n)`, best first (the CPU kernel's order, so group
// scores are bit-identical): each pass takes the best value ranked after the previous pick.
template <typename acc_t>
__device__ acc_t top_sum(const acc_t* values, int n, int count) {
  acc_t sum = 0, previous = std::numeric_limits<acc_t>::infinity();
  int previous_index = -1;
  for (int pass = 0; pass < count; ++pass) {
    acc_t best = negative_infinity<acc_t>();
    int best_index = -1;
    for (int i = 0; i < n; ++i) {
      const acc_t v = values[i];
      const bool after_previous = v < previous || (v == previous && i > previous_index);
      const bool beats = best_index < 0 || v > best || (v == best && i < best_index);
      if (after_previous && beats) best = v, best_index = i;
    }
    sum += best;
    previous = best;
    previous_index = best_index;
  }
  return sum;
}

// Group-limited routing: a bit per group kept for this token. Lane l scores groups l and l + 32
// from the token's choice values staged in shared memory; then topk_groups rounds of warp argmax.
template <typename acc_t>
__device__ uint64_t kept_groups(const RoutingParams& p, const acc_t* stage, int lane) {
  const int groups = static_cast<int>(p.n_groups),
            per_group = static_cast<int>(p.experts_per_group);
  acc_t group_score[kMaxGroups / kWarpSize];
#pragma unroll
  for (int i = 0; i < kMaxGroups / kWarpSize; ++i) {
    const int g = i * kWarpSize + lane;
    group_score[i] =
        g < groups ? top_sum(stage + g * per_group, per_group, static_cast<int>(p.group_score_size))
                   : acc_t(0);
  }
  uint64_t kept = 0;
  for (int round = 0; round < p.topk_groups; ++round) {
    Candidate<acc_t> mine{negative_infinity<acc_t>(), 0};
#pragma unroll
    for (int i = 0; i < kMaxGroups / kWarpSize; ++i) {
      const int g = i * kWarpSize + lane;
      const Candidate<acc_t> c = candidate(group_score[i], g);
      if (g < groups && !(kept >> g & 1u) && better(c, mine)) mine = c;
    }
    kept |= uint64_t{1} << index_of(warp_best(mine));
  }
  return kept;
}

// Dynamic shared memory: the block's histogram (E unsigned ints, rounded up to 16 bytes), then,
// for group-limited routing, one row of E choice values per warp.
template <typename acc_t>
constexpr size_t routing_shared_bytes(int64_t num_experts, bool grouped) {
  const size_t histogram = (static_cast<size_t>(num_experts) * sizeof(unsigned) + 15) / 16 * 16;
  return histogram + (grouped ? kRoutingWarps * num_experts * sizeof(acc_t) : 0);
}

template <typename scalar_t, int kSlots>
__global__ void __launch_bounds__(kRoutingWarps* kWarpSize)
    biased_topk_kernel(const scalar_t* __restrict__ logits, const float* __restrict__ bias,
                       const bool* __restrict__ token_mask, RoutingParams p,
                       device::acc_t<scalar_t>* __restrict__ weights, int64_t* __restrict__ ids,
                       unsigned long long* __restrict__ counts) {
  using acc_t = device::acc_t<scalar_t>;
  MOE_KERNELS_DYNAMIC_SHARED(unsigned char, shared);
  const int num_experts = static_cast<int>(p.num_experts), k = static_cast<int>(p.topk);
  const int lane = device::lane_id(), warp = device::warp_id();
  unsigned* block_counts = reinterpret_cast<unsigned*>(shared);
  acc_t* stage =
      reinterpret_cast<acc_t*>(shared + routing_shared_bytes<acc_t>(num_experts, false)) +
      warp * num_experts;
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) block_counts[e] = 0;
  __syncthreads();

  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kRoutingWarps + warp; t < p.num_tokens;
       t += static_cast<int64_t>(gridDim.x) * kRoutingWarps) {
    acc_t score[kSlots], choice[kSlots];
    token_scores(logits + t * num_experts, num_experts, p.score_fn, lane, score);
    unsigned live = 0;  // slots still to choose from
#pragma unroll
    for (int i = 0; i < kSlots; ++i) {
      const int e = i * kWarpSize + lane;
      choice[i] = negative_infinity<acc_t>();
      if (e >= num_experts) continue;
      const acc_t chosen_on =
          p.choose_on_logits ? static_cast<acc_t>(logits[t * num_experts + e]) : score[i];
      const acc_t c = chosen_on + (bias != nullptr ? static_cast<acc_t>(bias[e]) : acc_t(0));
      choice[i] = c != c ? negative_infinity<acc_t>() : c;  // a NaN never wins
      live |= 1u << i;
    }
    if (p.n_groups > 1) {
#pragma unroll
      for (int i = 0; i < kSlots; ++i) {
        if (live >> i & 1u) stage[i * kWarpSize + lane] = choice[i];
      }
      __syncwarp();
      const uint64_t kept = kept_groups(p, stage, lane);
      __syncwarp();  // the stage is rewritten by the next token
#pragma unroll
      for (int i = 0; i < kSlots; ++i) {
        // Padding slots (expert >= E) are never live, and their group index can pass 63: the
        // shift below is only defined for a live slot's group (< n_groups <= 64).
        if (!(live >> i & 1u)) continue;
        const int group = (i * kWarpSize + lane) / static_cast<int>(p.experts_per_group);
        if (!(kept >> group & 1u)) live &= ~(1u << i);
      }
    }

    int64_t* token_ids = ids + t * k;
    acc_t* token_weights = weights + t * k;
    const bool counted = token_mask == nullptr || token_mask[t];
    acc_t sum = 0;
    for (int j = 0; j < k; ++j) {
      Candidate<acc_t> mine{negative_infinity<acc_t>(), 0};
#pragma unroll
      for (int i = 0; i < kSlots; ++i) {
        const Candidate<acc_t> c = candidate(choice[i], i * kWarpSize + lane);
        if ((live >> i & 1u) && better(c, mine)) mine = c;
      }
      const int expert = index_of(warp_best(mine));
      const int owner = expert % kWarpSize, slot = expert / kWarpSize;
      acc_t owner_score = 0;
      if (lane == owner) {
        live &= ~(1u << slot);
#pragma unroll
        for (int i = 0; i < kSlots; ++i) owner_score = i == slot ? score[i] : owner_score;
      }
      const acc_t weight = __shfl_sync(kFullWarp, owner_score, owner);
      sum += weight;
      if (lane == 0) {
        token_ids[j] = expert;
        token_weights[j] = weight;
        if (counted) atomicAdd(&block_counts[expert], 1u);
      }
    }
    __syncwarp();  // lane 0's raw weights, read back by every lane
    const acc_t divisor = p.scaling.divisor(sum);
    for (int j = lane; j < k; j += kWarpSize) {
      token_weights[j] = p.scaling.weight(token_weights[j], divisor);
    }
  }

  __syncthreads();
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    if (block_counts[e] != 0)
      atomicAdd(&counts[e], static_cast<unsigned long long>(block_counts[e]));
  }
}

// Dynamic shared memory of the backward: per warp, the token's scores and their gradients.
template <typename acc_t>
constexpr size_t routing_backward_shared_bytes(int64_t num_experts) {
  return kRoutingWarps * 2 * static_cast<size_t>(num_experts) * sizeof(acc_t);
}

// d(loss)/d(logits) from d(loss)/d(topk_weights), as the CPU kernel derives it: with u the
// divisor (WeightScaling) and w_j = scale * s_j / u,
// dL/ds_j = scale / u * (g_j - [u follows the sum] * sum_i g_i s_i / u), then through the score
// function.
// Ids outside [0, E) are skipped (checking them would need a host synchronisation).
template <typename scalar_t, int kSlots>
__global__ void __launch_bounds__(kRoutingWarps* kWarpSize)
    biased_topk_backward_kernel(const device::acc_t<scalar_t>* __restrict__ grad_weights,
                                const scalar_t* __restrict__ logits,
                                const int64_t* __restrict__ ids, int64_t num_tokens,
                                int num_experts, int k, ScoreFn score_fn, WeightScaling scaling,
                                scalar_t* __restrict__ grad_logits) {
  using acc_t = device::acc_t<scalar_t>;
  MOE_KERNELS_DYNAMIC_SHARED(acc_t, shared);
  const int lane = device::lane_id(), warp = device::warp_id();
  acc_t* scores = shared + warp * 2 * num_experts;
  acc_t* grad_scores = scores + num_experts;

  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kRoutingWarps + warp; t < num_tokens;
       t += static_cast<int64_t>(gridDim.x) * kRoutingWarps) {
    acc_t score[kSlots];
    token_scores(logits + t * num_experts, num_experts, score_fn, lane, score);
#pragma unroll
    for (int i = 0; i < kSlots; ++i) {
      const int e = i * kWarpSize + lane;
      if (e < num_experts) scores[e] = score[i], grad_scores[e] = 0;
    }
    __syncwarp();
    const int64_t* token_ids = ids + t * k;
    const acc_t* g = grad_weights + t * k;
    acc_t sum = 0, dot = 0;
    for (int j = lane; j < k; j += kWarpSize) {
      const int64_t e = token_ids[j];
      if (e < 0 || e >= num_experts) continue;
      sum += scores[e];
      dot += g[j] * scores[e];
    }
    sum = device::warp_sum(sum);
    dot = device::warp_sum(dot);
    const acc_t u = scaling.divisor(sum);
    if (u != acc_t(0)) {  // a zero sum leaves the weights constant at zero
      const acc_t correction = scaling.follows_sum(sum) ? dot / u : acc_t(0);
      for (int j = lane; j < k; j += kWarpSize) {
        const int64_t e = token_ids[j];
        if (e < 0 || e >= num_experts) continue;
        atomicAdd(&grad_scores[e], static_cast<acc_t>(scaling.scale) / u * (g[j] - correction));
      }
    }
    __syncwarp();
    acc_t inner = 0;
    if (score_fn == ScoreFn::kSoftmax) {
      for (int e = lane; e < num_experts; e += kWarpSize) inner += grad_scores[e] * scores[e];
      inner = device::warp_sum(inner);
    }
    const scalar_t* row = logits + t * num_experts;
    scalar_t* out = grad_logits + t * num_experts;
    for (int e = lane; e < num_experts; e += kWarpSize) {
      const acc_t s = scores[e];
      out[e] = static_cast<scalar_t>(
          score_fn == ScoreFn::kSoftmax
              ? s * (grad_scores[e] - inner)
              : grad_scores[e] * elementwise_score_grad(score_fn, static_cast<acc_t>(row[e]), s));
    }
    __syncwarp();  // scores and grad_scores are rewritten by the next token
  }
}

}  // namespace moe_kernels::routing::MOE_KERNELS_TARGET
