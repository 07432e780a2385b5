// Torch-free entry point of the device expert histogram: pointers, sizes, a stream.
#pragma once

#include <cstdint>

#include "device/runtime_api.h"

namespace moe_kernels::routing::MOE_KERNELS_TARGET {

// Largest num_experts whose block histogram fits the default 48 KB of shared memory.
constexpr int64_t kMaxHistogramExperts = 48 * 1024 / 4;

// counts [num_experts] int64 must be zeroed by the caller; the kernel adds to it.
template <typename index_t>
cudaError_t launch_expert_histogram(const index_t* topk_ids, int64_t num_ids, int64_t num_experts,
                                    int64_t* counts, cudaStream_t stream);

}  // namespace moe_kernels::routing::MOE_KERNELS_TARGET
