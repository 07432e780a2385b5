#include "emu/hopper_state.h"

#include <string>

#include "emu/hopper.h"

namespace moe_kernels::emu {

BlockAsyncState& block_async_state() {
  static BlockAsyncState state;  // launches are serialised and blocks run one at a time
  return state;
}

void reset_block_async_state() { block_async_state() = BlockAsyncState{}; }

std::string block_async_leftover() {
  const BlockAsyncState& s = block_async_state();
  if (!s.copies.empty()) {
    return std::to_string(s.copies.size()) +
           " tensor copies still in flight (no thread waited on their mbarrier)";
  }
  for (const auto& [warp, w] : s.warps) {
    if (!w.open.empty() || !w.committed.empty()) {
      return "wgmma operations of warp " + std::to_string(warp) +
             " still in flight (no wgmma.wait_group covered them)";
    }
  }
  return "";
}

}  // namespace moe_kernels::emu
