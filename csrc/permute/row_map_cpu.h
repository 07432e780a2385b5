// permute's row map on the CPU (permute_cpu.cpp), shared with drop_over_capacity's CPU op,
// which finds each expert's pairs in pair order with it, as its CUDA op does with the device
// row map.
#pragma once

#include <cstdint>
#include <vector>

namespace moe_kernels::permute {

// Row of every (token, slot) pair, in expert order and, within an expert, in pair order (token
// then slot); a dropped pair (id -1) gets row -1 and no row. Returns the number of rows R,
// padding included (T * k without padding), and fills row_map [T*k], tokens_per_expert [E] and
// source_pair [R] (the pair of each row, -1 for padding). Ids must be in [-1, num_experts).
int64_t compute_row_map(const int64_t* ids, int64_t num_pairs, int64_t num_experts, int64_t align,
                        int64_t* row_map, int64_t* tokens_per_expert,
                        std::vector<int64_t>& source_pair);

}  // namespace moe_kernels::permute
