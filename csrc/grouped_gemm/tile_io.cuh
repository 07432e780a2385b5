// How the grouped GEMM kernels map a tile's lines and columns onto the matrices, and write a
// tile's results: shared by the tensor-core and the SIMT kernels. Torch-free.
#pragma once

#include <cstdint>
#include <type_traits>

#include "device/pack.h"
#include "device/runtime.h"
#include "device/types.h"
#include "grouped_gemm/grouped_gemm_problem.h"
#include "grouped_gemm/swiglu.h"
#include "grouped_gemm/tile_schedule.cuh"

namespace moe_kernels::gemm::MOE_KERNELS_TARGET {

// The next `left` lines (or columns) of a matrix in order; those past the end read as zeros.
struct Contiguous {
  int64_t left;
  __device__ __forceinline__ int64_t offset(int i) const { return i; }
  __device__ __forceinline__ bool valid(int i) const { return i < left; }
};

// SwiGLU's N columns: a tile's blocks of 8 columns come alternately from the gate half and from
// the up half (`half` columns further), so that gate column c and up column c land 8 columns
// apart in the tile, in the same thread's accumulators (the same fragment slot of the next mma
// tile). `left` counts output (gate) columns.
struct GateUpInterleaved {
  int64_t half;
  int64_t left;
  // The output column of the tile's gate column c (c in an even block of 8).
  __device__ __forceinline__ static int output_column(int c) { return (c >> 4) * 8 + (c & 7); }
  __device__ __forceinline__ int64_t offset(int c) const {
    return output_column(c) + ((c >> 3) & 1 ? half : 0);
  }
  __device__ __forceinline__ bool valid(int c) const { return output_column(c) < left; }
};

// What tile `w` reads: its expert's L and R (origins of the expert's matrices), the extents of
// the expert's M and K, and the tile's rows and columns left in the matrices (SwiGLU's columns
// interleaved).
template <typename T, bool kSwiglu>
struct TileOperands {
  using Columns = std::conditional_t<kSwiglu, GateUpInterleaved, Contiguous>;
  const T* lhs;
  const T* rhs;
  int64_t m_extent, k_extent;
  Contiguous rows;
  Columns cols;
};

template <typename T, Grouping kGrouping, bool kSwiglu>
__device__ __forceinline__ TileOperands<T, kSwiglu> tile_operands(const GroupedGemmProblem& p,
                                                                  const TileWork& w) {
  const bool by_rows = kGrouping == Grouping::kRows;
  const T* lhs = static_cast<const T*>(p.lhs.data) + w.segment_start * p.lhs.ld;
  const T* rhs = static_cast<const T*>(p.rhs.data) +
                 (by_rows ? w.expert * p.rhs.expert_stride : w.segment_start * p.rhs.ld);
  const int64_t m_extent = by_rows ? w.segment_rows : p.m;
  const int64_t k_extent = by_rows ? p.k : w.segment_rows;
  typename TileOperands<T, kSwiglu>::Columns cols;
  if constexpr (kSwiglu) {
    cols = GateUpInterleaved{p.swiglu_half, p.swiglu_half - w.n0};
  } else {
    cols = Contiguous{p.n - w.n0};
  }
  return {lhs, rhs, m_extent, k_extent, Contiguous{m_extent - w.m0}, cols};
}

// A tile of the output from its origin: rows and columns past the matrix are dropped. Values
// come in pairs of adjacent columns (c even), stored as one 2-element access when `paired`
// (every row of the output and of `pre` starts 2-element aligned).
template <typename T>
struct TileOutput {
  using acc = device::acc_t<T>;
  T* out;
  int64_t ld;
  int64_t rows_left, cols_left;
  bool paired;
  T* pre = nullptr;  // SwiGLU: the product [gate | up], `half` columns each; null: not kept
  int64_t pre_ld = 0;
  int64_t half = 0;
  GluParams glu;

  __device__ __forceinline__ static void put(T* to, int64_t cols_left, bool paired, acc v0,
                                             acc v1) {
    if (paired && cols_left >= 2) {
      *reinterpret_cast<device::Pack<T, 2>*>(to) = device::Pack<T, 2>{{T(v0), T(v1)}};
      return;
    }
    to[0] = T(v0);
    if (cols_left >= 2) to[1] = T(v1);
  }

  // D[r][c..c+1] = v0, v1.
  __device__ __forceinline__ void store(int r, int c, acc v0, acc v1) const {
    if (r >= rows_left || c >= cols_left) return;
    put(out + r * ld + c, cols_left - c, paired, v0, v1);
  }

  // SwiGLU of the tile's gate columns c, c+1 (an even block) and their up columns (c + 8).
  __device__ __forceinline__ void store_swiglu(int r, int c, acc gate0, acc gate1, acc up0,
                                               acc up1) const {
    store_swiglu_at(r, GateUpInterleaved::output_column(c), gate0, gate1, up0, up1);
  }

  // SwiGLU into output columns col, col+1 (col even) from their gate and up values.
  __device__ __forceinline__ void store_swiglu_at(int r, int col, acc gate0, acc gate1, acc up0,
                                                  acc up1) const {
    if (r >= rows_left || col >= cols_left) return;
    put(out + r * ld + col, cols_left - col, paired, swiglu(gate0, up0, glu),
        swiglu(gate1, up1, glu));
    if (pre == nullptr) return;
    put(pre + r * pre_ld + col, cols_left - col, paired, gate0, gate1);
    put(pre + r * pre_ld + half + col, cols_left - col, paired, up0, up1);
  }
};

// Where tile `w` of the output lies: in the expert's row segment (kRows) or in its own matrix.
template <typename T, Grouping kGrouping, bool kSwiglu>
__device__ __forceinline__ TileOutput<T> tile_output(const GroupedGemmProblem& p, const TileWork& w,
                                                     int64_t m_extent) {
  const bool rows = kGrouping == Grouping::kRows;
  const int64_t row0 = rows ? w.segment_start + w.m0 : w.m0;
  T* out = static_cast<T*>(p.out.data) + (rows ? 0 : w.expert * p.out.expert_stride);
  TileOutput<T> o{out + row0 * p.out.ld + w.n0, p.out.ld, m_extent - w.m0, output_columns(p) - w.n0,
                  p.paired_output};
  if constexpr (kSwiglu) {
    if (p.pre.data != nullptr) o.pre = static_cast<T*>(p.pre.data) + row0 * p.pre.ld + w.n0;
    o.pre_ld = p.pre.ld;
    o.half = p.swiglu_half;
    o.glu = p.glu;
  }
  return o;
}

}  // namespace moe_kernels::gemm::MOE_KERNELS_TARGET
