#include "emu/mode.h"

#include <mutex>
#include <string>
#include <vector>

namespace moe_kernels::emu {
namespace {

std::mutex mode_mutex;
Mode mode;
std::vector<std::string> emulated;

}  // namespace

Mode current_mode() {
  const std::lock_guard<std::mutex> lock(mode_mutex);
  return mode;
}

void set_mode(const Mode& new_mode) {
  const std::lock_guard<std::mutex> lock(mode_mutex);
  mode = new_mode;
}

void note_emulated_op(const char* name) {
  const std::lock_guard<std::mutex> lock(mode_mutex);
  emulated.emplace_back(name);
}

std::vector<std::string> emulated_ops() {
  const std::lock_guard<std::mutex> lock(mode_mutex);
  return emulated;
}

}  // namespace moe_kernels::emu
