// update_bias on the GPU. Torch-free: compiled by nvcc, and by the CPU emulator.
#pragma once

#include <cstdint>

#include "balance/bias_update_rule.h"
#include "device/runtime.h"

namespace moe_kernels::balance::MOE_KERNELS_TARGET {

constexpr int kBiasUpdateThreads = 256;

// One block: sum the counts (a shared-memory tree reduction in int64, exact), then apply the
// rule to every expert. Negative counts are not checked here (that would need a host sync).
template <typename count_t>
__global__ void update_bias_kernel(float* __restrict__ bias, const count_t* __restrict__ counts,
                                   int64_t num_experts, double rate, BiasRule rule) {
  MOE_KERNELS_SHARED(long long, partial, [kBiasUpdateThreads]);
  long long sum = 0;
  for (int64_t e = threadIdx.x; e < num_experts; e += kBiasUpdateThreads) sum += counts[e];
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int width = kBiasUpdateThreads / 2; width > 0; width /= 2) {
    if (static_cast<int>(threadIdx.x) < width) partial[threadIdx.x] += partial[threadIdx.x + width];
    __syncthreads();
  }
  const int64_t total = partial[0];
  for (int64_t e = threadIdx.x; e < num_experts; e += kBiasUpdateThreads) {
    bias[e] += bias_delta(total, num_experts, counts[e], rate, rule);
  }
}

}  // namespace moe_kernels::balance::MOE_KERNELS_TARGET
