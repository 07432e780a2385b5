// The grouped GEMM on tensor cores (Ampere and Hopper), for bf16 and fp16 with fp32
// accumulators. A persistent grid walks the device-side tile schedule; each block computes a
// Tile::kM x Tile::kN tile of one expert's output:
//   - a kStages-deep cp.async pipeline brings K-slices of both operands into shared memory,
//     16-byte chunks, zero-filled past the matrices' edges, swizzled so that neither the copies
//     nor ldmatrix meet bank conflicts;
//   - each warp owns a kWarpTileM x kWarpTileN sub-tile: per 16-wide K step it loads its A and B
//     fragments with ldmatrix (.trans when the operand's inner index is not K) and issues
//     kFragsM x kFragsN mma.sync m16n8k16;
//   - the epilogue writes from the accumulators, optionally through SwiGLU.
// Requires 16-byte aligned operand rows (the launcher checks, and falls back to the SIMT kernel
// otherwise). Torch-free: compiled by nvcc, and by the CPU emulator.
#pragma once

#include <cstdint>

#include "device/async_copy.h"
#include "device/runtime.h"
#include "device/tensor_core.h"
#include "device/types.h"
#include "device/warp.h"
#include "grouped_gemm/grouped_gemm_problem.h"
#include "grouped_gemm/tile_io.cuh"
#include "grouped_gemm/tile_schedule.cuh"

