// Whether the ops of moe_kernels run their CUDA kernels on the CPU emulator, and under which
// schedule: the switch behind moe_kernels.emulate(). Process-wide, so autograd's backward sees
// the same setting as the forward.
#pragma once

#include <cstdint>
#include <map>
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

// How many times each kernel (by its name, template arguments included) was launched on the
// emulator since the last reset: what a GPU driver's kernel trace would show, so a test can
// check that a driver launches every kernel of the package.
void note_emulated_launch(const std::string& kernel);
std::map<std::string, int64_t> emulated_launches(bool reset);

}  // namespace moe_kernels::emu
