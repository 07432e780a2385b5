// Torch-free entry points of the permute family's row gathers: pointers, sizes, a stream. T is a
// device storage type (float, double, device::bf16, device::fp16); weights are in its
// accumulator type, device::acc_t<T>. Row maps are int64.
#pragma once

#include <cstdint>

#include "device/runtime_api.h"
#include "device/types.h"

namespace moe_kernels::permute::MOE_KERNELS_TARGET {

// rows [num_rows, hidden_size]: rows[r] = pair_weights[p] * hidden[p / topk] for
// p = source_pair[r] (a copy when pair_weights is null), zero where p is -1.
template <typename T>
cudaError_t launch_gather_rows(const T* hidden, int64_t hidden_size, int64_t topk,
                               const int64_t* source_pair, int64_t num_rows,
                               const device::acc_t<T>* pair_weights, T* rows, cudaStream_t stream);

// out [num_tokens, hidden_size] = sum_j pair_weights[t, j] * rows[row_map[t, j]] (a plain sum
// when pair_weights is null); rows outside [0, num_rows) are skipped.
template <typename T>
cudaError_t launch_unpermute(const T* rows, int64_t num_rows, int64_t hidden_size,
                             const int64_t* row_map, int64_t num_tokens, int64_t topk,
                             const device::acc_t<T>* pair_weights, T* out, cudaStream_t stream);

// grad_weights [num_tokens * topk] = <grad_output[t], rows[row_map[t, j]]>; 0 for a row outside
// [0, num_rows).
template <typename T>
cudaError_t launch_unpermute_weights_grad(const T* grad_output, const T* rows, int64_t num_rows,
                                          int64_t hidden_size, const int64_t* row_map,
                                          int64_t num_tokens, int64_t topk,
                                          device::acc_t<T>* grad_weights, cudaStream_t stream);

}  // namespace moe_kernels::permute::MOE_KERNELS_TARGET
