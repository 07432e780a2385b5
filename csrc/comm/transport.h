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

class Transport {
 public:
  virtual ~Transport() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;

  // All-to-all-v of rows: `input` holds send_splits[p] rows for each rank p, in rank order;
  // `output` (allocated by the caller) receives recv_splits[p] rows from each rank p, in rank
  // order. Both contiguous, of one dtype, on the transport's device. Returns when the rows are
  // ready for work queued after the call on the current stream (on GPUs without waiting for
  // them on the host).
  virtual void all_to_all_v(const at::Tensor& input, const at::Tensor& output,
                            const std::vector<int64_t>& send_splits,
                            const std::vector<int64_t>& recv_splits) = 0;

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
