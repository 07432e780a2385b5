// Whether the ops of moe_kernels run their CUDA kernels on the CPU emulator, and under which
// schedule: the switch behind moe_kernels.emulate(). Process-wide, so autograd's backward sees
// the same setting as the forward.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "emu/scheduler.h"

namespace moe_kernels::emu {

struct Mode {
  bool enabled = false;
  Schedule schedule = Schedule::kForward;
  uint64_t seed = 0;
};

Mode current_mode();
void set_mode(const Mode& mode);

void note_emulated_op(const char* name);
// The ops that run on the emulator under moe_kernels.emulate(); the others stay native.
std::vector<std::string> emulated_ops();

}  // namespace moe_kernels::emu
