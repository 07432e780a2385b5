// Torch-free entry points of permute's device row map: pointers, sizes, a stream.
#pragma once

#include <cstdint>

#include "device/runtime_api.h"

namespace moe_kernels::permute::MOE_KERNELS_TARGET {

// Largest num_experts whose per-warp counts (8 warps x 4 bytes per expert) fit the default
// 48 KB of shared memory of a block.
constexpr int64_t kMaxPermuteExperts = 48 * 1024 / (8 * 4);

// How the pairs are cut into chunks of consecutive pairs, one block each.
struct PairChunks {
  int64_t pairs_per_chunk;
  int64_t num_chunks;
};

// The chunks for num_pairs pairs on the current device (none for no pairs).
cudaError_t plan_pair_chunks(int64_t num_pairs, PairChunks* chunks);

// For topk_ids [num_pairs] in [0, num_experts), num_experts <= kMaxPermuteExperts, writes
// tokens_per_expert [num_experts], num_rows [1] (R, padding included), row_map [num_pairs]
// (-1 for an id out of range) and source_pair[row] = the pair of each row. source_pair must
// hold -1 (the padding rows keep it) for at least R rows: num_pairs + min(num_pairs,
// num_experts) * (align - 1) is always enough. chunk_rows [chunks.num_chunks * num_experts]
// is scratch.
template <typename index_t>
cudaError_t launch_row_map(const index_t* topk_ids, int64_t num_pairs, int64_t num_experts,
                           int64_t align, PairChunks chunks, int64_t* chunk_rows,
                           int64_t* tokens_per_expert, int64_t* num_rows, int64_t* row_map,
                           int64_t* source_pair, cudaStream_t stream);

// source_pair[row_map[i]] = i for the rows in [0, num_rows); source_pair [num_rows] must hold
// -1. Rows out of range are skipped, and a row that repeats keeps one of its pairs.
cudaError_t launch_invert_row_map(const int64_t* row_map, int64_t num_pairs, int64_t num_rows,
                                  int64_t* source_pair, cudaStream_t stream);

}  // namespace moe_kernels::permute::MOE_KERNELS_TARGET
