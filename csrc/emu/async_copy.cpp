// cp.async on the CPU emulator. The source is read at the issue (as the hardware may), so only
// the moment the destination changes depends on the schedule: at the issue under "forward", which
// shows a copy that overwrites a tile other warps still read; at the covering wait otherwise, so a
// read before that wait sees the shared-memory poison.
#include "emu/async_copy.h"

#include <cstdint>
#include <cstring>
#include <sstream>

#include "emu/async_copy_queue.h"
#include "emu/scheduler.h"

namespace moe_kernels::emu {
namespace {

bool aligned(const void* address, int bytes) {
  return reinterpret_cast<uintptr_t>(address) % static_cast<uintptr_t>(bytes) == 0;
}

void check(const void* dst, const void* src, int bytes, int src_bytes) {
  std::ostringstream s;
  s << "cp.async of " << bytes << " bytes from " << src << " to " << dst << ": ";
  if (!aligned(dst, bytes) || !aligned(src, bytes)) {
    s << "both addresses must be aligned to " << bytes << " bytes";
  } else if (!in_shared_memory(dst, bytes)) {
    s << "the destination is not in shared memory (dynamic, or a MOE_KERNELS_SHARED declaration)";
  } else if (in_shared_memory(src, bytes)) {
    s << "the source is in shared memory; cp.async copies from global memory";
  } else if (src_bytes < 0 || src_bytes > bytes) {
    s << "src_bytes " << src_bytes << " is outside [0, " << bytes << "]";
  } else {
    return;
  }
  fail(s.str());
}

}  // namespace

void async_copy(void* dst, const void* src, int bytes, int src_bytes) {
  check(dst, src, bytes, src_bytes);
  AsyncCopy copy{static_cast<unsigned char*>(dst), bytes, false, {}};
  std::memcpy(copy.data, src, src_bytes);  // the rest stays zero
  if (launch_schedule() == Schedule::kForward) {
    std::memcpy(dst, copy.data, bytes);
    copy.landed = true;
  }
  async_copies().issue(copy);
}

void async_copy_commit() { async_copies().commit(); }

void async_copy_wait(int in_flight) { async_copies().wait(in_flight); }

}  // namespace moe_kernels::emu
