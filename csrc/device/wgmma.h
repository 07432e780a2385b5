// Hopper's warpgroup matrix multiply (wgmma.mma_async, sm_90a): one warpgroup (4 warps, 128
// threads) computes D (64 x N, fp32) += A (64 x 16) * B (16 x N) of bf16 or fp16, both operands in
// shared memory, each described by a 64-bit matrix descriptor:
//   bits 0-13 start address >> 4, 16-29 leading byte offset >> 4, 32-45 stride byte offset >> 4,
//   49-51 base offset, 62-63 layout (0 interleaved, 1 128B swizzle, 2 64B, 3 32B).
// An operand is K-major (the PTX default: A row-major, B column-major) or, with trans, MN-major;
// the canonical layouts that LBO and SBO describe are in emu/wgmma.cpp. The instruction is
// asynchronous: wgmma_fence() before the first wgmma that uses accumulators other instructions
// wrote, wgmma_commit() closes the issued ones into a group, wgmma_wait<N>() waits until at most N
// groups are in flight; only then may the accumulators, or the shared memory they read, be
// touched. Accumulators of lane l in warp r of the warpgroup:
//   d[4 i + 2 h + j] = D[16 r + l / 4 + 8 h][8 i + 2 (l % 4) + j].
// Under nvcc the instructions are inline PTX for sm_90a only (the kernels using them compile for
// "9.0a"); on the CPU emulator, emu/hopper.h.
#pragma once

#include <cstdint>
#include <type_traits>

#include "device/runtime.h"
#include "device/types.h"
#include "device/warpgroup.h"  // MOE_KERNELS_SM90A, and emu/hopper.h on the emulator

namespace moe_kernels::device::inline MOE_KERNELS_TARGET {

// Layout types of a descriptor (bits 62-63).
enum class SmemLayout : uint64_t {
  kInterleaved = 0,
  kSwizzle128B = 1,
  kSwizzle64B = 2,
  kSwizzle32B = 3
};

__host__ __device__ __forceinline__ constexpr uint64_t matrix_descriptor(uint32_t address,
                                                                         uint32_t leading_bytes,
                                                                         uint32_t stride_bytes,
                                                                         SmemLayout layout) {
  return uint64_t{(address >> 4) & 0x3fffu} | uint64_t{(leading_bytes >> 4) & 0x3fffu} << 16 |
         uint64_t{(stride_bytes >> 4) & 0x3fffu} << 32 | static_cast<uint64_t>(layout) << 62;
}

__device__ __forceinline__ void wgmma_fence() {
#if defined(MOE_KERNELS_EMULATOR)
  emu::wgmma_fence();
#elif defined(MOE_KERNELS_SM90A)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wgmma_commit() {
#if defined(MOE_KERNELS_EMULATOR)
  emu::wgmma_commit();
#elif defined(MOE_KERNELS_SM90A)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

template <int kInFlight>
__device__ __forceinline__ void wgmma_wait() {
#if defined(MOE_KERNELS_EMULATOR)
  emu::wgmma_wait(kInFlight);
#elif defined(MOE_KERNELS_SM90A)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kInFlight) : "memory");
#endif
}

// Keeps the compiler from moving accesses of the accumulators across the asynchronous window
// (the registers are the wgmma's between its issue and the wait).
template <int kCount>
__device__ __forceinline__ void fence_accumulators(float (&d)[kCount]) {
#if !defined(MOE_KERNELS_EMULATOR)
#pragma unroll
  for (int i = 0; i < kCount; ++i) asm volatile("" : "+f"(d[i])::"memory");
#else
  (void)d;
#endif
}

// d (N / 2 fp32 per thread) = A * B + (scale_d ? d : 0), m64nNk16, T = bf16 or fp16.
template <typename T, int kN, bool kTransA, bool kTransB>
__device__ __forceinline__ void wgmma_m64k16(float (&d)[kN / 2], uint64_t desc_a, uint64_t desc_b,
                                             bool scale_d) {
  static_assert(std::is_same_v<T, bf16> || std::is_same_v<T, fp16>, "wgmma of bf16 or fp16");
#if defined(MOE_KERNELS_EMULATOR)
  emu::wgmma(std::is_same_v<T, bf16> ? emu::WgmmaType::kBF16 : emu::WgmmaType::kFP16, kN, d, desc_a,
             desc_b, scale_d, kTransA, kTransB);
#elif defined(MOE_KERNELS_SM90A)
  static_assert(kN == 128, "the inline PTX is written for N = 128");
  if constexpr (std::is_same_v<T, bf16>) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "
        "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, "
        "%37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, "
        "%55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, %67, %68;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
          "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
          "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
          "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
          "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
          "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
          "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
          "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(static_cast<int>(scale_d)), "n"(int{kTransA}),
          "n"(int{kTransB}));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "
        "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, "
        "%37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, "
        "%55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, %67, %68;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
          "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
          "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
          "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
          "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
          "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
          "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
          "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(static_cast<int>(scale_d)), "n"(int{kTransA}),
          "n"(int{kTransB}));
  }
#else
  (void)d, (void)desc_a, (void)desc_b, (void)scale_d;
#endif
}

}  // namespace moe_kernels::device::inline MOE_KERNELS_TARGET
