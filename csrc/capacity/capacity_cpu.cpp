// drop_over_capacity on the CPU (SPEC.md section 3): each expert keeps at most `capacity` of its
// (token, slot) pairs, by weight (drop_order.h) or by position, experts in parallel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "capacity/capacity.h"
#include "common/dispatch.h"
#include "common/nvtx.h"
#include "emu/cpu_or_emulated.h"
#include "permute/row_map_cpu.h"

namespace moe_kernels::capacity {
namespace {

template <typename weight_t>
void drop_expert_pairs(const int64_t* pairs, int64_t n, int64_t expert, int64_t capacity,
                       const weight_t* weights, int64_t* kept_ids, int64_t* slots,
                       std::vector<char>& keep) {
  if (n > capacity && weights != nullptr) {
    std::vector<int64_t> ranked(pairs, pairs + n);
    std::stable_sort(ranked.begin(), ranked.end(), [&](int64_t a, int64_t b) {
      return drop_key(weights[a]) < drop_key(weights[b]);
    });
    for (int64_t r = 0; r < capacity; ++r) keep[ranked[r]] = 1;
  } else {
    for (int64_t s = 0; s < std::min(n, capacity); ++s) keep[pairs[s]] = 1;
  }
  int64_t slot = 0;
  for (int64_t s = 0; s < n; ++s) {
    const int64_t pair = pairs[s];
    kept_ids[pair] = keep[pair] ? expert : -1;
    slots[pair] = keep[pair] ? slot++ : -1;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> drop_over_capacity_cpu(
    const at::Tensor& topk_ids_in, const std::optional<at::Tensor>& topk_weights,
    int64_t num_experts, int64_t capacity, c10::string_view policy) {
  MOE_KERNELS_NVTX_RANGE("drop_over_capacity");
  const DropPolicy drop =
      check_drop_over_capacity_args(topk_ids_in, topk_weights, num_experts, capacity, policy);
  check_index_range(topk_ids_in, num_experts, "topk_ids", "num_experts", -1);
  const at::Tensor ids = topk_ids_in.to(at::kLong).contiguous();
  const auto int64 = ids.options();
  auto kept_ids = at::full(ids.sizes(), -1, int64);
  auto slots = at::full(ids.sizes(), -1, int64);
  auto dropped = at::empty({num_experts}, int64);
  // Each expert's pairs in pair order: permute's row map, without padding. Expert e's are
  // pairs[first[e] ..] (first: the counts of the experts before it); dropped ids are in none.
  std::vector<int64_t> pair_rows(ids.numel()), counts(num_experts), pairs, first(num_experts, 0);
  permute::compute_row_map(ids.const_data_ptr<int64_t>(), ids.numel(), num_experts, 1,
                           pair_rows.data(), counts.data(), pairs);
  for (int64_t e = 1; e < num_experts; ++e) first[e] = first[e - 1] + counts[e - 1];
  const bool by_weight = drop == DropPolicy::kProbs;
  // Half weights widen exactly, so they rank as they are.
  const at::Tensor weights =
      by_weight ? topk_weights->to(opmath_dtype(topk_weights->scalar_type())).contiguous()
                : at::empty({0}, ids.options().dtype(at::kFloat));
  std::vector<char> keep(ids.numel(), 0);
  AT_DISPATCH_FLOATING_TYPES(weights.scalar_type(), "drop_over_capacity_cpu", [&] {
    const scalar_t* w = by_weight ? weights.const_data_ptr<scalar_t>() : nullptr;
    int64_t* kept = kept_ids.mutable_data_ptr<int64_t>();
    int64_t* slot = slots.mutable_data_ptr<int64_t>();
    int64_t* over = dropped.mutable_data_ptr<int64_t>();
    at::parallel_for(0, num_experts, 1, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) {
        over[e] = std::max<int64_t>(counts[e] - capacity, 0);
        drop_expert_pairs(pairs.data() + first[e], counts[e], e, capacity, w, kept, slot, keep);
      }
    });
  });
  return {kept_ids, slots, dropped};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_kernels, CPU, m) {
  emu::impl_cpu_or_emulated<&drop_over_capacity_cpu, &emulated::drop_over_capacity_cuda>(
      m, "drop_over_capacity");
}

}  // namespace moe_kernels::capacity
