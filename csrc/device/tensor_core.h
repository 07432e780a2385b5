// Tensor-core primitives of Ampere and Hopper, one warp each: `mma.sync` m16n8k16 (16-bit
// inputs, fp32 accumulators) and `ldmatrix` (8x8 tiles of 16-bit elements from shared memory
// into the fragments mma expects). Inline PTX under nvcc; on the CPU emulator the same calls
// are warp collectives that place every element where the PTX ISA manual's fragment layouts
// say, so a kernel that indexes a fragment wrongly computes a wrong product there too.
//
// Fragments, for lane l, g = l / 4 (its group), t = l % 4 (its place in the group); registers
// hold two 16-bit elements, the lower-indexed one in the low half:
//   A (16x16, row-major): a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..],
//                         a[3] = A[g+8][2t+8..]
//   B (16x8, K x N):      b[0] = B[2t..2t+1][g],  b[1] = B[2t+8..2t+9][g]
//   C, D (16x8, fp32):    c[0..1] = C[g][2t..2t+1], c[2..3] = C[g+8][2t..2t+1]
// ldmatrix: lanes 8i..8i+7 give the addresses of the 8 rows (16 bytes each) of tile i; lane l
// gets in r[i] the elements (l/4, 2(l%4)..2(l%4)+1) of tile i, or of its transpose with kTrans.
#pragma once

#include <cstdint>

#include "device/runtime.h"
#include "device/types.h"

#if defined(MOE_KERNELS_EMULATOR)
#include "emu/tensor_core.h"
#endif

namespace moe_kernels::device::inline MOE_KERNELS_TARGET {

template <typename T>
constexpr bool kIsTensorCoreType = std::is_same_v<T, bf16> || std::is_same_v<T, fp16>;

// d = a * b + c over one 16x8x16 tile; every lane of the warp calls it.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2], const float (&c)[4]) {
  static_assert(kIsTensorCoreType<T>, "mma_m16n8k16 multiplies bf16 or fp16");
#if defined(MOE_KERNELS_EMULATOR)
  emu::mma_m16n8k16(std::is_same_v<T, bf16> ? emu::MmaType::kBF16 : emu::MmaType::kFP16, d, a, b,
                    c);
#else
  if constexpr (std::is_same_v<T, bf16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
          "f"(c[2]), "f"(c[3]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
          "f"(c[2]), "f"(c[3]));
  }
#endif
}

// kTiles (1, 2 or 4) 8x8 tiles of 16-bit elements from shared memory; `row` is the address of
// this lane's row (16-byte aligned); every lane of the warp calls it.
template <int kTiles, bool kTrans>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[kTiles], const void* row) {
  static_assert(kTiles == 1 || kTiles == 2 || kTiles == 4, "ldmatrix loads 1, 2 or 4 tiles");
#if defined(MOE_KERNELS_EMULATOR)
  emu::ldmatrix(kTiles, kTrans, r, row);
#else
  const auto address = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  if constexpr (kTiles == 4 && kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  } else if constexpr (kTiles == 4) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  } else if constexpr (kTiles == 2 && kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(address));
  } else if constexpr (kTiles == 2) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(address));
  } else if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0])
                 : "r"(address));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0])
                 : "r"(address));
  }
#endif
}

}  // namespace moe_kernels::device::inline MOE_KERNELS_TARGET
