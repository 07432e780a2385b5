#include "balance/bias_update_kernels.cuh"
#include "balance/bias_update_launch.h"
#include "device/launch.h"

namespace moe_kernels::balance::MOE_KERNELS_TARGET {

template <typename count_t>
cudaError_t launch_update_bias(float* bias, const count_t* tokens_per_expert, int64_t num_experts,
                               double rate, BiasRule rule, bool centered, cudaStream_t stream) {
  if (num_experts == 0) return cudaSuccess;
  return device::launch<update_bias_kernel<count_t>>(
      device::LaunchConfig{dim3(1), dim3(kBiasUpdateThreads)}, stream, bias, tokens_per_expert,
      num_experts, rate, rule, centered);
}

template cudaError_t launch_update_bias<int32_t>(float*, const int32_t*, int64_t, double, BiasRule,
                                                 bool, cudaStream_t);
template cudaError_t launch_update_bias<int64_t>(float*, const int64_t*, int64_t, double, BiasRule,
                                                 bool, cudaStream_t);

}  // namespace moe_kernels::balance::MOE_KERNELS_TARGET
