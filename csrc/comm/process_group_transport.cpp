// The c10d ProcessGroup transport: a torch.distributed group's own all-to-all, whatever its
// backend. Gloo runs it between CPU processes (the tests, CPU training); NCCL between GPUs.
#include <chrono>
#include <thread>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include "comm/transport.h"

namespace moe_kernels::comm {
namespace {

// torch >= 2.14 names the all-to-all-v all_to_all_single and deprecates alltoall_base;
// torch 2.11 has only alltoall_base.
template <typename Group>
c10::intrusive_ptr<c10d::Work> all_to_all_single(Group& group, at::Tensor& output,
                                                 at::Tensor& input, std::vector<int64_t>& recv,
                                                 std::vector<int64_t>& send) {
  if constexpr (requires { group.all_to_all_single(output, input, recv, send); }) {
    return group.all_to_all_single(output, input, recv, send);
  } else {
    return group.alltoall_base(output, input, recv, send);
  }
}

// Gloo's worker thread keeps a work until just after completing it. Waiting until it has let go
// means the work is destroyed on this thread: destroying it releases Python objects (tensors
// Python also holds, and the Python modes or saved-tensor hooks captured with the thread's
// state), which takes the GIL, and a worker thread that takes the GIL at interpreter exit is
// ended inside a noexcept destructor, which aborts the process ("terminate called without an
// active exception"). Bounded, in case a backend keeps its works longer.
void release_on_this_thread(c10::intrusive_ptr<c10d::Work> work) {
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::milliseconds(100);
  while (work.use_count() > 1 && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::yield();
  }
}

class ProcessGroupTransport final : public Transport {
 public:
  ProcessGroupTransport(std::string name, c10::intrusive_ptr<c10d::ProcessGroup> group)
      : name_(std::move(name)), group_(std::move(group)) {}

  int rank() const override { return group_->getRank(); }
  int size() const override { return group_->getSize(); }

  void all_to_all_v(const at::Tensor& input, const at::Tensor& output,
                    const std::vector<int64_t>& send_splits,
                    const std::vector<int64_t>& recv_splits) override {
    at::Tensor in = input, out = output;
    std::vector<int64_t> send = send_splits, recv = recv_splits;
    try {
      auto work = all_to_all_single(*group_, out, in, recv, send);
      work->wait();
      release_on_this_thread(std::move(work));
    } catch (const std::exception& error) {
      TORCH_CHECK(false, "moe_kernels expert-parallel all-to-all failed on ", describe(), ": ",
                  error.what(),
                  "\n(another rank of the group has probably failed, timed out or called the "
                  "dispatcher with other shapes)");
    }
  }

  // The counts were exchanged in tensors on the group's device; for Gloo that is the CPU
  // already, and on GPUs the copy waits for the all-to-all on the current stream.
  at::Tensor to_host(const at::Tensor& tensor) override { return tensor.cpu(); }

  std::string describe() const override {
    return "rank " + std::to_string(rank()) + " of the " + group_->getBackendName() +
           " process group '" + name_ + "' (" + std::to_string(size()) + " ranks)";
  }

 private:
  std::string name_;
  c10::intrusive_ptr<c10d::ProcessGroup> group_;
};

}  // namespace

std::shared_ptr<Transport> process_group_transport(const std::string& group_name) {
  c10::intrusive_ptr<c10d::ProcessGroup> group;
  try {
    group = c10d::resolve_process_group(group_name);
  } catch (const std::exception& error) {
    TORCH_CHECK(false, "group_name '", group_name,
                "' names no torch.distributed process group (pass group.group_name of an "
                "initialised group): ",
                error.what());
  }
  return std::make_shared<ProcessGroupTransport>(group_name, std::move(group));
}

std::shared_ptr<Transport> transport_for(const std::string& group_name, const std::string& kind) {
  if (kind == "process_group") return process_group_transport(group_name);
  TORCH_CHECK(kind == "nccl", "transport must be 'process_group' or 'nccl', got '", kind, "'");
#if defined(MOE_KERNELS_WITH_NCCL)
  auto transport = nccl_transport(group_name);
  TORCH_CHECK(transport != nullptr, "transport 'nccl': no NCCL communicator for group '",
              group_name, "'; create one with moe_kernels.dispatch.init_nccl(group) on every rank");
  return transport;
#else
  TORCH_CHECK(false,
              "transport 'nccl': this build of moe_kernels has no NCCL (it was built "
              "without CUDA, or torch's nvidia-nccl wheel was not found)");
#endif
}

}  // namespace moe_kernels::comm
