// What warp-specialised Hopper kernels are written with besides wgmma and the tensor copy
// engine: shared-state-space addresses, elect.sync, setmaxnreg, and the proxy fence between
// ordinary shared-memory stores and the asynchronous units that read them. Inline PTX under nvcc
// (sm_90a), the CPU emulator's versions otherwise (emu/hopper.h).
#pragma once

#include <cstdint>

#include "device/runtime.h"

#if defined(MOE_KERNELS_EMULATOR)
#include "emu/hopper.h"
#endif

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MOE_KERNELS_SM90A 1
#endif

namespace moe_kernels::device::inline MOE_KERNELS_TARGET {

constexpr int kWarpgroupThreads = 128;

// The address of a pointer into (dynamic) shared memory in the shared state space, as the
// asynchronous units take it.
__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
#if defined(MOE_KERNELS_EMULATOR)
  return emu::shared_address(pointer, 1);
#else
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
#endif
}

// True in one lane of the warp (every lane calls it).
__device__ __forceinline__ bool elect_one() {
#if defined(MOE_KERNELS_EMULATOR)
  return emu::elect_one(0xffffffffu);
#elif defined(MOE_KERNELS_SM90A)
  uint32_t elected = 0;
  asm volatile("{\n.reg .pred p;\nelect.sync _|p, %1;\nselp.u32 %0, 1, 0, p;\n}\n"
               : "=r"(elected)
               : "r"(0xffffffffu));
  return elected != 0;
#else
  return threadIdx.x % 32 == 0;
#endif
}

// Every warp of the warpgroup moves its registers per thread to kRegisters (a multiple of 8 in
// [24, 256]): producers give theirs up, consumers take them.
template <int kRegisters, bool kIncrease>
__device__ __forceinline__ void setmaxnreg() {
  static_assert(kRegisters % 8 == 0 && kRegisters >= 24 && kRegisters <= 256,
                "setmaxnreg takes a multiple of 8 in [24, 256]");
#if defined(MOE_KERNELS_EMULATOR)
  emu::setmaxnreg(kRegisters, kIncrease);
#elif defined(MOE_KERNELS_SM90A)
  if constexpr (kIncrease) {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
  } else {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
  }
#endif
}

// Orders this thread's ordinary shared-memory stores before later reads by the asynchronous
// units (wgmma, tensor copies). The emulator has one proxy: nothing to do.
__device__ __forceinline__ void fence_proxy_async_shared() {
#if defined(MOE_KERNELS_SM90A)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

}  // namespace moe_kernels::device::inline MOE_KERNELS_TARGET
