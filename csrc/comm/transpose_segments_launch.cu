#include "comm/transpose_segments_kernels.cuh"
#include "comm/transpose_segments_launch.h"
#include "device/launch.h"
#include "device/pack.h"

namespace moe_kernels::comm::MOE_KERNELS_TARGET {

template <typename T>
cudaError_t launch_transpose_segments(const T* rows, int64_t num_rows, int64_t hidden_size,
                                      const int64_t* counts, int64_t A, int64_t B,
                                      int64_t* workspace, T* out, cudaStream_t stream) {
  if (num_rows == 0 || hidden_size == 0) return cudaSuccess;
  int64_t* input_start = workspace;
  int64_t* output_start = workspace + A * B;
  if (cudaError_t err = device::launch<segment_starts_kernel>(
          device::LaunchConfig{dim3(1), dim3(kScanThreads)}, stream, counts, A, B, num_rows,
          input_start, output_start);
      err != cudaSuccess)
    return err;
  // One warp per output row; up to 8 blocks of 256 threads per SM, the most threads an SM holds.
  device::LaunchConfig config{dim3(), dim3(kCopyThreads)};
  if (cudaError_t err = device::grid_stride_blocks(num_rows, kCopyWarps, 8, &config.grid);
      err != cudaSuccess)
    return err;
  return device::with_pack_width<T>(hidden_size, {rows, out}, [&](auto vec) {
    return device::launch<transpose_segments_kernel<T, decltype(vec)::value>>(
        config, stream, rows, num_rows, hidden_size, input_start, output_start, A, B, out);
  });
}

#define MOE_KERNELS_INSTANTIATE_TRANSPOSE_SEGMENTS(T)                                           \
  template cudaError_t launch_transpose_segments<T>(const T*, int64_t, int64_t, const int64_t*, \
                                                    int64_t, int64_t, int64_t*, T*, cudaStream_t);
MOE_KERNELS_INSTANTIATE_TRANSPOSE_SEGMENTS(float)
MOE_KERNELS_INSTANTIATE_TRANSPOSE_SEGMENTS(double)
MOE_KERNELS_INSTANTIATE_TRANSPOSE_SEGMENTS(device::bf16)
MOE_KERNELS_INSTANTIATE_TRANSPOSE_SEGMENTS(device::fp16)
#undef MOE_KERNELS_INSTANTIATE_TRANSPOSE_SEGMENTS

}  // namespace moe_kernels::comm::MOE_KERNELS_TARGET
