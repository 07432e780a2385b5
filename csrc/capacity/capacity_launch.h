// Torch-free entry point of drop_over_capacity's device kernel: pointers, sizes, a stream.
#pragma once

#include <cstdint>

#include "device/runtime_api.h"

namespace moe_kernels::capacity::MOE_KERNELS_TARGET {

// For the num_experts segments of source_pair that permute's row map lays out (segment_start:
// the first row of its chunk_rows; tokens_per_expert: its counts), writes kept_ids and slots
// [pairs] of every pair in a segment, and dropped [num_experts]. weights [pairs] (fp32 or
// fp64) drops the lowest weights; null drops the last pairs. keys: scratch of one entry per
// row, unused without weights. kept_ids and slots must hold -1.
template <typename weight_t>
cudaError_t launch_drop_over_capacity(const weight_t* weights, const int64_t* source_pair,
                                      const int64_t* segment_start,
                                      const int64_t* tokens_per_expert, int64_t num_experts,
                                      int64_t capacity, uint64_t* keys, int64_t* kept_ids,
                                      int64_t* slots, int64_t* dropped, cudaStream_t stream);

}  // namespace moe_kernels::capacity::MOE_KERNELS_TARGET
