// Argument checks of the permute family, shared by every backend (SPEC.md section 3).
#pragma once

#include <optional>

#include "common/checks.h"

namespace moe_kernels::permute {

inline void check_permute_args(const at::Tensor& hidden, const at::Tensor& topk_ids,
                               int64_t num_experts, int64_t align) {
  check_dim(hidden, 2, "hidden");
  check_floating(hidden, "hidden");
  check_dim(topk_ids, 2, "topk_ids");
  check_integer(topk_ids, "topk_ids");
  check_size(topk_ids, 0, hidden.size(0), "topk_ids", "num_tokens");
  check_same_device(topk_ids, hidden, "topk_ids", "hidden");
  check_positive(num_experts, "num_experts");
  check_positive(align, "align");
}

// row_map [T, k] against the rows it indexes; topk_weights, when given, of the same shape.
inline void check_row_map_args(const at::Tensor& row_map, const std::optional<at::Tensor>& weights,
                               const at::Tensor& tokens, const char* tokens_name) {
  check_dim(row_map, 2, "row_map");
  check_integer(row_map, "row_map");
  check_same_device(row_map, tokens, "row_map", tokens_name);
  if (weights.has_value()) {
    check_dim(*weights, 2, "topk_weights");
    check_floating(*weights, "topk_weights");
    TORCH_CHECK(weights->sizes() == row_map.sizes(), "topk_weights must have the shape of row_map ",
                row_map.sizes(), ", got ", weights->sizes());
    check_same_device(*weights, tokens, "topk_weights", tokens_name);
  }
}

}  // namespace moe_kernels::permute
