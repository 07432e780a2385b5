// mbarriers on the CPU emulator, to the PTX ISA manual: a phase completes when its pending
// arrival count and its transaction count both reach zero; the next phase then expects the
// initial arrivals again. try_wait.parity(p) succeeds once the phase of parity p has completed,
// that is while the current phase's parity is not p.
#include <sstream>
#include <string>

#include "emu/hopper.h"
#include "emu/hopper_state.h"
#include "emu/scheduler.h"

namespace moe_kernels::emu {
namespace {

// The tx-count's range in the PTX ISA manual.
constexpr int64_t kMaxTx = (int64_t{1} << 20) - 1;

std::string named(const char* what, uint32_t barrier) {
  std::ostringstream s;
  s << what << " on the mbarrier at shared address 0x" << std::hex << barrier;
  return s.str();
}

void complete_phase_if_done(Mbarrier& b) {
  if (b.pending == 0 && b.tx == 0) {
    ++b.phase;
    b.pending = b.arrivals;
  }
}

}  // namespace

Mbarrier& mbarrier_at(uint32_t barrier, const char* what) {
  shared_bytes_at(barrier, 8, what);
  if (barrier % 8 != 0) fail(named(what, barrier) + ": the address is not 8-byte aligned");
  auto& barriers = block_async_state().barriers;
  const auto it = barriers.find(barrier);
  if (it == barriers.end()) fail(named(what, barrier) + ", which was never initialised");
  return it->second;
}

void mbarrier_init(uint32_t barrier, uint32_t arrivals) {
  shared_bytes_at(barrier, 8, "mbarrier.init");
  if (barrier % 8 != 0) fail(named("mbarrier.init", barrier) + ": not 8-byte aligned");
  if (arrivals < 1 || arrivals > kMaxTx) {
    fail(named("mbarrier.init", barrier) + ": the arrival count must be in [1, 2^20 - 1], got " +
         std::to_string(arrivals));
  }
  block_async_state().barriers[barrier] = Mbarrier{arrivals, arrivals, 0, 0};
  note_progress();
}

void mbarrier_expect_tx(uint32_t barrier, uint32_t tx_bytes) {
  Mbarrier& b = mbarrier_at(barrier, "mbarrier.expect_tx");
  b.tx += tx_bytes;
  if (b.tx > kMaxTx) fail(named("mbarrier.expect_tx", barrier) + ": tx-count past 2^20 - 1");
}

void mbarrier_arrive(uint32_t barrier, uint32_t tx_bytes) {
  Mbarrier& b = mbarrier_at(barrier, "mbarrier.arrive");
  if (tx_bytes != 0) mbarrier_expect_tx(barrier, tx_bytes);
  if (b.pending == 0) fail(named("mbarrier.arrive", barrier) + ": more arrivals than expected");
  --b.pending;
  complete_phase_if_done(b);
  note_progress();
}

void mbarrier_complete_tx(uint32_t barrier, uint32_t bytes) {
  Mbarrier& b = mbarrier_at(barrier, "complete_tx");
  b.tx -= bytes;
  if (b.tx < -kMaxTx) fail(named("complete_tx", barrier) + ": tx-count below -(2^20 - 1)");
  complete_phase_if_done(b);
  note_progress();
}

bool mbarrier_try_wait_parity(uint32_t barrier, uint32_t parity) {
  if (parity > 1) fail(named("mbarrier.try_wait.parity", barrier) + ": parity must be 0 or 1");
  const auto done = [&] {
    return (mbarrier_at(barrier, "mbarrier.try_wait.parity").phase & 1u) != parity;
  };
  if (done()) return true;
  land_tensor_copies(barrier);
  if (done()) return true;
  wait_for_progress();
  return false;
}

}  // namespace moe_kernels::emu
