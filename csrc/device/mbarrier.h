// mbarriers (sm_90): 64-bit shared-memory objects that complete a phase when an expected number of
// arrivals and of transaction bytes (tensor copies' complete_tx) have both come in. Threads wait
// for a phase by its parity: mbarrier_wait(bar, p) returns once the phase of parity p has
// completed; a fresh barrier is in phase 0, so waiting for parity 1 returns at once (how a ring's
// "empty" barriers start out free). Inline PTX under nvcc, the CPU emulator's otherwise.
#pragma once

#include <cstdint>

#include "device/runtime.h"
#include "device/warpgroup.h"

namespace moe_kernels::device::inline MOE_KERNELS_TARGET {

// One thread initialises; the others may use the barrier after fence_barrier_init() and a
// __syncthreads.
__device__ __forceinline__ void mbarrier_init(uint64_t* barrier, uint32_t arrivals) {
#if defined(MOE_KERNELS_EMULATOR)
  emu::mbarrier_init(shared_address(barrier), arrivals);
#elif defined(MOE_KERNELS_SM90A)
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(shared_address(barrier)),
               "r"(arrivals));
#endif
}

// Makes initialised barriers visible to the asynchronous units.
__device__ __forceinline__ void fence_barrier_init() {
#if defined(MOE_KERNELS_SM90A)
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void mbarrier_arrive(uint64_t* barrier) {
#if defined(MOE_KERNELS_EMULATOR)
  emu::mbarrier_arrive(shared_address(barrier), 0);
#elif defined(MOE_KERNELS_SM90A)
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(shared_address(barrier))
               : "memory");
#endif
}

// Arrives, expecting `bytes` more transaction bytes in this phase first.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* barrier, uint32_t bytes) {
#if defined(MOE_KERNELS_EMULATOR)
  emu::mbarrier_arrive(shared_address(barrier), bytes);
#elif defined(MOE_KERNELS_SM90A)
  asm volatile(
      "mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(shared_address(barrier)),
      "r"(bytes)
      : "memory");
#endif
}

__device__ __forceinline__ bool mbarrier_try_wait(uint64_t* barrier, uint32_t parity) {
#if defined(MOE_KERNELS_EMULATOR)
  return emu::mbarrier_try_wait_parity(shared_address(barrier), parity);
#elif defined(MOE_KERNELS_SM90A)
  uint32_t done = 0;
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(shared_address(barrier)), "r"(parity)
      : "memory");
  return done != 0;
#else
  return true;
#endif
}

__device__ __forceinline__ void mbarrier_wait(uint64_t* barrier, uint32_t parity) {
  while (!mbarrier_try_wait(barrier, parity)) {
  }
}

}  // namespace moe_kernels::device::inline MOE_KERNELS_TARGET
