// Registers the CPU kernel of an op that also has a CUDA kernel, so that under
// moe_kernels.emulate() the op runs its CUDA kernel on the CPU emulator instead: the CPU tensors
// go through the CUDA host op (checks, allocation, launch configuration) unchanged.
#pragma once

#include <torch/library.h>

#include <utility>

#include "emu/mode.h"

namespace moe_kernels::emu {

template <auto Native, auto Emulated>
struct CpuOrEmulated;

template <typename R, typename... Args, R (*Native)(Args...), R (*Emulated)(Args...)>
struct CpuOrEmulated<Native, Emulated> {
  static R call(Args... args) {
    if (current_mode().enabled) return Emulated(std::forward<Args>(args)...);
    return Native(std::forward<Args>(args)...);
  }
};

template <auto Native, auto Emulated>
void impl_cpu_or_emulated(torch::Library& m, const char* name) {
  m.impl(name, &CpuOrEmulated<Native, Emulated>::call);
  note_emulated_op(name);
}

}  // namespace moe_kernels::emu
