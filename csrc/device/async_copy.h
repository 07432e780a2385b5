// Asynchronous copies from global to shared memory (`cp.async`, Ampere and Hopper): a thread
// issues copies, closes them into a group with cp_async_commit, and cp_async_wait<N> waits until
// at most N of its groups are still in flight. The data of a copy may land in shared memory at
// any moment between its issue and the wait that covers it, and other threads see it only after
// a __syncthreads that follows that wait. The emulator lands copies either at the issue (schedule
// "forward": a copy that overwrites a tile other warps still read shows) or at the wait (other
// schedules: a read before the wait sees the shared-memory poison).
#pragma once

#include <cstdint>

#include "device/runtime.h"

#if defined(MOE_KERNELS_EMULATOR)
#include "emu/async_copy.h"
#endif

namespace moe_kernels::device::inline MOE_KERNELS_TARGET {

// Copies kBytes (4, 8 or 16; both addresses aligned to it) from global `src` to shared `dst`,
// of which only the first `src_bytes` are read: the rest is filled with zeros, and with
// src_bytes == 0 nothing is read (a tile's edge past the end of a matrix).
template <int kBytes>
__device__ __forceinline__ void cp_async(void* dst, const void* src, int src_bytes) {
  static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16, "cp.async copies 4, 8 or 16 bytes");
#if defined(MOE_KERNELS_EMULATOR)
  emu::async_copy(dst, src, kBytes, src_bytes);
#else
  const auto address = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  if constexpr (kBytes == 16) {
    // .cg: through L2 only; the operand tiles are reused from shared memory, not L1.
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(src),
                 "r"(src_bytes));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(address), "l"(src),
                 "n"(kBytes), "r"(src_bytes));
  }
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(MOE_KERNELS_EMULATOR)
  emu::async_copy_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int kInFlight>
__device__ __forceinline__ void cp_async_wait() {
#if defined(MOE_KERNELS_EMULATOR)
  emu::async_copy_wait(kInFlight);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kInFlight));
#endif
}

}  // namespace moe_kernels::device::inline MOE_KERNELS_TARGET
