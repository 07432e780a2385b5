// The direct NCCL transport: a communicator of NCCL's own per torch.distributed group, its
// all-to-all-v one ncclSend and one ncclRecv per peer inside ncclGroupStart/End on a side
// stream. Events order it after the work that produced the rows and before the work that reads
// them, so the host never waits and the GPU overlaps it with unrelated kernels.
//
// NCCL has no timeout of its own and a dead peer makes its calls block forever, so the
// communicator is non-blocking (every call returns at once and is then polled) and every wait
// has a deadline: its creation, the enqueue of each exchange, the counts' host copy (to_host),
// and, on a watchdog thread, the completion of each exchange on the GPU. A failure or an expired
// deadline aborts the communicator (which also releases kernels stuck waiting for a peer) and
// ends the job with an error that names the group, here or at the transport's next call, rather
// than a hang at some later host synchronisation.
#include "comm/nccl_transport.h"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <nccl.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <iostream>
#include <map>
#include <mutex>
#include <thread>

#include "comm/transport.h"

namespace moe_kernels::comm {
namespace {

using Clock = std::chrono::steady_clock;

#define MOE_KERNELS_NCCL_CHECK(call, what)                                                       \
  do {                                                                                           \
    const ncclResult_t result_ = (call);                                                         \
    TORCH_CHECK(result_ == ncclSuccess || result_ == ncclInProgress, "moe_kernels: ", what,      \
                " failed: ", ncclGetErrorString(result_), " (", ncclGetLastError(nullptr), ")"); \
  } while (false)

// ncclGroupStart ... ncclGroupEnd. An exception between the two would leave the group open on
// this thread, and every later NCCL call of the thread (torch's own collectives included) would
// then join that group and never run: the destructor closes it on every path.
class NcclGroup {
 public:
  NcclGroup() { MOE_KERNELS_NCCL_CHECK(ncclGroupStart(), "ncclGroupStart"); }
  NcclGroup(const NcclGroup&) = delete;
  NcclGroup& operator=(const NcclGroup&) = delete;
  ~NcclGroup() {
    if (open_) ncclGroupEnd();
  }

  void end() {
    open_ = false;
    MOE_KERNELS_NCCL_CHECK(ncclGroupEnd(), "ncclGroupEnd");
  }

 private:
  bool open_ = true;
};

// An exchange on the transport's side stream: wait() orders the current stream after it, and
// the host goes on (the watchdog bounds how long the GPU may wait).
struct StreamExchange final : Exchange {
  explicit StreamExchange(c10::DeviceIndex device) : device(device) {}

  void wait() override { done.block(c10::cuda::getCurrentCUDAStream(device)); }

  c10::DeviceIndex device;
  at::cuda::CUDAEvent done;
};

class NcclTransport final : public Transport {
 public:
  NcclTransport(std::string name, const ncclUniqueId& id, int rank, int size,
                c10::DeviceIndex device, double timeout_s)
      : name_(std::move(name)),
        rank_(rank),
        size_(size),
        device_(device),
        timeout_(
            std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s))),
        stream_(c10::cuda::getStreamFromPool(/*isHighPriority=*/true, device)) {
    const c10::cuda::CUDAGuard guard(device_);
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    const std::lock_guard lock(mutex_);
    try {
      MOE_KERNELS_NCCL_CHECK(ncclCommInitRankConfig(&comm_, size_, id, rank_, &config),
                             "ncclCommInitRankConfig");
      wait_until_ready("creating the communicator (are all ranks calling init_nccl?)");
    } catch (...) {
      abort();
      throw;
    }
    watchdog_ = std::thread([this] { watch(); });
  }

  // Communicators are released by release_nccl_transport; one still alive at exit is left to
  // the process teardown (destroying it after the CUDA context is gone would fail).
  ~NcclTransport() override = default;

  int rank() const override { return rank_; }
  int size() const override { return size_; }

  std::unique_ptr<Exchange> start_all_to_all_v(const at::Tensor& input, const at::Tensor& output,
                                               const std::vector<int64_t>& send_splits,
                                               const std::vector<int64_t>& recv_splits) override {
    return start_segments(input, output, per_peer(send_splits), per_peer(recv_splits));
  }

