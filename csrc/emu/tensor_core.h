// The CPU emulator's tensor-core instructions, behind device/tensor_core.h (which documents the
// fragment layouts): warp collectives whose last lane to arrive computes for the whole warp.
#pragma once

#include <cstdint>

namespace moe_kernels::emu {

enum class MmaType : int { kBF16, kFP16 };

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32: d = a * b + c, d may be c.
void mma_m16n8k16(MmaType type, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                  const float (&c)[4]);

// ldmatrix.sync.aligned.m8n8.x{tiles}{.trans}.shared.b16 into r[0..tiles).
void ldmatrix(int tiles, bool trans, uint32_t* r, const void* row);

}  // namespace moe_kernels::emu
