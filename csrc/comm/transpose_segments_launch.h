// Torch-free entry point of transpose_segments on the device: pointers, sizes, a stream. T is a
// device storage type (float, double, device::bf16, device::fp16); counts are int64.
#pragma once

#include <cstdint>

#include "device/runtime_api.h"
#include "device/types.h"

namespace moe_kernels::comm::MOE_KERNELS_TARGET {

// out [num_rows, hidden_size] = the segments of rows [num_rows, hidden_size], stored in (a, b)
// order with counts [A, B], in (b, a) order. Counts are not checked: each is clamped to
// [0, num_rows], and an output row with no source row inside rows (past the last segment, or
// where the starts run past num_rows) is written as zeros. workspace: 2 * A * B + 1 int64.
template <typename T>
cudaError_t launch_transpose_segments(const T* rows, int64_t num_rows, int64_t hidden_size,
                                      const int64_t* counts, int64_t A, int64_t B,
                                      int64_t* workspace, T* out, cudaStream_t stream);

}  // namespace moe_kernels::comm::MOE_KERNELS_TARGET
