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

[[noreturn]] void fail(const std::string& group, const std::exception& error) {
  TORCH_CHECK(false, "moe_kernels expert-parallel all-to-all failed on ", group, ": ", error.what(),
              "\n(another rank of the group has probably failed, timed out or called the "
              "dispatcher with other shapes)");
}

// c10d works in flight, waited for in order. Gloo runs them on its worker threads while this one
// goes on; NCCL on its own stream, which the current stream waits for in wait() (the host goes on,
// and NCCL's watchdog may hold the works until the GPU is done: only host works are released here).
class WorksExchange final : public Exchange {
 public:
  WorksExchange(std::vector<c10::intrusive_ptr<c10d::Work>> works, std::string group, bool on_host)
      : works_(std::move(works)), group_(std::move(group)), on_host_(on_host) {}

  // An exchange dropped unwaited (an error between start and wait) still completes first: its
  // peers' transfers go on.
  ~WorksExchange() override {
    for (auto& work : works_) {
      try {
        work->wait();
        release(std::move(work));
      } catch (...) {  // NOLINT(bugprone-empty-catch): the error is the peers' to report
      }
    }
  }

  void wait() override {
    auto works = std::move(works_);
    for (auto& work : works) {
      try {
        work->wait();
      } catch (const std::exception& error) {
        fail(group_, error);
      }
      release(std::move(work));
    }
  }

 private:
  void release(c10::intrusive_ptr<c10d::Work> work) const {
    if (on_host_) release_on_this_thread(std::move(work));
  }

  std::vector<c10::intrusive_ptr<c10d::Work>> works_;
  std::string group_;
  bool on_host_;
};

// Point-to-point segments are matched in order; one tag serves them all.
constexpr int kSegmentTag = 0x6d6f65;

class ProcessGroupTransport final : public Transport {
 public:
  ProcessGroupTransport(std::string name, c10::intrusive_ptr<c10d::ProcessGroup> group)
      : name_(std::move(name)), group_(std::move(group)) {}

  int rank() const override { return group_->getRank(); }
  int size() const override { return group_->getSize(); }

  std::unique_ptr<Exchange> start_all_to_all_v(const at::Tensor& input, const at::Tensor& output,
                                               const std::vector<int64_t>& send_splits,
                                               const std::vector<int64_t>& recv_splits) override {
    at::Tensor in = input, out = output;
    std::vector<int64_t> send = send_splits, recv = recv_splits;
    try {
      return std::make_unique<WorksExchange>(
          std::vector{all_to_all_single(*group_, out, in, recv, send)}, describe(), !in.is_cuda());
    } catch (const std::exception& error) {
      fail(describe(), error);
    }
  }

  // One send or receive per segment; on GPUs coalesced into one launch (ProcessGroupNCCL's
  // coalescing), on Gloo each its own transfer on the pair's connection. Segments of this rank's
  // own are copied.
  std::unique_ptr<Exchange> start_segments(const at::Tensor& input, const at::Tensor& output,
                                           const std::vector<Segment>& sends,
                                           const std::vector<Segment>& recvs) override {
    const auto device_type = input.device().type();
    const bool coalesce = device_type == c10::DeviceType::CUDA;
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    std::vector<Segment> own_sends, own_recvs;
    // Posts a transfer per segment with a peer; keeps this rank's own for the copy.
    const auto post = [&](const std::vector<Segment>& segments, const at::Tensor& rows,
                          std::vector<Segment>& own, bool send) {
      for (const auto& segment : segments) {
        if (segment.peer == rank()) {
          own.push_back(segment);
          continue;
        }
        std::vector<at::Tensor> part{rows.narrow(0, segment.first_row, segment.num_rows)};
        works.push_back(send ? group_->send(part, segment.peer, kSegmentTag)
                             : group_->recv(part, segment.peer, kSegmentTag));
      }
    };
    try {
      if (coalesce) group_->startCoalescing(device_type);
      post(recvs, output, own_recvs, false);
      post(sends, input, own_sends, true);
      if (coalesce) works = {group_->endCoalescing(device_type)};
    } catch (const std::exception& error) {
      fail(describe(), error);
    }
    // The n-th segment to this rank itself is the n-th from it.
    TORCH_CHECK(own_sends.size() == own_recvs.size(),
                "expert-parallel exchange: this rank's segments to itself and from itself differ");
    for (size_t i = 0; i < own_sends.size(); ++i) {
      TORCH_CHECK(own_sends[i].num_rows == own_recvs[i].num_rows,
                  "expert-parallel exchange: this rank's segments to itself and from itself "
                  "differ");
      output.narrow(0, own_recvs[i].first_row, own_recvs[i].num_rows)
          .copy_(input.narrow(0, own_sends[i].first_row, own_sends[i].num_rows));
    }
    return std::make_unique<WorksExchange>(std::move(works), describe(), !coalesce);
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
