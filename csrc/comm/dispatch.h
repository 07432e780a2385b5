// Expert-parallel dispatch and combine started now and finished later (csrc/comm/dispatch.cpp),
// so that the caller computes while the rows travel: MoELayer overlaps its shared experts with
// them, forward and backward (moe_kernels.dispatch.RowsInFlight). The ops ep_dispatch_rows and
// ep_combine_rows are these, started and waited for at once.
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "comm/transport.h"

namespace moe_kernels::comm {

class PendingRows {
 public:
  PendingRows(std::unique_ptr<Exchange> exchange, at::Tensor received,
              std::optional<at::Tensor> transpose_counts);

  // Waits for the transfer (without the GIL, from Python).
  void arrive();
  // The rows, in the order the caller asked for (arrives first if need be). Once.
  at::Tensor take();

 private:
  std::unique_ptr<Exchange> exchange_;
  std::optional<at::Tensor> received_;
  std::optional<at::Tensor> transpose_counts_;  // how to reorder the arrived segments, if at all
};

PendingRows start_dispatch_rows(const at::Tensor& rows, const at::Tensor& recv_counts,
                                const std::vector<int64_t>& send_grid,
                                const std::vector<int64_t>& recv_grid,
                                const std::string& group_name, const std::string& transport_kind,
                                const std::string& layout);

PendingRows start_combine_rows(const at::Tensor& expert_rows, const at::Tensor& recv_counts,
                               const std::vector<int64_t>& send_grid,
                               const std::vector<int64_t>& recv_grid, const std::string& group_name,
                               const std::string& transport_kind, const std::string& layout);

}  // namespace moe_kernels::comm
