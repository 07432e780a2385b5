#include "device/launch.h"
#include "routing/histogram_kernels.cuh"
#include "routing/histogram_launch.h"

namespace moe_kernels::routing::MOE_KERNELS_TARGET {

template <typename index_t>
cudaError_t launch_expert_histogram(const index_t* topk_ids, int64_t num_ids, int64_t num_experts,
                                    int64_t* counts, cudaStream_t stream) {
  if (num_ids == 0) return cudaSuccess;
  // A few blocks per SM: enough to hide latency, few enough that the final global adds
  // (one per expert per block) stay cheap.
  device::LaunchConfig config{dim3(1), dim3(kHistogramThreads),
                              static_cast<size_t>(num_experts) * sizeof(unsigned int)};
  if (cudaError_t err = device::grid_stride_blocks(num_ids, kHistogramThreads, 4, &config.grid);
      err != cudaSuccess) {
    return err;
  }
  return device::launch<expert_histogram_kernel<index_t>>(
      config, stream, topk_ids, num_ids, static_cast<int>(num_experts),
      reinterpret_cast<unsigned long long*>(counts));
}

template cudaError_t launch_expert_histogram<int32_t>(const int32_t*, int64_t, int64_t, int64_t*,
                                                      cudaStream_t);
template cudaError_t launch_expert_histogram<int64_t>(const int64_t*, int64_t, int64_t, int64_t*,
                                                      cudaStream_t);

}  // namespace moe_kernels::routing::MOE_KERNELS_TARGET
