// The direct NCCL transport: a communicator of NCCL's own per torch.distributed group, its
// all-to-all-v one ncclSend and one ncclRecv per peer inside ncclGroupStart/End on a side
// stream. Events order it after the work that produced the rows and before the work that reads
// them, so the host never waits and the GPU overlaps it with unrelated kernels. NCCL has no
// timeout of its own: the one host wait (to_host) polls the communicator's error state and its
// own deadline, and aborts the communicator rather than hang when a peer is gone.
#include "comm/nccl_transport.h"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <nccl.h>

#include <chrono>
#include <map>
#include <mutex>
#include <thread>

#include "comm/transport.h"

namespace moe_kernels::comm {
namespace {

#define MOE_KERNELS_NCCL_CHECK(call, what)                                                       \
  do {                                                                                           \
    const ncclResult_t result_ = (call);                                                         \
    TORCH_CHECK(result_ == ncclSuccess || result_ == ncclInProgress, "moe_kernels: ", what,      \
                " failed: ", ncclGetErrorString(result_), " (", ncclGetLastError(nullptr), ")"); \
  } while (false)

class NcclTransport final : public Transport {
 public:
  NcclTransport(std::string name, const ncclUniqueId& id, int rank, int size,
                c10::DeviceIndex device, double timeout_s)
      : name_(std::move(name)),
        rank_(rank),
        size_(size),
        device_(device),
        timeout_(std::chrono::duration<double>(timeout_s)),
        stream_(c10::cuda::getStreamFromPool(/*isHighPriority=*/true, device)) {
    const c10::cuda::CUDAGuard guard(device_);
    MOE_KERNELS_NCCL_CHECK(ncclCommInitRank(&comm_, size_, id, rank_), "ncclCommInitRank");
  }

  // Communicators are released by release_nccl_transport; one still alive at exit is left to
  // the process teardown (destroying it after the CUDA context is gone would fail).
  ~NcclTransport() override = default;

  int rank() const override { return rank_; }
  int size() const override { return size_; }

  void all_to_all_v(const at::Tensor& input, const at::Tensor& output,
                    const std::vector<int64_t>& send_splits,
                    const std::vector<int64_t>& recv_splits) override {
    TORCH_CHECK(input.is_cuda() && input.get_device() == device_,
                "transport 'nccl' moves tensors of cuda:", static_cast<int>(device_), ", got ",
                input.device());
    TORCH_CHECK(comm_ != nullptr, describe(), " was aborted after an earlier failure");
    const c10::cuda::CUDAGuard guard(device_);
    const auto compute = c10::cuda::getCurrentCUDAStream(device_);
    at::cuda::CUDAEvent ready;
    ready.record(compute);
    ready.block(stream_);
    // Rows are sent as bytes: one code path for every dtype.
    const int64_t row_bytes = input.size(1) * input.element_size();
    const auto* in = static_cast<const char*>(input.const_data_ptr());
    auto* out = static_cast<char*>(output.mutable_data_ptr());
    int64_t sent = 0, received = 0;
    MOE_KERNELS_NCCL_CHECK(ncclGroupStart(), "ncclGroupStart");
    for (int peer = 0; peer < size_; ++peer) {
      const size_t send_bytes = send_splits[peer] * row_bytes;
      const size_t recv_bytes = recv_splits[peer] * row_bytes;
      if (send_bytes) {
        MOE_KERNELS_NCCL_CHECK(ncclSend(in + sent, send_bytes, ncclChar, peer, comm_, stream_),
                               "ncclSend");
      }
      if (recv_bytes) {
        MOE_KERNELS_NCCL_CHECK(ncclRecv(out + received, recv_bytes, ncclChar, peer, comm_, stream_),
                               "ncclRecv");
      }
      sent += send_bytes;
      received += recv_bytes;
    }
    MOE_KERNELS_NCCL_CHECK(ncclGroupEnd(), "ncclGroupEnd");
    // The caching allocator must not hand these buffers to other work before the side stream
    // is done with them.
    c10::cuda::CUDACachingAllocator::recordStream(input.storage().data_ptr(), stream_);
    c10::cuda::CUDACachingAllocator::recordStream(output.storage().data_ptr(), stream_);
    at::cuda::CUDAEvent done;
    done.record(stream_);
    done.block(compute);
  }

