// The state behind the emulated runtime API: the dynamic shared memory each kernel has opted into.
#include "emu/runtime_api.h"

#include <mutex>
#include <unordered_map>

namespace moe_kernels::emu {
namespace {

// Launches check it before they take the launch lock, from any thread: it has a lock of its own.
std::mutex attributes_mutex;
std::unordered_map<const void*, size_t> max_dynamic_shared;

}  // namespace

cudaError_t set_max_dynamic_shared_bytes(const void* kernel, int bytes) {
  if (bytes < 0 || bytes > kSharedMemoryPerBlockOptin) return cudaErrorInvalidValue;
  const std::lock_guard<std::mutex> lock(attributes_mutex);
  max_dynamic_shared[kernel] = static_cast<size_t>(bytes);
  return cudaSuccess;
}

size_t max_dynamic_shared_bytes(const void* kernel) {
  const std::lock_guard<std::mutex> lock(attributes_mutex);
  const auto it = max_dynamic_shared.find(kernel);
  return it == max_dynamic_shared.end() ? static_cast<size_t>(kSharedMemoryPerBlock) : it->second;
}

}  // namespace moe_kernels::emu
