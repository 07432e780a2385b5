// The cp.async copies of one emulated thread, between their issue and the wait that covers them:
// those issued since its last commit, and its committed groups, oldest first. A copy carries the
// bytes it lands (read from global memory at the issue), so landing it late changes only when
// shared memory sees them.
#pragma once

#include <cstring>
#include <deque>
#include <utility>
#include <vector>

namespace moe_kernels::emu {

struct AsyncCopy {
  unsigned char* dst;
  int bytes;
  bool landed;  // written at the issue already (schedule "forward")
  unsigned char data[16];
};

class AsyncCopyQueue {
 public:
  void issue(const AsyncCopy& copy) {
    open_.push_back(copy);
    ++in_flight_;
  }

  void commit() {
    committed_.push_back(std::move(open_));
    open_.clear();
  }

  // Lands every committed group but the `in_flight` most recent. Copies not committed yet stay in
  // flight: cp.async.wait_group waits only for committed groups.
  void wait(int in_flight) {
    while (committed_.size() > static_cast<size_t>(in_flight)) {
      for (const AsyncCopy& copy : committed_.front()) {
        if (!copy.landed) std::memcpy(copy.dst, copy.data, copy.bytes);
      }
      in_flight_ -= committed_.front().size();
      committed_.pop_front();
    }
  }

  // Copies that no wait has covered, whether their bytes were written or not: a kernel that
  // exits with any is wrong under every schedule.
  size_t in_flight() const { return in_flight_; }

  void clear() {
    open_.clear();
    committed_.clear();
    in_flight_ = 0;
  }

 private:
  std::vector<AsyncCopy> open_;
  std::deque<std::vector<AsyncCopy>> committed_;
  size_t in_flight_ = 0;
};

}  // namespace moe_kernels::emu
