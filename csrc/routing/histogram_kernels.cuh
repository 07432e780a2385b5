// expert_histogram on the GPU. Torch-free: compiled by nvcc, and by the CPU emulator.
#pragma once

#include <cstdint>

#include "device/runtime.h"

namespace moe_kernels::routing::MOE_KERNELS_TARGET {

constexpr int kHistogramThreads = 256;

// Each block counts its grid-stride share of ids in shared memory (32-bit: one block never
// sees 2^32 ids of one expert), then adds its counts to the global int64 histogram once.
// Ids outside [0, num_experts) are skipped: checking them would need a host synchronisation.
// Dynamic shared memory: num_experts * sizeof(unsigned int).
template <typename index_t>
__global__ void expert_histogram_kernel(const index_t* __restrict__ topk_ids, int64_t num_ids,
                                        int num_experts, unsigned long long* __restrict__ counts) {
  MOE_KERNELS_DYNAMIC_SHARED(unsigned int, block_counts);
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) block_counts[e] = 0;
  __syncthreads();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < num_ids;
       i += stride) {
    const int64_t expert = topk_ids[i];
    if (expert >= 0 && expert < num_experts) atomicAdd(&block_counts[expert], 1u);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    if (block_counts[e] != 0)
      atomicAdd(&counts[e], static_cast<unsigned long long>(block_counts[e]));
  }
}

}  // namespace moe_kernels::routing::MOE_KERNELS_TARGET
