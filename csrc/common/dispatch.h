// The one dtype-dispatch idiom of the project: every floating op accepts fp32, bf16, fp16 and
// (for fp64 gradient checks) fp64, and computes in at::opmath_type<scalar_t> (fp32, or fp64).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#define MOE_KERNELS_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

#define MOE_KERNELS_DISPATCH_INDEX(TYPE, NAME, ...) AT_DISPATCH_INDEX_TYPES(TYPE, NAME, __VA_ARGS__)

namespace moe_kernels {

// The dtype of at::opmath_type<scalar_t> as a ScalarType: what fp32 accumulators and weights
// are stored in (fp64 for fp64 inputs, fp32 otherwise).
inline at::ScalarType opmath_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace moe_kernels
