#include "balance/bias_update_kernels.cuh"
#include "balance/bias_update_launch.h"

namespace moe_kernels::balance {

template <typename count_t>
cudaError_t launch_update_bias(float* bias, const count_t* tokens_per_expert, int64_t num_experts,
                               double rate, BiasRule rule, cudaStream_t stream) {
  if (num_experts == 0) return cudaSuccess;
  update_bias_kernel<count_t>
      <<<1, kBiasUpdateThreads, 0, stream>>>(bias, tokens_per_expert, num_experts, rate, rule);
  return cudaGetLastError();
}

template cudaError_t launch_update_bias<int32_t>(float*, const int32_t*, int64_t, double, BiasRule,
                                                 cudaStream_t);
template cudaError_t launch_update_bias<int64_t>(float*, const int64_t*, int64_t, double, BiasRule,
                                                 cudaStream_t);

}  // namespace moe_kernels::balance
