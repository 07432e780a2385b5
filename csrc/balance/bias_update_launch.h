// Torch-free entry point of the device bias update: pointers, sizes, a stream.
#pragma once

#include <cstdint>

#include "balance/bias_update_rule.h"
#include "device/runtime_api.h"

namespace moe_kernels::balance::MOE_KERNELS_TARGET {

template <typename count_t>
cudaError_t launch_update_bias(float* bias, const count_t* tokens_per_expert, int64_t num_experts,
                               double rate, BiasRule rule, bool centered, cudaStream_t stream);

}  // namespace moe_kernels::balance::MOE_KERNELS_TARGET