  std::unique_ptr<Exchange> start_segments(const at::Tensor& input, const at::Tensor& output,
                                           const std::vector<Segment>& sends,
                                           const std::vector<Segment>& recvs) override {
    TORCH_CHECK(input.is_cuda() && input.get_device() == device_,
                "transport 'nccl' moves tensors of cuda:", static_cast<int>(device_), ", got ",
                input.device());
    const c10::cuda::CUDAGuard guard(device_);
    const std::lock_guard lock(mutex_);
    check_alive();
    at::cuda::CUDAEvent ready;
    ready.record(c10::cuda::getCurrentCUDAStream(device_));
    ready.block(stream_);
    try {
      enqueue(input, output, sends, recvs);
      wait_until_ready("enqueueing an exchange of rows");
    } catch (...) {
      abort();
      throw;
    }
    // The caching allocator must not hand these buffers to other work before the side stream
    // is done with them.
    c10::cuda::CUDACachingAllocator::recordStream(input.storage().data_ptr(), stream_);
    c10::cuda::CUDACachingAllocator::recordStream(output.storage().data_ptr(), stream_);
    auto exchange = std::make_unique<StreamExchange>(device_);
    exchange->done.record(stream_);
    Pending watched{at::cuda::CUDAEvent(), Clock::now() + timeout_};
    watched.done.record(stream_);
    pending_.push_back(std::move(watched));
    wake_watchdog_.notify_one();
    return exchange;
  }

