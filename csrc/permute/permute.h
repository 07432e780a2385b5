// Argument checks of the permute family, shared by every backend (SPEC.md section 3), and the
// CUDA ops as the CPU emulator runs them. Index-range checks are the CPU ops' own: on a GPU they
// would synchronise the host with the device.
#pragma once

#include <optional>
#include <tuple>

#include "common/checks.h"
#include "common/dispatch.h"

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

inline void check_permute_with_map_args(const at::Tensor& hidden, const at::Tensor& row_map,
                                        const std::optional<at::Tensor>& weights,
                                        int64_t num_rows) {
  check_dim(hidden, 2, "hidden");
  check_floating(hidden, "hidden");
  check_row_map_args(row_map, weights, hidden, "hidden");
  check_size(row_map, 0, hidden.size(0), "row_map", "num_tokens");
  TORCH_CHECK(num_rows >= 0, "num_rows must be >= 0, got ", num_rows);
}

inline void check_unpermute_args(const at::Tensor& rows, const at::Tensor& row_map,
                                 const std::optional<at::Tensor>& weights) {
  check_dim(rows, 2, "rows");
  check_floating(rows, "rows");
  check_row_map_args(row_map, weights, rows, "rows");
}

inline void check_unpermute_weights_grad_args(const at::Tensor& grad_output, const at::Tensor& rows,
                                              const at::Tensor& row_map) {
  check_dim(rows, 2, "rows");
  check_floating(rows, "rows");
  check_dim(grad_output, 2, "grad_output");
  check_same_dtype(grad_output, rows, "grad_output", "rows");
  check_same_device(grad_output, rows, "grad_output", "rows");
  check_row_map_args(row_map, std::nullopt, rows, "rows");
  check_size(row_map, 0, grad_output.size(0), "row_map", "grad_output.size(0)");
  check_size(grad_output, 1, rows.size(1), "grad_output", "rows.size(1)");
}

// The per-pair weights as the kernels read them: contiguous, in the opmath type of `dtype`.
inline at::Tensor weights_in_opmath(const std::optional<at::Tensor>& weights,
                                    at::ScalarType dtype) {
  return weights.has_value() ? weights->to(opmath_dtype(dtype)).contiguous() : at::Tensor();
}

namespace emulated {
// The CUDA ops run on the CPU emulator (permute_cuda.cpp compiled for it).
std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_cuda(const at::Tensor& hidden,
                                                            const at::Tensor& topk_ids,
                                                            int64_t num_experts, int64_t align);
at::Tensor permute_with_map_cuda(const at::Tensor& hidden, const at::Tensor& row_map,
                                 const std::optional<at::Tensor>& weights, int64_t num_rows);
at::Tensor unpermute_cuda(const at::Tensor& rows, const at::Tensor& row_map,
                          const std::optional<at::Tensor>& weights);
at::Tensor unpermute_weights_grad_cuda(const at::Tensor& grad_output, const at::Tensor& rows,
                                       const at::Tensor& row_map);
}  // namespace emulated

}  // namespace moe_kernels::permute
