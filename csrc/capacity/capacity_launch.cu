#include "capacity/capacity_kernels.cuh"
#include "capacity/capacity_launch.h"
#include "device/launch.h"

namespace moe_kernels::capacity::MOE_KERNELS_TARGET {

template <typename weight_t>
cudaError_t launch_drop_over_capacity(const weight_t* weights, const int64_t* source_pair,
                                      const int64_t* segment_start,
                                      const int64_t* tokens_per_expert, int64_t num_experts,
                                      int64_t capacity, uint64_t* keys, int64_t* kept_ids,
                                      int64_t* slots, int64_t* dropped, cudaStream_t stream) {
  return device::launch<drop_over_capacity_kernel<weight_t>>(
      device::LaunchConfig{dim3(static_cast<unsigned>(num_experts)), dim3(kDropThreads)}, stream,
      weights, source_pair, segment_start, tokens_per_expert, capacity, keys, kept_ids, slots,
      dropped);
}

template cudaError_t launch_drop_over_capacity<float>(const float*, const int64_t*, const int64_t*,
                                                      const int64_t*, int64_t, int64_t, uint64_t*,
                                                      int64_t*, int64_t*, int64_t*, cudaStream_t);
template cudaError_t launch_drop_over_capacity<double>(const double*, const int64_t*,
                                                       const int64_t*, const int64_t*, int64_t,
                                                       int64_t, uint64_t*, int64_t*, int64_t*,
                                                       int64_t*, cudaStream_t);

}  // namespace moe_kernels::capacity::MOE_KERNELS_TARGET