  at::Tensor to_host(const at::Tensor& tensor) override {
    const c10::cuda::CUDAGuard guard(device_);
    auto host = at::empty(tensor.sizes(), tensor.options().device(at::kCPU).pinned_memory(true));
    host.copy_(tensor, /*non_blocking=*/true);
    at::cuda::CUDAEvent copied;
    copied.record(c10::cuda::getCurrentCUDAStream(device_));
    const auto deadline = std::chrono::steady_clock::now() + timeout_;
    while (!copied.query()) {
      ncclResult_t state = ncclSuccess;
      MOE_KERNELS_NCCL_CHECK(ncclCommGetAsyncError(comm_, &state), "ncclCommGetAsyncError");
      if (state != ncclSuccess && state != ncclInProgress) {
        abort();
        TORCH_CHECK(false, describe(), ": NCCL reported ", ncclGetErrorString(state),
                    " (another rank has probably failed); the communicator is aborted");
      }
      if (std::chrono::steady_clock::now() > deadline) {
        abort();
        TORCH_CHECK(false, describe(), ": no counts from the other ranks within ", timeout_.count(),
                    " s (another rank has probably failed or stopped); the communicator is "
                    "aborted");
      }
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
    return host;
  }

  std::string describe() const override {
    return "rank " + std::to_string(rank_) + " of the NCCL transport of group '" + name_ + "' (" +
           std::to_string(size_) + " ranks)";
  }

  void destroy() {
    if (comm_ != nullptr) ncclCommDestroy(comm_);
    comm_ = nullptr;
  }

 private:
  void abort() {
    if (comm_ != nullptr) ncclCommAbort(comm_);
    comm_ = nullptr;
  }

  std::string name_;
  int rank_, size_;
  c10::DeviceIndex device_;
  std::chrono::duration<double> timeout_;
  c10::cuda::CUDAStream stream_;
  ncclComm_t comm_ = nullptr;
};

// Never destroyed: see ~NcclTransport.
std::map<std::string, std::shared_ptr<NcclTransport>>& registry() {
  static auto* transports = new std::map<std::string, std::shared_ptr<NcclTransport>>();
  return *transports;
}
std::mutex registry_mutex;

}  // namespace

std::shared_ptr<Transport> nccl_transport(const std::string& group_name) {
  const std::lock_guard lock(registry_mutex);
  const auto it = registry().find(group_name);
  return it == registry().end() ? nullptr : it->second;
}

std::string nccl_unique_id() {
  ncclUniqueId id;
  MOE_KERNELS_NCCL_CHECK(ncclGetUniqueId(&id), "ncclGetUniqueId");
  return std::string(id.internal, sizeof(id.internal));
}

void init_nccl_transport(const std::string& group_name, const std::string& unique_id, int rank,
                         int size, int device, double timeout_s) {
  TORCH_CHECK(unique_id.size() == sizeof(ncclUniqueId::internal),
              "unique_id must be the bytes of nccl_unique_id(), got ", unique_id.size(), " bytes");
  TORCH_CHECK(0 <= rank && rank < size, "rank must be in [0, size=", size, "), got ", rank);
  TORCH_CHECK(timeout_s > 0, "timeout must be > 0 seconds, got ", timeout_s);
  ncclUniqueId id;
  std::copy(unique_id.begin(), unique_id.end(), id.internal);
  auto transport = std::make_shared<NcclTransport>(
      group_name, id, rank, size, static_cast<c10::DeviceIndex>(device), timeout_s);
  const std::lock_guard lock(registry_mutex);
  auto& slot = registry()[group_name];
  if (slot) slot->destroy();
  slot = std::move(transport);
}

void release_nccl_transport(const std::string& group_name) {
  const std::lock_guard lock(registry_mutex);
  const auto it = registry().find(group_name);
  if (it == registry().end()) return;
  it->second->destroy();
  registry().erase(it);
}

std::string nccl_version() {
  int version = 0;
  MOE_KERNELS_NCCL_CHECK(ncclGetVersion(&version), "ncclGetVersion");
  return std::to_string(version / 10000) + "." + std::to_string(version / 100 % 100) + "." +
         std::to_string(version % 100);
}

}  // namespace moe_kernels::comm