namespace moe_kernels::gemm::MOE_KERNELS_TARGET {

template <int kM_, int kN_, int kK_, int kWarpsM_, int kWarpsN_, int kStages_>
struct TensorCoreTile {
  static constexpr int kM = kM_, kN = kN_, kK = kK_, kStages = kStages_;
  static constexpr int kWarpsM = kWarpsM_, kWarpsN = kWarpsN_;
  static constexpr int kThreads = kWarpsM * kWarpsN * device::kWarpSize;
  static constexpr int kWarpTileM = kM / kWarpsM, kWarpTileN = kN / kWarpsN;
  static constexpr int kFragsM = kWarpTileM / 16, kFragsN = kWarpTileN / 8;
  static constexpr int kStageElements = (kM + kN) * kK;
  static constexpr int kSharedBytes = kStageElements * kStages * 2;  // 16-bit elements
  static_assert(kWarpTileM % 16 == 0 && kWarpTileN % 16 == 0, "whole mma tiles, B in pairs");
  static_assert(kM % 64 == 0 && kN % 64 == 0 && kK % 64 == 0, "swizzled lines of 8+ chunks");
  static_assert(kStages >= 2, "a pipeline");
};

// Element (line, col) of a shared tile of lines kWidth elements wide: the 16-byte chunk index is
// XORed with the line (mod 8), so 8 consecutive lines at one column fall in 8 bank groups.
template <int kWidth>
__device__ __forceinline__ int swizzle(int line, int col) {
  return line * kWidth + (((col >> 3) ^ (line & 7)) << 3) + (col & 7);
}

// Starts the copy of a kLines x kWidth tile whose element (i, j) is src[lines.offset(i) * ld +
// cols.offset(j)], 16 bytes per cp.async, zeros where a line or chunk is past the matrix.
template <int kLines, int kWidth, int kThreads, typename T, typename Lines, typename Columns>
__device__ __forceinline__ void load_tile_async(T* tile, const T* src, int64_t ld, Lines lines,
                                                Columns cols) {
  constexpr int kChunks = kWidth / 8;
  static_assert(kLines * kChunks % kThreads == 0, "every thread copies as many chunks");
#pragma unroll
  for (int i = 0; i < kLines * kChunks / kThreads; ++i) {
    const int chunk = static_cast<int>(threadIdx.x) + i * kThreads;
    const int line = chunk / kChunks, col = chunk % kChunks * 8;
    const bool valid = lines.valid(line) && cols.valid(col);
    const T* from = valid ? src + lines.offset(line) * ld + cols.offset(col) : src;
    device::cp_async<16>(tile + swizzle<kWidth>(line, col), from, valid ? 16 : 0);
  }
}

// The A fragments (16 rows x 16 K) of mma tile `i` at K step `kk`, from a shared tile stored
// [kM][kK] (K-major: ldmatrix gives the layout directly) or [kK][kM] (M-major: .trans).
template <typename Tile, bool kKMajor, typename T>
__device__ __forceinline__ void load_a_fragment(uint32_t (&a)[4], const T* tile, int row0, int kk) {
  const int lane = device::lane_id();
  if constexpr (kKMajor) {
    // Lanes 0-15 address rows 0-15 at K 0-7, lanes 16-31 the same rows at K 8-15.
    device::ldmatrix<4, false>(a,
                               tile + swizzle<Tile::kK>(row0 + (lane & 15), kk + (lane >> 4) * 8));
  } else {
    // Tile q = lane / 8 is rows (q % 2) * 8 .. +7 at K (q / 2) * 8 .. +7, stored transposed.
    const int q = lane >> 3;
    device::ldmatrix<4, true>(
        a, tile + swizzle<Tile::kM>(kk + (q >> 1) * 8 + (lane & 7), row0 + (q & 1) * 8));
  }
}

// The B fragments of the two mma tiles at columns col0 .. col0+15: b0 for the first 8, b1 for
// the next 8, from a shared tile stored [kN][kK] (K-major) or [kK][kN] (N-major: .trans).
template <typename Tile, bool kKMajor, typename T>
__device__ __forceinline__ void load_b_fragments(uint32_t (&b0)[2], uint32_t (&b1)[2],
                                                 const T* tile, int col0, int kk) {
  const int lane = device::lane_id();
  const int q = lane >> 3;  // tile q: columns (q / 2) * 8 .. +7 at K (q % 2) * 8 .. +7
  uint32_t r[4];
  if constexpr (kKMajor) {
    device::ldmatrix<4, false>(
        r, tile + swizzle<Tile::kK>(col0 + (q >> 1) * 8 + (lane & 7), kk + (q & 1) * 8));
  } else {
    device::ldmatrix<4, true>(
        r, tile + swizzle<Tile::kN>(kk + (q & 1) * 8 + (lane & 7), col0 + (q >> 1) * 8));
  }
  b0[0] = r[0], b0[1] = r[1], b1[0] = r[2], b1[1] = r[3];
}

template <typename T, typename Tile, Grouping kGrouping, bool kLhsKMajor, bool kRhsKMajor,
          bool kSwiglu>
__global__ void __launch_bounds__(Tile::kThreads)
    tensor_core_gemm_kernel(GroupedGemmProblem p, TileSchedule schedule) {
  MOE_KERNELS_DYNAMIC_SHARED(T, shared);
  const int warp = device::warp_id(), lane = device::lane_id();
  const int warp_row = warp % Tile::kWarpsM * Tile::kWarpTileM;
  const int warp_col = warp / Tile::kWarpsM * Tile::kWarpTileN;
  const int64_t num_tiles = schedule.num_tiles();

  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const TileWork w = schedule.at(tile);
    const auto t = tile_operands<T, kGrouping, kSwiglu>(p, w);

    // Stage s holds the K-slice kt: A then B.
    const auto load_stage = [&](int64_t kt) {
      T* a_tile = shared + kt % Tile::kStages * Tile::kStageElements;
      T* b_tile = a_tile + Tile::kM * Tile::kK;
      const int64_t k0 = kt * Tile::kK;
      const Contiguous ks{t.k_extent - k0};
      if constexpr (kLhsKMajor) {
        load_tile_async<Tile::kM, Tile::kK, Tile::kThreads>(a_tile, t.lhs + w.m0 * p.lhs.ld + k0,
                                                            p.lhs.ld, t.rows, ks);
      } else {
        load_tile_async<Tile::kK, Tile::kM, Tile::kThreads>(a_tile, t.lhs + k0 * p.lhs.ld + w.m0,
                                                            p.lhs.ld, ks, t.rows);
      }
      if constexpr (kRhsKMajor) {
        load_tile_async<Tile::kN, Tile::kK, Tile::kThreads>(b_tile, t.rhs + w.n0 * p.rhs.ld + k0,
                                                            p.rhs.ld, t.cols, ks);
      } else {
        load_tile_async<Tile::kK, Tile::kN, Tile::kThreads>(b_tile, t.rhs + k0 * p.rhs.ld + w.n0,
                                                            p.rhs.ld, ks, t.cols);
      }
    };

    float acc[Tile::kFragsM][Tile::kFragsN][4];
#pragma unroll
    for (int i = 0; i < Tile::kFragsM; ++i) {
#pragma unroll
      for (int j = 0; j < Tile::kFragsN; ++j) {
        acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.0f;
      }
    }

    const int64_t k_tiles = (t.k_extent + Tile::kK - 1) / Tile::kK;
    // One commit per slice, empty or not, so that "all but the kStages - 2 newest groups have
    // landed" always means "slice kt has landed".
#pragma unroll
    for (int s = 0; s < Tile::kStages - 1; ++s) {
      if (s < k_tiles) load_stage(s);
      device::cp_async_commit();
    }
    for (int64_t kt = 0; kt < k_tiles; ++kt) {
      device::cp_async_wait<Tile::kStages - 2>();
      // Slice kt is visible to all warps, and all have finished slice kt - 1, whose stage the
      // next load overwrites.
      __syncthreads();
      if (kt + Tile::kStages - 1 < k_tiles) load_stage(kt + Tile::kStages - 1);
      device::cp_async_commit();

      const T* a_tile = shared + kt % Tile::kStages * Tile::kStageElements;
      const T* b_tile = a_tile + Tile::kM * Tile::kK;
#pragma unroll
      for (int kk = 0; kk < Tile::kK; kk += 16) {
        uint32_t a[Tile::kFragsM][4];
#pragma unroll
        for (int i = 0; i < Tile::kFragsM; ++i) {
          load_a_fragment<Tile, kLhsKMajor>(a[i], a_tile, warp_row + i * 16, kk);
        }
        // B one pair of mma tiles at a time: its fragments live only across kFragsM x 2 mma.
#pragma unroll
        for (int j = 0; j < Tile::kFragsN; j += 2) {
          uint32_t b0[2], b1[2];
          load_b_fragments<Tile, kRhsKMajor>(b0, b1, b_tile, warp_col + j * 8, kk);
#pragma unroll
          for (int i = 0; i < Tile::kFragsM; ++i) {
            device::mma_m16n8k16<T>(acc[i][j], a[i], b0, acc[i][j]);
            device::mma_m16n8k16<T>(acc[i][j + 1], a[i], b1, acc[i][j + 1]);
          }
        }
      }
    }
    // The next tile's first loads overwrite the stages this one read.
    device::cp_async_wait<0>();
    __syncthreads();

    const TileOutput<T> out = tile_output<T, kGrouping, kSwiglu>(p, w, t.m_extent);
    const int group = lane >> 2, pair = (lane & 3) * 2;  // the C fragment's row and columns
#pragma unroll
    for (int i = 0; i < Tile::kFragsM; ++i) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = warp_row + i * 16 + group + half * 8;
        const int x = half * 2;
#pragma unroll
        for (int j = 0; j < Tile::kFragsN; j += kSwiglu ? 2 : 1) {
          const int c = warp_col + j * 8 + pair;
          if constexpr (kSwiglu) {
            out.store_swiglu(r, c, acc[i][j][x], acc[i][j][x + 1], acc[i][j + 1][x],
                             acc[i][j + 1][x + 1]);
          } else {
            out.store(r, c, acc[i][j][x], acc[i][j][x + 1]);
          }
        }
      }
    }
  }
}

}  // namespace moe_kernels::gemm::MOE_KERNELS_TARGET
