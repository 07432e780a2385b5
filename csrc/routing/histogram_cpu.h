// Exact per-expert counts on the CPU: each parallel chunk counts into its own array and merges
// once, so the totals are the same integers whatever the thread order.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <mutex>
#include <vector>

namespace moe_kernels::routing {

class ChunkHistogram {
 public:
  explicit ChunkHistogram(int64_t num_experts) : counts_(num_experts, 0) {}

  void add(int64_t expert) { ++counts_[expert]; }

  void merge_into(int64_t* total, std::mutex& mutex) const {
    std::lock_guard<std::mutex> lock(mutex);
    for (size_t e = 0; e < counts_.size(); ++e) total[e] += counts_[e];
  }

 private:
  std::vector<int64_t> counts_;
};

}  // namespace moe_kernels::routing
