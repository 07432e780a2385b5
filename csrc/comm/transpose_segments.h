// transpose_segments's argument checks, shared by every backend (SPEC.md section 5), and the CUDA
// op as the CPU emulator runs it. The checks of the counts' values (>= 0, summing to the rows) are
// the CPU op's own: on a GPU they would synchronise the host with the device.
#pragma once

#include "common/checks.h"

namespace moe_kernels::comm {

// rows [N, H] holding the A * B segments of counts [A, B], in row-major (a, b) order.
inline void check_transpose_segments_args(const at::Tensor& rows, const at::Tensor& counts) {
  check_dim(rows, 2, "rows");
  check_floating(rows, "rows");
  check_dim(counts, 2, "counts");
  check_integer(counts, "counts");
  check_same_device(counts, rows, "counts", "rows");
}

namespace emulated {
// The CUDA op run on the CPU emulator (transpose_segments_cuda.cpp compiled for it).
at::Tensor transpose_segments_cuda(const at::Tensor& rows, const at::Tensor& counts);
}  // namespace emulated

}  // namespace moe_kernels::comm
