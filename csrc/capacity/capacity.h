// drop_over_capacity's argument checks, shared by the CPU and CUDA ops (SPEC.md section 3).
#pragma once

#include <optional>
#include <string_view>
#include <tuple>

#include "capacity/drop_order.h"
#include "common/checks.h"

namespace moe_kernels::capacity {

inline DropPolicy check_drop_over_capacity_args(const at::Tensor& topk_ids,
                                                const std::optional<at::Tensor>& topk_weights,
                                                int64_t num_experts, int64_t capacity,
                                                std::string_view policy) {
  check_dim(topk_ids, 2, "topk_ids");
  check_integer(topk_ids, "topk_ids");
  check_positive(num_experts, "num_experts");
  TORCH_CHECK(capacity >= 0, "capacity must be >= 0, got ", capacity);
  check_choice(policy, {"probs", "position"}, "policy");
  const DropPolicy drop = policy == "probs" ? DropPolicy::kProbs : DropPolicy::kPosition;
  TORCH_CHECK(drop == DropPolicy::kPosition || topk_weights.has_value(),
              "policy 'probs' drops the lowest weights: it needs topk_weights, got None");
  if (topk_weights.has_value()) {
    check_dim(*topk_weights, 2, "topk_weights");
    check_floating(*topk_weights, "topk_weights");
    TORCH_CHECK(topk_weights->sizes() == topk_ids.sizes(),
                "topk_weights must have the shape of topk_ids ", topk_ids.sizes(), ", got ",
                topk_weights->sizes());
    check_same_device(*topk_weights, topk_ids, "topk_weights", "topk_ids");
  }
  return drop;
}

namespace emulated {
// The CUDA op run on the CPU emulator (capacity_cuda.cpp compiled for it).
std::tuple<at::Tensor, at::Tensor, at::Tensor> drop_over_capacity_cuda(
    const at::Tensor& topk_ids, const std::optional<at::Tensor>& topk_weights, int64_t num_experts,
    int64_t capacity, c10::string_view policy);
}  // namespace emulated

}  // namespace moe_kernels::capacity
