// A grouped GEMM as the device kernels see it, torch-free: for each expert e,
//   D_e[m, n] = sum_k L_e[m, k] * R_e[k, n],
// where the experts' consecutive row segments (tokens_per_expert) give either the rows of
// D_e and L_e (Grouping::kRows: forward and input gradient, c_e = a_e @ b[e]) or the reduction
// (Grouping::kReduction: weight gradient, dB[e] = a_e^T @ grad_c_e, where an empty segment
// gives zeros). Every matrix is a strided view: element (outer, inner) of an operand lies at
// origin + outer * ld + inner, and whether the inner index runs along K ("K-major") or along M
// (for L) or N (for R) is the operand's layout.
#pragma once

#include <cstdint>

#include "common/host_device.h"
#include "grouped_gemm/glu_params.h"

namespace moe_kernels::gemm {

enum class Grouping : int { kRows = 0, kReduction = 1 };

// An operand's origin for expert e: data + segment_start(e) * ld when it is made of row
// segments, data + e * expert_stride when it is a stack of per-expert matrices (weights).
struct Operand {
  const void* data = nullptr;
  int64_t ld = 0;
  int64_t expert_stride = 0;
  bool k_major = true;
};

struct Output {
  void* data = nullptr;
  int64_t ld = 0;
  int64_t expert_stride = 0;
};

struct GroupedGemmProblem {
  Grouping grouping = Grouping::kRows;
  Operand lhs;  // L: always row segments (a, or grad_c)
  Operand rhs;  // R: the weights (kRows) or row segments (kReduction)
  Output out;   // D (kRows: row segments; kReduction: per-expert matrices)
  // SwiGLU epilogue (kRows only): R's N = 2 * swiglu_half columns [gate | up]; `out` receives
  // swiglu(gate, up) ([rows, swiglu_half], the variant `glu`) and `pre` the product itself
  // ([rows, 2 * half]), unless its data is null (the product is not kept).
  bool swiglu = false;
  int64_t swiglu_half = 0;
  GluParams glu;
  Output pre;
  // Whether every output row (and `pre` row) starts 2-element aligned: the epilogue then stores
  // pairs of columns as one access. Set by the launcher.
  bool paired_output = false;
  // kRows: m is the total number of rows; kReduction: k is. The other two are fixed.
  int64_t m = 0, n = 0, k = 0;
  int64_t num_experts = 0;
  const void* tokens_per_expert = nullptr;  // [num_experts], int32 or int64, on the device
  bool tokens_int32 = false;
  // 2 * (num_experts + 1) int64 on the device, for the tile schedule.
  int64_t* workspace = nullptr;
};

// Columns of the output: N, or the SwiGLU half.
MOE_KERNELS_HOST_DEVICE int64_t output_columns(const GroupedGemmProblem& p) {
  return p.swiglu ? p.swiglu_half : p.n;
}

}  // namespace moe_kernels::gemm
