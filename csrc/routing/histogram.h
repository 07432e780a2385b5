// expert_histogram's argument checks, shared by the CPU and CUDA ops.
#pragma once

#include "common/checks.h"

namespace moe_kernels::routing {

inline void check_expert_histogram_args(const at::Tensor& topk_ids, int64_t num_experts) {
  check_defined(topk_ids, "topk_ids");
  check_integer(topk_ids, "topk_ids");
  check_positive(num_experts, "num_experts");
}

namespace emulated {
// The CUDA op run on the CPU emulator (histogram_cuda.cpp compiled for it).
at::Tensor expert_histogram_cuda(const at::Tensor& topk_ids, int64_t num_experts);
}  // namespace emulated

}  // namespace moe_kernels::routing
