// Argument checks shared by every op. Each names the argument and shows the bad value, and
// every op runs all of its checks before it allocates or writes anything.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <string_view>

namespace moe_kernels {

inline void check_defined(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, " must be a tensor, got None");
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  check_defined(t, name);
  TORCH_CHECK(t.dim() == dim, name, " must be a ", dim, "-D tensor, got shape ", t.sizes());
}

inline void check_size(const at::Tensor& t, int64_t dim, int64_t expected, const char* name,
                       const char* what) {
  TORCH_CHECK(t.size(dim) == expected, name, ".size(", dim, ") must equal ", what, "=", expected,
              ", got shape ", t.sizes());
}

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_float_type(t.scalar_type()), name,
              " must be float32, bfloat16, float16 or float64, got ", t.scalar_type());
}

inline void check_integer(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, name,
              " must be int64 or int32, got ", t.scalar_type());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name,
                             const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name,
              " (", ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the device of ", ref_name, " (",
              ref.device(), "), got ", t.device());
}

inline void check_device_type(const at::Tensor& t, c10::DeviceType type, const char* name) {
  TORCH_CHECK(t.device().type() == type, name, " must be a ", type, " tensor, got one on ",
              t.device());
}

inline void check_positive(int64_t value, const char* name) {
  TORCH_CHECK(value >= 1, name, " must be >= 1, got ", value);
}

inline void check_finite(double value, const char* name) {
  TORCH_CHECK(std::isfinite(value), name, " must be finite, got ", value);
}

inline void check_choice(std::string_view value, std::initializer_list<std::string_view> choices,
                         const char* name) {
  for (auto c : choices) {
    if (value == c) return;
  }
  std::string allowed;
  for (auto c : choices) allowed += (allowed.empty() ? "'" : ", '") + std::string(c) + "'";
  TORCH_CHECK(false, name, " must be one of ", allowed, ", got '", value, "'");
}

// Validates integer indices in [lowest, upper) with one pass over a CPU tensor. (CUDA ops do not
// call it: reading the result back would synchronise the host with the device.) lowest = -1
// admits the permute family's mark of a pair dropped over capacity.
inline void check_index_range(const at::Tensor& index, int64_t upper, const char* name,
                              const char* upper_name, int64_t lowest = 0) {
  if (index.numel() == 0) return;
  const auto [lo, hi] = at::aminmax(index);
  const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
  TORCH_CHECK(lo_v >= lowest && hi_v < upper, name, " must hold values in [", lowest, ", ",
              upper_name, "=", upper, "), got values in [", lo_v, ", ", hi_v, "]");
}

}  // namespace moe_kernels
