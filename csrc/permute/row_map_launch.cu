#include "device/launch.h"
#include "permute/row_map_kernels.cuh"
#include "permute/row_map_launch.h"

namespace moe_kernels::permute::MOE_KERNELS_TARGET {

static_assert(kMaxPermuteExperts * kRowMapWarps * sizeof(int) <= 48 * 1024,
              "the per-warp counts of kMaxPermuteExperts experts must fit 48 KB");

cudaError_t plan_pair_chunks(int64_t num_pairs, PairChunks* chunks) {
  if (num_pairs == 0) {
    *chunks = {kRowMapThreads, 0};
    return cudaSuccess;
  }
  int num_sms = 1;
  if (cudaError_t err = device::multiprocessor_count(&num_sms); err != cudaSuccess) return err;
  // One chunk per SM: every SM gets a block, and the one-block scan walks few chunks per expert
  // (its cost grows with chunks x experts). A chunk is a whole number of rounds for every warp.
  const int64_t per_sm = (num_pairs + num_sms - 1) / num_sms;
  const int64_t pairs_per_chunk = (per_sm + kRowMapThreads - 1) / kRowMapThreads * kRowMapThreads;
  *chunks = {pairs_per_chunk, (num_pairs + pairs_per_chunk - 1) / pairs_per_chunk};
  return cudaSuccess;
}

template <typename index_t>
cudaError_t launch_row_map(const index_t* topk_ids, int64_t num_pairs, int64_t num_experts,
                           int64_t align, PairChunks chunks, int64_t* chunk_rows,
                           int64_t* tokens_per_expert, int64_t* num_rows, int64_t* row_map,
                           int64_t* source_pair, cudaStream_t stream) {
  const int experts = static_cast<int>(num_experts);
  const device::LaunchConfig per_chunk{dim3(static_cast<unsigned>(chunks.num_chunks)),
                                       dim3(kRowMapThreads),
                                       kRowMapWarps * static_cast<size_t>(experts) * sizeof(int)};
  if (chunks.num_chunks > 0) {
    if (cudaError_t err = device::launch<count_chunks_kernel<index_t>>(
            per_chunk, stream, topk_ids, num_pairs, chunks.pairs_per_chunk, experts, chunk_rows);
        err != cudaSuccess)
      return err;
  }
  // Also with no pairs: it writes the zero counts and R = 0.
  if (cudaError_t err = device::launch<scan_chunks_kernel>(
          device::LaunchConfig{dim3(1), dim3(kRowMapThreads)}, stream, chunk_rows,
          chunks.num_chunks, experts, align, tokens_per_expert, num_rows);
      err != cudaSuccess)
    return err;
  if (chunks.num_chunks == 0) return cudaSuccess;
  return device::launch<rank_pairs_kernel<index_t>>(per_chunk, stream, topk_ids, num_pairs,
                                                    chunks.pairs_per_chunk, experts, chunk_rows,
                                                    row_map, source_pair);
}

cudaError_t launch_invert_row_map(const int64_t* row_map, int64_t num_pairs, int64_t num_rows,
                                  int64_t* source_pair, cudaStream_t stream) {
  if (num_pairs == 0 || num_rows == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  dim3 grid;
  if (cudaError_t err = device::grid_stride_blocks(num_pairs, kThreads, 4, &grid);
      err != cudaSuccess)
    return err;
  return device::launch<invert_row_map_kernel>(device::LaunchConfig{grid, dim3(kThreads)}, stream,
                                               row_map, num_pairs, num_rows, source_pair);
}

template cudaError_t launch_row_map<int32_t>(const int32_t*, int64_t, int64_t, int64_t, PairChunks,
                                             int64_t*, int64_t*, int64_t*, int64_t*, int64_t*,
                                             cudaStream_t);
template cudaError_t launch_row_map<int64_t>(const int64_t*, int64_t, int64_t, int64_t, PairChunks,
                                             int64_t*, int64_t*, int64_t*, int64_t*, int64_t*,
                                             cudaStream_t);

}  // namespace moe_kernels::permute::MOE_KERNELS_TARGET