  at::Tensor to_host(const at::Tensor& tensor) override {
    const c10::cuda::CUDAGuard guard(device_);
    auto host = at::empty(tensor.sizes(), tensor.options().device(at::kCPU).pinned_memory(true));
    host.copy_(tensor, /*non_blocking=*/true);
    at::cuda::CUDAEvent copied;
    copied.record(c10::cuda::getCurrentCUDAStream(device_));
    const auto deadline = Clock::now() + timeout_;
    while (!copied.query()) {
      {
        const std::lock_guard lock(mutex_);
        check_alive();
        const ncclResult_t state = async_state();
        if (state != ncclSuccess && state != ncclInProgress) {
          fail(std::string("NCCL reported ") + ncclGetErrorString(state) +
               " (another rank has probably failed)");
        }
        if (Clock::now() > deadline) {
          fail("no counts from the other ranks within " + seconds() +
               " (another rank has probably failed or stopped)");
        }
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
    {
      const std::lock_guard lock(mutex_);
      stopping_ = true;
    }
    wake_watchdog_.notify_one();
    if (watchdog_.joinable()) watchdog_.join();
    const c10::cuda::CUDAGuard guard(device_);
    const std::lock_guard lock(mutex_);
    if (comm_ == nullptr) return;
    // A non-blocking communicator is finalised (its pending work flushed) before destruction.
    try {
      MOE_KERNELS_NCCL_CHECK(ncclCommFinalize(comm_), "ncclCommFinalize");
      wait_until_ready("finalising the communicator");
    } catch (const c10::Error&) {
      abort();
      return;
    }
    ncclCommDestroy(comm_);
    comm_ = nullptr;
  }

 private:
  struct Pending {
    at::cuda::CUDAEvent done;
    Clock::time_point deadline;
  };

  // One segment per peer with rows, in rank order.
  static std::vector<Segment> per_peer(const std::vector<int64_t>& splits) {
    std::vector<Segment> segments;
    int64_t first_row = 0;
    for (size_t peer = 0; peer < splits.size(); ++peer) {
      if (splits[peer]) segments.push_back({static_cast<int>(peer), first_row, splits[peer]});
      first_row += splits[peer];
    }
    return segments;
  }

  // One ncclSend or ncclRecv per segment, in one group: NCCL matches those between two ranks
  // in order. Rows are sent as bytes: one code path for every dtype.
  void enqueue(const at::Tensor& input, const at::Tensor& output, const std::vector<Segment>& sends,
               const std::vector<Segment>& recvs) {
    const int64_t row_bytes = input.size(1) * input.element_size();
    const auto* in = static_cast<const char*>(input.const_data_ptr());
    auto* out = static_cast<char*>(output.mutable_data_ptr());
    NcclGroup group;
    for (const auto& segment : sends) {
      MOE_KERNELS_NCCL_CHECK(
          ncclSend(in + segment.first_row * row_bytes, segment.num_rows * row_bytes, ncclChar,
                   segment.peer, comm_, stream_),
          "ncclSend");
    }
    for (const auto& segment : recvs) {
      MOE_KERNELS_NCCL_CHECK(
          ncclRecv(out + segment.first_row * row_bytes, segment.num_rows * row_bytes, ncclChar,
                   segment.peer, comm_, stream_),
          "ncclRecv");
    }
    group.end();
  }

  // The watchdog: exchanges complete in order on the side stream, so only the oldest one
  // pending needs watching.
  void watch() {
    const c10::cuda::CUDAGuard guard(device_);
    std::unique_lock lock(mutex_);
    while (true) {
      wake_watchdog_.wait(lock, [this] { return stopping_ || !pending_.empty(); });
      if (stopping_) return;
      while (!pending_.empty() && pending_.front().done.query()) pending_.pop_front();
      if (!pending_.empty() && comm_ != nullptr) {
        const ncclResult_t state = async_state();
        std::string failure;
        if (state != ncclSuccess && state != ncclInProgress) {
          failure = std::string("NCCL reported ") + ncclGetErrorString(state) +
                    " during an all-to-all of rows (another rank has probably failed)";
        } else if (Clock::now() > pending_.front().deadline) {
          failure = "an all-to-all of rows did not complete within " + seconds() +
                    " (another rank has probably failed or stopped)";
        }
        if (!failure.empty()) {
          error_ = describe() + ": " + failure + "; the communicator is aborted";
          // The thread that queued the exchange may be blocked in a host synchronisation:
          // say why now, not only at the transport's next call.
          std::cerr << "moe_kernels: " << error_ << std::endl;
          abort();
          pending_.clear();
        }
      }
      lock.unlock();
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
      lock.lock();
    }
  }

  // Polls the communicator until its last operation is done. Holds mutex_.
  void wait_until_ready(const std::string& what) {
    const auto deadline = Clock::now() + timeout_;
    while (true) {
      const ncclResult_t state = async_state();
      if (state == ncclSuccess) return;
      if (state != ncclInProgress) {
        fail(what + ": NCCL reported " + ncclGetErrorString(state) + " (" +
             ncclGetLastError(comm_) + ")");
      }
      if (Clock::now() > deadline) fail(what + ": not done within " + seconds());
      std::this_thread::yield();
    }
  }

  ncclResult_t async_state() {
    ncclResult_t state = ncclSuccess;
    const ncclResult_t result = ncclCommGetAsyncError(comm_, &state);
    return result == ncclSuccess ? state : result;
  }

  void check_alive() const {
    TORCH_CHECK(comm_ != nullptr, error_.empty() ? describe() + " was released" : error_);
  }

  [[noreturn]] void fail(const std::string& why) {
    error_ = describe() + ": " + why + "; the communicator is aborted";
    abort();
    TORCH_CHECK(false, error_);
  }

  void abort() {
    if (comm_ != nullptr) ncclCommAbort(comm_);
    comm_ = nullptr;
  }

  std::string seconds() const {
    return std::to_string(std::chrono::duration<double>(timeout_).count()) + " s";
  }

  std::string name_;
  int rank_, size_;
  c10::DeviceIndex device_;
  Clock::duration timeout_;
  c10::cuda::CUDAStream stream_;
  // Guards comm_, error_, pending_ and stopping_ between the caller and the watchdog.
  std::mutex mutex_;
  ncclComm_t comm_ = nullptr;
  std::string error_;
  std::deque<Pending> pending_;
  bool stopping_ = false;
  std::condition_variable wake_watchdog_;
  std::thread watchdog_;
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
