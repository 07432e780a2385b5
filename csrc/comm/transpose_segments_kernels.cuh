// transpose_segments on the device, with no host synchronisation. Torch-free: compiled by nvcc,
// and by the CPU emulator.
//
// Two kernels. A one-block scan turns counts [A, B] into the first row of every segment on both
// sides, (a, b) order in the input and (b, a) order in the output, into a small workspace; then
// one warp per output row finds its segment by binary search over the output starts and copies
// the row from the input. Every copying block needs the starts of all A * B segments: computed
// once into global memory (they stay in L1/L2 for the searches), they cost O(A * B) once rather
// than per block, and no shared-memory size limits the number of segments.
//
// The counts are not checked (that would synchronise). Each count is clamped to [0, num_rows],
// so no sum can overflow, and a row is copied only from a source inside the input: an output
// row past the last segment, or whose source row is at or past num_rows, is written as zeros.
#pragma once

#include <cstdint>

#include "device/block_scan.h"
#include "device/pack.h"
#include "device/runtime.h"
#include "device/warp.h"

namespace moe_kernels::comm::MOE_KERNELS_TARGET {

constexpr int kScanThreads = 256;
constexpr int kCopyWarps = 8;
constexpr int kCopyThreads = kCopyWarps * device::kWarpSize;

// A count as the kernels take it: a negative one is empty, and none exceeds the rows, so no sum of
// them overflows.
__device__ __forceinline__ int64_t clamped_count(int64_t count, int64_t num_rows) {
  return count < 0 ? 0 : (count > num_rows ? num_rows : count);
}

// input_start [A * B]: the first input row of segment (a, b), at a * B + b. output_start
// [A * B + 1]: the first output row of segment (a, b), at b * A + a, then the total. One pass
// per tile of kScanThreads positions, one per thread, scanned in both orders. The scans alternate
// between two warp-total arrays: a slower thread may still be reading one scan's totals when a
// faster one writes the next scan's.
__global__ void __launch_bounds__(kScanThreads)
    segment_starts_kernel(const int64_t* __restrict__ counts, int64_t A, int64_t B,
                          int64_t num_rows, int64_t* __restrict__ input_start,
                          int64_t* __restrict__ output_start) {
  MOE_KERNELS_SHARED(int64_t, warp_totals, [2][kScanThreads / device::kWarpSize]);
  const int64_t num_segments = A * B;
  int64_t input_before = 0, output_before = 0, total = 0;
  for (int64_t base = 0; base < num_segments; base += kScanThreads) {
    // Position i is segment (i / B, i % B) in the input order, (i % A, i / A) in the output's.
    const int64_t i = base + threadIdx.x;
    const bool in_grid = i < num_segments;
    const int64_t input_count = in_grid ? clamped_count(counts[i], num_rows) : 0;
    const int64_t output_count = in_grid ? clamped_count(counts[(i % A) * B + i / A], num_rows) : 0;
    const int64_t input_row = input_before + device::block_exclusive_sum<kScanThreads>(
                                                 input_count, warp_totals[0], &total);
    input_before += total;
    const int64_t output_row = output_before + device::block_exclusive_sum<kScanThreads>(
                                                   output_count, warp_totals[1], &total);
    output_before += total;
    if (in_grid) {
      input_start[i] = input_row;
      output_start[i] = output_row;
    }
  }
  if (threadIdx.x == 0) output_start[num_segments] = output_before;
}

// The input row that output row r copies, or -1 for none: r's segment is the last whose output
// start is <= r (an empty segment shares its start with the next one).
__device__ __forceinline__ int64_t source_row(int64_t r, const int64_t* __restrict__ input_start,
                                              const int64_t* __restrict__ output_start, int64_t A,
                                              int64_t B, int64_t num_rows) {
  const int64_t num_segments = A * B;
  if (r >= output_start[num_segments]) return -1;
  int64_t lo = 0, hi = num_segments;  // output_start[lo] <= r < output_start[hi]
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (output_start[mid] <= r) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  const int64_t source = input_start[(lo % A) * B + lo / A] + (r - output_start[lo]);
  return source < num_rows ? source : -1;
}

// out[r] = rows[source_row(r)], or zeros where there is none; one warp per output row, in packs
// of kVec elements (16 bytes when the launcher found the rows aligned). Offsets are 64-bit.
template <typename T, int kVec>
__global__ void __launch_bounds__(kCopyThreads)
    transpose_segments_kernel(const T* __restrict__ rows, int64_t num_rows, int64_t hidden_size,
                              const int64_t* __restrict__ input_start,
                              const int64_t* __restrict__ output_start, int64_t A, int64_t B,
                              T* __restrict__ out) {
  using Pack = device::Pack<T, kVec>;
  const int64_t packs = hidden_size / kVec;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kCopyWarps;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kCopyWarps + device::warp_id(); r < num_rows;
       r += stride) {
    const int64_t source = source_row(r, input_start, output_start, A, B, num_rows);
    Pack* dst = reinterpret_cast<Pack*>(out + r * hidden_size);
    if (source < 0) {
      Pack zero;
      for (int i = 0; i < kVec; ++i) zero.v[i] = static_cast<T>(0.0f);
      for (int64_t p = device::lane_id(); p < packs; p += device::kWarpSize) dst[p] = zero;
      continue;
    }
    const Pack* src = reinterpret_cast<const Pack*>(rows + source * hidden_size);
    for (int64_t p = device::lane_id(); p < packs; p += device::kWarpSize) dst[p] = src[p];
  }
}

}  // namespace moe_kernels::comm::MOE_KERNELS_TARGET
