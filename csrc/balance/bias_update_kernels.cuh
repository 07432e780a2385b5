// update_bias on the GPU. Torch-free: compiled by nvcc, and by the CPU emulator.
#pragma once

#include <cstdint>

#include "balance/bias_update_rule.h"
#include "device/runtime.h"

namespace moe_kernels::balance::MOE_KERNELS_TARGET {

constexpr int kBiasUpdateThreads = 256;

// Sums value(e) over the experts into every thread's result: a shared-memory tree reduction in
// int64 (exact). The block's threads all call it.
template <typename Value>
__device__ int64_t block_sum(long long* partial, int64_t num_experts, const Value& value) {
  long long sum = 0;
  for (int64_t e = threadIdx.x; e < num_experts; e += kBiasUpdateThreads) sum += value(e);
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int width = kBiasUpdateThreads / 2; width > 0; width /= 2) {
    if (static_cast<int>(threadIdx.x) < width) partial[threadIdx.x] += partial[threadIdx.x + width];
    __syncthreads();
  }
  const int64_t total = partial[0];
  __syncthreads();  // every thread has read it before a next sum overwrites it
  return total;
}

// One block: sum the counts, then (mean-centred) the signs of the rule, then apply the rule to
// every expert. Negative counts are not checked here (that would need a host sync).
template <typename count_t>
__global__ void update_bias_kernel(float* __restrict__ bias, const count_t* __restrict__ counts,
                                   int64_t num_experts, double rate, BiasRule rule, bool centered) {
  MOE_KERNELS_SHARED(long long, partial, [kBiasUpdateThreads]);
  const int64_t total =
      block_sum(partial, num_experts, [&](int64_t e) { return static_cast<int64_t>(counts[e]); });
  const int64_t sign_sum =
      centered ? block_sum(partial, num_experts,
                           [&](int64_t e) {
                             return mean_minus_count_sign(total, num_experts, counts[e]);
                           })
               : 0;
  for (int64_t e = threadIdx.x; e < num_experts; e += kBiasUpdateThreads) {
    bias[e] += bias_delta(total, num_experts, counts[e], rate, rule, sign_sum);
  }
}

}  // namespace moe_kernels::balance::MOE_KERNELS_TARGET
