// How rows move between the ranks of an expert-parallel group (SPEC.md section 5). Two
// transports behind one interface: the c10d ProcessGroup of a torch.distributed group (any
// backend: Gloo between CPU processes, NCCL between GPUs), and on GPUs a communicator of NCCL's
// own driven directly (ncclSend/ncclRecv on a side stream, ordered with events).
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <string>
#include <vector>

namespace moe_kernels::comm {

// An all-to-all-v in flight, from start_all_to_all_v until wait(): the caller queues other work
// in between, and the transfer overlaps it.
class Exchange {
 public:
  virtual ~Exchange() = default;

  // Returns when the rows are ready for work queued after the call on the current stream (on
  // GPUs without waiting for them on the host). Called once.
  virtual void wait() = 0;
};

// Rows [first_row, first_row + num_rows) of a tensor, sent to or received from `peer`.
struct Segment {
  int peer;
  int64_t first_row;
  int64_t num_rows;
};

class Transport {
 public:
  virtual ~Transport() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;

  // Starts an all-to-all-v of rows: `input` holds send_splits[p] rows for each rank p, in rank
  // order; `output` (allocated by the caller) receives recv_splits[p] rows from each rank p, in
  // rank order. Both contiguous, of one dtype, on the transport's device; neither may be
  // touched until the exchange's wait() returns.
  virtual std::unique_ptr<Exchange> start_all_to_all_v(const at::Tensor& input,
                                                       const at::Tensor& output,
                                                       const std::vector<int64_t>& send_splits,
                                                       const std::vector<int64_t>& recv_splits) = 0;

  // Starts point-to-point transfers of row segments: each send segment's rows of `input` go to
  // its peer, each receive segment's rows of `output` come from its peer (a segment of this
  // rank's own is a copy). Between two ranks, the segments are matched in the order they are
  // listed; every segment has rows. Tensors as start_all_to_all_v's.
  virtual std::unique_ptr<Exchange> start_segments(const at::Tensor& input,
                                                   const at::Tensor& output,
                                                   const std::vector<Segment>& sends,
                                                   const std::vector<Segment>& recvs) = 0;

  // The all-to-all-v, started and waited for.
  void all_to_all_v(const at::Tensor& input, const at::Tensor& output,
                    const std::vector<int64_t>& send_splits,
                    const std::vector<int64_t>& recv_splits) {
    start_all_to_all_v(input, output, send_splits, recv_splits)->wait();
  }

  // A host copy of `tensor`, written by earlier transfers: the dispatcher's one host
  // synchronisation. A failed or vanished peer surfaces here as an error, never as a hang.
  virtual at::Tensor to_host(const at::Tensor& tensor) = 0;

  // Names the group in error messages.
  virtual std::string describe() const = 0;
};

// The transport `kind` ("process_group" or "nccl") of the torch.distributed group registered
// as `group_name`. "nccl" needs init_nccl_transport for that group first.
std::shared_ptr<Transport> transport_for(const std::string& group_name, const std::string& kind);

// A ProcessGroup transport (process_group_transport.cpp).
std::shared_ptr<Transport> process_group_transport(const std::string& group_name);

// The NCCL transport registered for `group_name`, or null (nccl_transport.cpp: builds with
// NCCL only).
std::shared_ptr<Transport> nccl_transport(const std::string& group_name);

}  // namespace moe_kernels::comm
