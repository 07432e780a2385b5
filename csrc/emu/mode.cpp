#include "emu/mode.h"

#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace moe_kernels::emu {
namespace {

std::mutex mode_mutex;
Mode mode;
std::vector<std::string> emulated;
std::map<std::string, int64_t> launches;

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

void note_emulated_launch(const std::string& kernel) {
  const std::lock_guard<std::mutex> lock(mode_mutex);
  ++launches[kernel];
}

std::map<std::string, int64_t> emulated_launches(bool reset) {
  const std::lock_guard<std::mutex> lock(mode_mutex);
  auto counted = launches;
  if (reset) launches.clear();
  return counted;
}

}  // namespace moe_kernels::emu
