// transpose_segments on the CPU (SPEC.md section 5): the A x B grid of row segments, stored in
// (a, b) order, rewritten in (b, a) order. A segment's rows are consecutive on both sides, so the
// op is a few large memcpys; the copy is the same for every dtype, so it moves bytes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "comm/transpose_segments.h"
#include "common/nvtx.h"
#include "emu/cpu_or_emulated.h"

namespace moe_kernels::comm {
namespace {

// Where each segment starts, on both sides, from counts [A, B] checked to be >= 0 and to sum to
// num_rows.
struct SegmentStarts {
  std::vector<int64_t> input;   // [A * B]: segment (a, b) at a * B + b
  std::vector<int64_t> output;  // [A * B + 1]: segment (a, b) at b * A + a, then num_rows
};

SegmentStarts segment_starts(const at::Tensor& counts_in, int64_t num_rows) {
  const at::Tensor counts = counts_in.to(at::kLong).contiguous();
  const int64_t* c = counts.const_data_ptr<int64_t>();
  const int64_t A = counts.size(0), B = counts.size(1);
  SegmentStarts starts{std::vector<int64_t>(A * B), std::vector<int64_t>(A * B + 1)};
  int64_t total = 0;
  for (int64_t i = 0; i < A * B; ++i) {
    TORCH_CHECK(c[i] >= 0, "counts must be >= 0, got ", c[i], " for segment (", i / B, ", ", i % B,
                ")");
    // Checked before adding, so that no sum can overflow.
    TORCH_CHECK(c[i] <= num_rows - total, "counts must sum to rows.size(0)=", num_rows,
                ", got more by segment (", i / B, ", ", i % B, ")");
    starts.input[i] = total;
    total += c[i];
  }
  TORCH_CHECK(total == num_rows, "counts must sum to rows.size(0)=", num_rows, ", got ", total);
  int64_t row = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t a = 0; a < A; ++a) {
      starts.output[b * A + a] = row;
      row += c[a * B + b];
    }
  }
  starts.output[A * B] = num_rows;
  return starts;
}

// Output rows [begin, end): the part of each output segment that falls there is one memcpy.
void copy_output_rows(const SegmentStarts& starts, int64_t A, int64_t B, const char* src, char* dst,
                      int64_t row_bytes, int64_t begin, int64_t end) {
  // The last segment starting at or before `begin` holds it (an empty segment shares its start
  // with the next one).
  auto s = std::upper_bound(starts.output.begin(), starts.output.end(), begin) -
           starts.output.begin() - 1;
  for (int64_t row = begin; row < end; ++s) {
    const int64_t stop = std::min(starts.output[s + 1], end);
    const int64_t from = starts.input[(s % A) * B + s / A] + (row - starts.output[s]);
    std::memcpy(dst + row * row_bytes, src + from * row_bytes, (stop - row) * row_bytes);
    row = stop;
  }
}

at::Tensor transpose_segments_cpu(const at::Tensor& rows_in, const at::Tensor& counts) {
  MOE_KERNELS_NVTX_RANGE("transpose_segments");
  check_transpose_segments_args(rows_in, counts);
  const at::Tensor rows = rows_in.contiguous();
  const int64_t num_rows = rows.size(0), A = counts.size(0), B = counts.size(1);
  const SegmentStarts starts = segment_starts(counts, num_rows);
  auto out = at::empty_like(rows);
  const int64_t row_bytes = rows.size(1) * rows.element_size();
  const char* src = static_cast<const char*>(rows.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  // Threads take ranges of output rows, not segments, so that one large segment is shared out.
  const int64_t grain = std::max<int64_t>(1, 131072 / std::max<int64_t>(1, row_bytes));
  at::parallel_for(0, num_rows, grain, [&](int64_t begin, int64_t end) {
    copy_output_rows(starts, A, B, src, dst, row_bytes, begin, end);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_kernels, CPU, m) {
  emu::impl_cpu_or_emulated<&transpose_segments_cpu, &emulated::transpose_segments_cuda>(
      m, "transpose_segments");
}

}  // namespace moe_kernels::comm
