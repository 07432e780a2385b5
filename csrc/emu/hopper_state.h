// The per-block state of the emulated Hopper units (emu/hopper.h), shared by their files.
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <unordered_map>
#include <vector>

#include "emu/hopper.h"

namespace moe_kernels::emu {

struct Mbarrier {
  uint32_t arrivals;  // expected per phase
  int64_t pending;    // arrivals still missing in the current phase
  int64_t tx;         // transaction bytes still expected in the current phase
  uint32_t phase;     // phases completed; the current phase's parity is phase & 1
};

// A tensor copy in flight: its bytes, read at the issue, land at `dst` with complete_tx on
// `barrier`.
struct TensorCopy {
  uint32_t dst;
  uint32_t barrier;
  std::vector<unsigned char> bytes;
};

struct WgmmaOp {
  WgmmaType type;
  int n;
  float* d[32];  // each lane's accumulators
  uint64_t desc_a, desc_b;
  bool scale_d, trans_a, trans_b;
  int warp_rank;  // which 16 rows of the 64 this warp computes
};

struct WarpWgmma {
  bool fenced = false;
  std::vector<WgmmaOp> open;  // issued since the last commit
  std::deque<std::vector<WgmmaOp>> committed;
  // Under the late schedules, the true accumulators of lanes with a wgmma in flight, by address
  // (n / 2 floats); the registers themselves read NaN until the wait.
  std::map<float*, std::vector<float>> shadow;
};

struct BlockAsyncState {
  std::unordered_map<uint32_t, Mbarrier> barriers;
  std::vector<TensorCopy> copies;
  std::map<int, WarpWgmma> warps;  // by warp, so reports name the lowest first
};

BlockAsyncState& block_async_state();

// Mbarrier of a shared address, which must have been initialised.
Mbarrier& mbarrier_at(uint32_t barrier, const char* what);
// complete_tx of `bytes` on a barrier (the tensor copy engine's side of an mbarrier).
void mbarrier_complete_tx(uint32_t barrier, uint32_t bytes);
// Lands the tensor copies in flight to `barrier` (all of them when barrier is kAnyBarrier).
constexpr uint32_t kAnyBarrier = 0xffffffffu;
void land_tensor_copies(uint32_t barrier);

}  // namespace moe_kernels::emu
