// What swiglu_cpu.cpp and the per-instruction-set copies of swiglu_cpu_kernel.cpp share: no
// ATen beyond the scalar types, so that a copy compiled for AVX-512 holds nothing but its loops.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "grouped_gemm/glu_params.h"

namespace moe_kernels::gemm {

// A row-major matrix: its first element and the distance between rows in elements (0 repeats
// one row); the columns are adjacent.
struct Rows {
  const void* data;
  int64_t stride;
};

struct MutableRows {
  void* data;
  int64_t stride;
};

// The row loops of one instruction set, for fp32, fp64, bf16 and fp16 (`dtype`), of the SwiGLU
// variant `glu` (swiglu.h).
struct SwigluRowKernels {
  // out[r] = swiglu(pre[r, :half], pre[r, half:])
  void (*forward)(c10::ScalarType dtype, Rows pre, MutableRows out, int64_t rows, int64_t half,
                  GluParams glu);
  // grad_pre[r] = the gradient of grad_out[r] . swiglu(gate, up) w.r.t. [gate | up]
  void (*backward)(c10::ScalarType dtype, Rows grad_out, Rows pre, MutableRows grad_pre,
                   int64_t rows, int64_t half, GluParams glu);
};

}  // namespace moe_kernels::gemm
