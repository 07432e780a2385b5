#include "device/launch.h"
#include "device/pack.h"
#include "permute/gather_kernels.cuh"
#include "permute/gather_launch.h"

namespace moe_kernels::permute::MOE_KERNELS_TARGET {
namespace {

// One warp per item; up to 8 blocks of 256 threads per SM, the most threads an SM holds.
cudaError_t warp_per_item_config(int64_t items, device::LaunchConfig* config) {
  config->block = dim3(kGatherThreads);
  return device::grid_stride_blocks(items, kGatherWarps, 8, &config->grid);
}

}  // namespace

template <typename T>
cudaError_t launch_gather_rows(const T* hidden, int64_t hidden_size, int64_t topk,
                               const int64_t* source_pair, int64_t num_rows,
                               const device::acc_t<T>* pair_weights, T* rows, cudaStream_t stream) {
  if (num_rows == 0 || hidden_size == 0) return cudaSuccess;
  device::LaunchConfig config;
  if (cudaError_t err = warp_per_item_config(num_rows, &config); err != cudaSuccess) return err;
  return device::with_pack_width<T>(hidden_size, {hidden, rows}, [&](auto vec) {
    return device::launch<gather_rows_kernel<T, decltype(vec)::value>>(
        config, stream, hidden, hidden_size, topk, source_pair, num_rows, pair_weights, rows);
  });
}

template <typename T>
cudaError_t launch_unpermute(const T* rows, int64_t num_rows, int64_t hidden_size,
                             const int64_t* row_map, int64_t num_tokens, int64_t topk,
                             const device::acc_t<T>* pair_weights, T* out, cudaStream_t stream) {
  if (num_tokens == 0 || hidden_size == 0) return cudaSuccess;
  device::LaunchConfig config;
  if (cudaError_t err = warp_per_item_config(num_tokens, &config); err != cudaSuccess) return err;
  return device::with_pack_width<T>(hidden_size, {rows, out}, [&](auto vec) {
    return device::launch<unpermute_kernel<T, decltype(vec)::value>>(
        config, stream, rows, num_rows, hidden_size, row_map, num_tokens, topk, pair_weights, out);
  });
}

template <typename T>
cudaError_t launch_unpermute_weights_grad(const T* grad_output, const T* rows, int64_t num_rows,
                                          int64_t hidden_size, const int64_t* row_map,
                                          int64_t num_tokens, int64_t topk,
                                          device::acc_t<T>* grad_weights, cudaStream_t stream) {
  const int64_t num_pairs = num_tokens * topk;
  if (num_pairs == 0) return cudaSuccess;  // with hidden_size 0 the kernel still writes zeros
  device::LaunchConfig config;
  if (cudaError_t err = warp_per_item_config(num_pairs, &config); err != cudaSuccess) return err;
  return device::with_pack_width<T>(hidden_size, {grad_output, rows}, [&](auto vec) {
    return device::launch<unpermute_weights_grad_kernel<T, decltype(vec)::value>>(
        config, stream, grad_output, rows, num_rows, hidden_size, row_map, num_pairs, topk,
        grad_weights);
  });
}

#define MOE_KERNELS_INSTANTIATE_GATHERS(T)                                                        \
  template cudaError_t launch_gather_rows<T>(const T*, int64_t, int64_t, const int64_t*, int64_t, \
                                             const device::acc_t<T>*, T*, cudaStream_t);          \
  template cudaError_t launch_unpermute<T>(const T*, int64_t, int64_t, const int64_t*, int64_t,   \
                                           int64_t, const device::acc_t<T>*, T*, cudaStream_t);   \
  template cudaError_t launch_unpermute_weights_grad<T>(const T*, const T*, int64_t, int64_t,     \
                                                        const int64_t*, int64_t, int64_t,         \
                                                        device::acc_t<T>*, cudaStream_t);
MOE_KERNELS_INSTANTIATE_GATHERS(float)
MOE_KERNELS_INSTANTIATE_GATHERS(double)
MOE_KERNELS_INSTANTIATE_GATHERS(device::bf16)
MOE_KERNELS_INSTANTIATE_GATHERS(device::fp16)
#undef MOE_KERNELS_INSTANTIATE_GATHERS

}  // namespace moe_kernels::permute::MOE_KERNELS_TARGET
