#include <algorithm>

#include "routing/histogram_kernels.cuh"
#include "routing/histogram_launch.h"

namespace moe_kernels::routing {

template <typename index_t>
cudaError_t launch_expert_histogram(const index_t* topk_ids, int64_t num_ids, int64_t num_experts,
                                    int64_t* counts, cudaStream_t stream) {
  if (num_ids == 0) return cudaSuccess;
  int device = 0, num_sms = 1;
  if (cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) return err;
  if (cudaError_t err = cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device);
      err != cudaSuccess) {
    return err;
  }
  // A few blocks per SM: enough to hide latency, few enough that the final global adds
  // (one per expert per block) stay cheap.
  const int64_t needed = (num_ids + kHistogramThreads - 1) / kHistogramThreads;
  const int blocks = static_cast<int>(std::min<int64_t>(needed, 4 * static_cast<int64_t>(num_sms)));
  const size_t shared_bytes = static_cast<size_t>(num_experts) * sizeof(unsigned int);
  expert_histogram_kernel<index_t><<<blocks, kHistogramThreads, shared_bytes, stream>>>(
      topk_ids, num_ids, static_cast<int>(num_experts),
      reinterpret_cast<unsigned long long*>(counts));
  return cudaGetLastError();
}

template cudaError_t launch_expert_histogram<int32_t>(const int32_t*, int64_t, int64_t, int64_t*,
                                                      cudaStream_t);
template cudaError_t launch_expert_histogram<int64_t>(const int64_t*, int64_t, int64_t, int64_t*,
                                                      cudaStream_t);

}  // namespace moe_kernels::routing
