// The grouped GEMM on CUDA cores: fp32 and fp64 (the reference-precision path tests compare
// against), and the fallback for 16-bit operands whose rows are not 16-byte aligned. Same tile
// schedule, operand views and epilogue as the tensor-core kernel; a 64 x 64 tile per block of
// 256 threads, each thread accumulating 4 rows x 4 columns in the accumulator type, K in
// slices of 16 through shared memory. Torch-free: compiled by nvcc, and by the CPU emulator.
#pragma once

#include <cstdint>

#include "device/runtime.h"
#include "device/types.h"
#include "grouped_gemm/grouped_gemm_problem.h"
#include "grouped_gemm/tile_io.cuh"
#include "grouped_gemm/tile_schedule.cuh"

namespace moe_kernels::gemm::MOE_KERNELS_TARGET {

constexpr int kSimtM = 64, kSimtN = 64, kSimtK = 16, kSimtThreads = 256;

// Copies a kSimtK x kWidth slice of an operand into tile[k][x], converted to the accumulator
// type, zeros past the matrix. Element (x, k) of the operand is at src[xs.offset(x) * ld + k]
// when it is K-major, src[k * ld + xs.offset(x)] otherwise; consecutive threads take
// consecutive addresses.
template <int kWidth, bool kKMajor, typename T, typename acc, typename Xs>
__device__ __forceinline__ void load_slice(acc (*tile)[kWidth], const T* src, int64_t ld,
                                           int64_t k_left, Xs xs) {
  for (int i = static_cast<int>(threadIdx.x); i < kSimtK * kWidth; i += kSimtThreads) {
    const int k = kKMajor ? i % kSimtK : i / kWidth;
    const int x = kKMajor ? i / kSimtK : i % kWidth;
    const bool valid = k < k_left && xs.valid(x);
    const int64_t at = kKMajor ? xs.offset(x) * ld + k : k * ld + xs.offset(x);
    tile[k][x] = valid ? static_cast<acc>(src[at]) : acc(0);
  }
}

template <typename T, Grouping kGrouping, bool kLhsKMajor, bool kRhsKMajor, bool kSwiglu>
__global__ void __launch_bounds__(kSimtThreads)
    simt_gemm_kernel(GroupedGemmProblem p, TileSchedule schedule) {
  using acc = device::acc_t<T>;
  MOE_KERNELS_SHARED(acc, lhs_tile, [kSimtK][kSimtM]);
  MOE_KERNELS_SHARED(acc, rhs_tile, [kSimtK][kSimtN]);
  // Rows ty + 16 i; columns 16 (tx / 4) + 2 (tx % 4) + {0, 1, 8, 9}: a gate column pair and its
  // up pair under SwiGLU.
  const int ty = static_cast<int>(threadIdx.x) / 16, tx = static_cast<int>(threadIdx.x) % 16;
  const int col0 = tx / 4 * 16 + tx % 4 * 2;
  const int col[4] = {col0, col0 + 1, col0 + 8, col0 + 9};
  const int64_t num_tiles = schedule.num_tiles();

  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const TileWork w = schedule.at(tile);
    const auto t = tile_operands<T, kGrouping, kSwiglu>(p, w);

    acc sum[4][4] = {};
    for (int64_t k0 = 0; k0 < t.k_extent; k0 += kSimtK) {
      __syncthreads();  // every thread is done with the previous slice
      const T* l = kLhsKMajor ? t.lhs + w.m0 * p.lhs.ld + k0 : t.lhs + k0 * p.lhs.ld + w.m0;
      const T* r = kRhsKMajor ? t.rhs + w.n0 * p.rhs.ld + k0 : t.rhs + k0 * p.rhs.ld + w.n0;
      load_slice<kSimtM, kLhsKMajor>(lhs_tile, l, p.lhs.ld, t.k_extent - k0, t.rows);
      load_slice<kSimtN, kRhsKMajor>(rhs_tile, r, p.rhs.ld, t.k_extent - k0, t.cols);
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kSimtK; ++k) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const acc a = lhs_tile[k][ty + 16 * i];
#pragma unroll
          for (int j = 0; j < 4; ++j) sum[i][j] += a * rhs_tile[k][col[j]];
        }
      }
    }

    const TileOutput<T> out = tile_output<T, kGrouping, kSwiglu>(p, w, t.m_extent);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = ty + 16 * i;
      if constexpr (kSwiglu) {
        out.store_swiglu(r, col[0], sum[i][0], sum[i][1], sum[i][2], sum[i][3]);
      } else {
        out.store(r, col[0], sum[i][0], sum[i][1]);
        out.store(r, col[2], sum[i][2], sum[i][3]);
      }
    }
  }
}

}  // namespace moe_kernels::gemm::MOE_KERNELS_TARGET
