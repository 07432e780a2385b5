// Optional tensor arguments (`Tensor?` in a schema) as the kernels take them: contiguous, and
// a null pointer when absent.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace moe_kernels {

inline at::Tensor optional_contiguous(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

template <typename T>
const T* optional_data(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

}  // namespace moe_kernels
