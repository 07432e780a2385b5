#include "emu/scheduler.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <numeric>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string_view>
#include <utility>
#include <vector>

#include "emu/async_copy_queue.h"
#include "emu/fiber.h"
#include "emu/hopper.h"

namespace moe_kernels::emu {
namespace {

constexpr int kWarpSize = 32;
constexpr int kMaxBlockThreads = 1024;

enum class ThreadState { kRunnable, kAtBarrier, kInCollective, kWaiting, kExited };

struct Thread {
  FiberContext context;
  uint3 index;
  ThreadState state;
  uint64_t result;
  AsyncCopyQueue copies;
};

// A warp collective that some lanes of its mask have reached.
struct Collective {
  WarpOp op;
  unsigned mask;
  int width;
  unsigned arrived = 0;
  uint64_t value[kWarpSize] = {};
  int lane_param[kWarpSize] = {};
  void* data[kWarpSize] = {};
  WarpFunction function = nullptr;
};

struct Warp {
  unsigned exists = 0;
  unsigned exited = 0;
  std::vector<Collective> pending;
};

// Everything about the launch in progress. Launches are serialised, so one global suffices and
// kernels reach it without thread-local lookups.
struct Launch {
  const LaunchSpec* spec = nullptr;
  void (*call_kernel)(void*) = nullptr;
  void* kernel_call = nullptr;
  uint3 block_index{0, 0, 0};
  int num_threads = 0;
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  std::vector<int> released;  // threads that run in the next round
  int current = -1;
  FiberContext scheduler;
  std::string error;
  unsigned char* dynamic_shared = nullptr;  // 1024-byte aligned, dynamic_shared_size bytes
  size_t dynamic_shared_size = 0;
  uint64_t progress = 0;  // events other threads may wait for
};

constexpr std::align_val_t kSharedAlignment{1024};

struct SharedStorage {
  void operator()(unsigned char* p) const { ::operator delete[](p, kSharedAlignment); }
};

std::mutex launch_mutex;
Launch* running = nullptr;
std::vector<std::unique_ptr<FiberStack>> stacks;
std::vector<std::pair<void*, size_t>> static_shared;

Launch& launch_or_fail(const char* what) {
  if (running == nullptr || running->current < 0) {
    throw std::runtime_error(std::string("moe_kernels emulator: ") + what +
                             " called outside an emulated kernel");
  }
  return *running;
}

std::string where(const Launch& l) {
  std::ostringstream s;
  s << "kernel " << l.spec->kernel_name << ", block (" << l.block_index.x << ", " << l.block_index.y
    << ", " << l.block_index.z << ")";
  return s.str();
}

std::string thread_list(const Launch& l, ThreadState state) {
  std::ostringstream s;
  int shown = 0, total = 0;
  for (int t = 0; t < l.num_threads; ++t) {
    if (l.threads[t].state != state) continue;
    if (shown < 8) s << (shown++ ? ", " : "") << t;
    ++total;
  }
  if (total > shown) s << ", ... (" << total << " threads)";
  return s.str();
}

std::string hex(unsigned mask) {
  std::ostringstream s;
  s << "0x" << std::hex << mask;
  return s.str();
}

void yield_to_scheduler(Launch& l) { switch_fiber(l.threads[l.current].context, l.scheduler); }

void thread_main(void*) {
  Launch& l = *running;
  l.call_kernel(l.kernel_call);
  Thread& t = l.threads[l.current];
  // Their bytes would land in a block that has ended, perhaps over the next block's data. The
  // scheduler reports it as it reports fail(), which this bottom frame of the fiber avoids.
  if (const size_t copies = t.copies.in_flight(); copies > 0) {
    l.error = "cp.async copies still in flight at exit: " + std::to_string(copies) +
              " copies that no cp_async_wait covered (a wait covers only committed groups)";
  }
  t.state = ThreadState::kExited;
  ++l.progress;
  l.warps[l.current / kWarpSize].exited |= 1u << (l.current % kWarpSize);
  switch_fiber(t.context, l.scheduler);
  __builtin_unreachable();
}

int source_lane(WarpOp op, int lane, int param, int width) {
  const int base = lane & ~(width - 1);
  switch (op) {
    case WarpOp::kShflIdx:
      return base + ((param % width) + width) % width;
    case WarpOp::kShflUp:
      return lane - base >= param ? lane - param : lane;
    case WarpOp::kShflDown:
      return lane - base + param < width ? lane + param : lane;
    case WarpOp::kShflXor: {
      const int src = lane ^ param;
      return src >= base + width ? lane : src;  // later segments give the caller's own value
    }
    default:
      return lane;
  }
}

// Called by the lane that completes `c`: every lane of the mask gets its result and runs again
// in the next round.
void complete(Launch& l, int warp, const Collective& c) {
  if (c.function != nullptr) c.function(c.data);
  unsigned votes = 0;
  for (int lane = 0; lane < kWarpSize; ++lane) {
    if ((c.mask >> lane & 1u) && c.value[lane] != 0) votes |= 1u << lane;
  }
  for (int lane = 0; lane < kWarpSize; ++lane) {
    if (!(c.mask >> lane & 1u)) continue;
    uint64_t result = 0;
    switch (c.op) {
      case WarpOp::kSync:
      case WarpOp::kMma:
      case WarpOp::kLdmatrix:
      case WarpOp::kWgmma:
      case WarpOp::kWgmmaFence:
      case WarpOp::kWgmmaCommit:
      case WarpOp::kWgmmaWait:
      case WarpOp::kSetmaxnreg:
        break;
      case WarpOp::kElect:
        result = lane == __builtin_ctz(c.mask);
        break;
      case WarpOp::kBallot:
        result = votes;
        break;
      case WarpOp::kAny:
        result = votes != 0;
        break;
      case WarpOp::kAll:
        result = votes == c.mask;
        break;
      case WarpOp::kMatchAny:
        for (int other = 0; other < kWarpSize; ++other) {
          if ((c.mask >> other & 1u) && c.value[other] == c.value[lane]) result |= 1ull << other;
        }
        break;
      default: {
        const int src = source_lane(c.op, lane, c.lane_param[lane], c.width);
        if (!(c.mask >> src & 1u)) {
          fail(std::string(warp_op_name(c.op)) + ": lane " + std::to_string(lane) + " of warp " +
               std::to_string(warp) + " reads lane " + std::to_string(src) +
               ", which is not in the mask");
        }
        result = c.value[src];
      }
    }
    const int t = warp * kWarpSize + lane;
    l.threads[t].result = result;
    l.threads[t].state = ThreadState::kRunnable;
    l.released.push_back(t);
  }
}

void arrange(std::vector<int>& order, Schedule schedule, std::mt19937_64& rng) {
  // Rounds usually start in thread order already (a barrier releases 0..n-1).
  if (!std::is_sorted(order.begin(), order.end())) std::sort(order.begin(), order.end());
  if (schedule == Schedule::kReverse) std::reverse(order.begin(), order.end());
  if (schedule == Schedule::kRandom) std::shuffle(order.begin(), order.end(), rng);
}

// Ends a round in which no thread could run: either every thread has exited, or all that have
// not wait at __syncthreads (which then opens), or the block can never go on.
bool open_barrier_or_finish(Launch& l) {
  int at_barrier = 0, exited = 0, in_collective = 0;
  for (const Thread& t : l.threads) {
    at_barrier += t.state == ThreadState::kAtBarrier;
    exited += t.state == ThreadState::kExited;
    in_collective += t.state == ThreadState::kInCollective;
  }
  if (in_collective > 0) {
    for (size_t w = 0; w < l.warps.size(); ++w) {
      for (const Collective& c : l.warps[w].pending) {
        std::ostringstream s;
        s << "moe_kernels emulator: deadlock in " << where(l) << ": " << warp_op_name(c.op)
          << " of warp " << w << " with mask " << hex(c.mask) << " waits for lanes "
          << hex(c.mask & ~c.arrived)
          << " that never arrive (they exited, wait at __syncthreads or at another collective)";
        throw std::runtime_error(s.str());
      }
    }
  }
  if (at_barrier == 0) return false;  // all threads exited: the block is done
  if (exited > 0) {
    throw std::runtime_error("moe_kernels emulator: divergent __syncthreads in " + where(l) +
                             ": threads " + thread_list(l, ThreadState::kAtBarrier) +
                             " wait at the barrier, threads " +
                             thread_list(l, ThreadState::kExited) + " have exited");
  }
  for (Thread& t : l.threads) t.state = ThreadState::kRunnable;
  return true;
}

void poison_shared(Launch& l) {
  std::memset(l.dynamic_shared, kPoisonByte, l.dynamic_shared_size);
  for (auto [storage, bytes] : static_shared) std::memset(storage, kPoisonByte, bytes);
}

// Runs warp w's lanes until none can go on: each waits at __syncthreads, has exited, or waits for
// lanes of another collective. Within the warp the lanes run in rounds, in schedule order,
// switching at warp collectives. A warp runs alone from one block barrier to the next, so a
// missing __syncthreads between warps shows under "forward" or "reverse" even when warp
// collectives lie between the write and the read.
void run_warp(Launch& l, int w, std::mt19937_64& rng) {
  std::vector<int> order;
  const int end = std::min(l.num_threads, (w + 1) * kWarpSize);
  for (int t = w * kWarpSize; t < end; ++t) {
    if (l.threads[t].state == ThreadState::kRunnable) order.push_back(t);
  }
  while (!order.empty()) {
    arrange(order, l.spec->schedule, rng);
    l.released.clear();
    for (int t : order) {
      l.current = t;
      switch_fiber(l.scheduler, l.threads[t].context);
      if (!l.error.empty()) {
        throw std::runtime_error("moe_kernels emulator: " + l.error + " (" + where(l) +
                                 ", thread " + std::to_string(t) + ")");
      }
    }
    l.current = -1;
    order.swap(l.released);
  }
}

void run_block(Launch& l, std::mt19937_64& rng) {
  poison_shared(l);
  const dim3 b = l.spec->block;
  for (int t = 0; t < l.num_threads; ++t) {
    Thread& thread = l.threads[t];
    thread.index = uint3{t % b.x, t / b.x % b.y, t / (b.x * b.y)};
    thread.state = ThreadState::kRunnable;
    thread.copies.clear();  // a failed launch may have left some
    make_fiber(thread.context, *stacks[t], thread_main, nullptr);
  }
  for (size_t w = 0; w < l.warps.size(); ++w) {
    const int lanes = std::min<int>(kWarpSize, l.num_threads - static_cast<int>(w) * kWarpSize);
    l.warps[w].exists = lanes == kWarpSize ? ~0u : (1u << lanes) - 1;
    l.warps[w].exited = 0;
    l.warps[w].pending.clear();
  }
  reset_block_async_state();
  std::vector<int> warp_order(l.warps.size());
  std::iota(warp_order.begin(), warp_order.end(), 0);
  do {
    // Passes over the warps until no thread waits at an mbarrier, or one in which nothing
    // happened that a waiter could have been waiting for.
    for (;;) {
      const uint64_t before = l.progress;
      arrange(warp_order, l.spec->schedule, rng);
      for (int w : warp_order) run_warp(l, w, rng);
      int woken = 0;
      for (Thread& t : l.threads) {
        if (t.state == ThreadState::kWaiting) {
          t.state = ThreadState::kRunnable;
          ++woken;
        }
      }
      if (woken == 0) break;
      if (l.progress == before) {
        for (Thread& t : l.threads) {
          if (t.state == ThreadState::kRunnable) t.state = ThreadState::kWaiting;
        }
        throw std::runtime_error("moe_kernels emulator: deadlock in " + where(l) + ": threads " +
                                 thread_list(l, ThreadState::kWaiting) +
                                 " wait at mbarriers that nothing can complete any more");
      }
    }
  } while (open_barrier_or_finish(l));
  if (const std::string left = block_async_leftover(); !left.empty()) {
    throw std::runtime_error("moe_kernels emulator: " + left + " at the end of " + where(l));
  }
}

void check_launch(const LaunchSpec& spec) {
  const dim3 g = spec.grid, b = spec.block;
  const uint64_t threads = uint64_t{b.x} * b.y * b.z;
  std::ostringstream s;
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.y > 65535 || g.z > 65535) {
    s << "grid (" << g.x << ", " << g.y << ", " << g.z << ") is not a valid CUDA grid";
  } else if (threads == 0 || threads > kMaxBlockThreads || b.z > 64) {
    s << "block (" << b.x << ", " << b.y << ", " << b.z << ") is not a valid CUDA block";
  } else if (const size_t limit = max_dynamic_shared_bytes(spec.kernel);
             spec.dynamic_shared_bytes > limit) {
    s << spec.dynamic_shared_bytes << " bytes of dynamic shared memory exceed the " << limit
      << " the kernel may use; allow_dynamic_shared<kernel>(bytes) raises the limit up to "
      << kSharedMemoryPerBlockOptin;
  } else {
    return;
  }
  throw std::runtime_error("moe_kernels emulator: invalid launch of " + spec.kernel_name + ": " +
                           s.str());
}

// The calling lane's part of any collective: `value` and `lane_param` for those that move 64 bits,
// `data` and `function` for the others.
uint64_t arrive(WarpOp op, unsigned mask, int width, uint64_t value, int lane_param, void* data,
                WarpFunction function) {
  Launch& l = *running;
  const int warp = l.current / kWarpSize, lane = l.current % kWarpSize;
  Warp& w = l.warps[warp];
  const std::string_view name = warp_op_name(op);  // a std::string only on the way to an error
  if (!(mask >> lane & 1u))
    fail(std::string(name) + ": the calling lane " + std::to_string(lane) + " is not in its mask");
  if (mask & ~w.exists) {
    fail(std::string(name) + ": the mask names lanes that do not exist in this block");
  }
  if (width < 1 || width > kWarpSize || (width & (width - 1)) != 0) {
    fail(std::string(name) + ": width must be a power of two in [1, 32], got " +
         std::to_string(width));
  }
  auto it = std::find_if(w.pending.begin(), w.pending.end(),
                         [&](const Collective& c) { return (c.mask & mask) != 0; });
  if (it == w.pending.end()) {
    it = w.pending.emplace(w.pending.end());
    it->op = op;
    it->mask = mask;
    it->width = width;
    it->function = function;
  } else if (it->mask != mask || it->op != op || it->width != width) {
    fail(std::string(name) + " with mask " + hex(mask) + " meets " + warp_op_name(it->op) +
         " with mask " + hex(it->mask) + " in the same warp: divergent collectives");
  }
  it->value[lane] = value;
  it->lane_param[lane] = lane_param;
  it->data[lane] = data;
  it->arrived |= 1u << lane;
  ++l.progress;
  if (it->arrived == mask) {
    complete(l, warp, *it);
    w.pending.erase(it);
  } else {
    l.threads[l.current].state = ThreadState::kInCollective;
  }
  yield_to_scheduler(l);
  return l.threads[l.current].result;
}

}  // namespace

void run_launch(const LaunchSpec& spec, void (*call_kernel)(void*), void* kernel_call) {
  check_launch(spec);
  const std::lock_guard<std::mutex> lock(launch_mutex);
  Launch l;
  l.spec = &spec;
  l.call_kernel = call_kernel;
  l.kernel_call = kernel_call;
  l.num_threads = static_cast<int>(spec.block.x * spec.block.y * spec.block.z);
  l.threads.resize(l.num_threads);
  l.warps.resize((l.num_threads + kWarpSize - 1) / kWarpSize);
  const std::unique_ptr<unsigned char[], SharedStorage> shared(
      new (kSharedAlignment) unsigned char[std::max<size_t>(spec.dynamic_shared_bytes, 1)]);
  l.dynamic_shared = shared.get();
  l.dynamic_shared_size = spec.dynamic_shared_bytes;
  while (stacks.size() < static_cast<size_t>(l.num_threads)) {
    stacks.push_back(std::make_unique<FiberStack>());
  }
  running = &l;
  struct Reset {
    ~Reset() { running = nullptr; }
  } reset;
  for (unsigned z = 0; z < spec.grid.z; ++z) {
    for (unsigned y = 0; y < spec.grid.y; ++y) {
      for (unsigned x = 0; x < spec.grid.x; ++x) {
        l.block_index = uint3{x, y, z};
        // Each block's random order depends only on the seed and the block: reproducible.
        std::seed_seq seq{spec.seed, uint64_t{x}, uint64_t{y}, uint64_t{z}};
        std::mt19937_64 rng(seq);
        run_block(l, rng);
      }
    }
  }
}

uint3 thread_index() {
  Launch& l = launch_or_fail("threadIdx");
  return l.threads[l.current].index;
}

uint3 block_index() { return launch_or_fail("blockIdx").block_index; }

dim3 block_dim() { return launch_or_fail("blockDim").spec->block; }

dim3 grid_dim() { return launch_or_fail("gridDim").spec->grid; }

void sync_threads() {
  Launch& l = launch_or_fail("__syncthreads");
  l.threads[l.current].state = ThreadState::kAtBarrier;
  ++l.progress;
  yield_to_scheduler(l);
}

int current_thread() { return launch_or_fail("a thread index").current; }

int block_threads() { return launch_or_fail("a block size").num_threads; }

void wait_for_progress() {
  Launch& l = launch_or_fail("an mbarrier wait");
  l.threads[l.current].state = ThreadState::kWaiting;
  yield_to_scheduler(l);
}

void note_progress() { ++launch_or_fail("an asynchronous event").progress; }

const char* warp_op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kSync:
      return "__syncwarp";
    case WarpOp::kShflIdx:
      return "__shfl_sync";
    case WarpOp::kShflUp:
      return "__shfl_up_sync";
    case WarpOp::kShflDown:
      return "__shfl_down_sync";
    case WarpOp::kShflXor:
      return "__shfl_xor_sync";
    case WarpOp::kBallot:
      return "__ballot_sync";
    case WarpOp::kAny:
      return "__any_sync";
    case WarpOp::kAll:
      return "__all_sync";
    case WarpOp::kMatchAny:
      return "__match_any_sync";
    case WarpOp::kMma:
      return "mma.sync";
    case WarpOp::kLdmatrix:
      return "ldmatrix";
    case WarpOp::kElect:
      return "elect.sync";
    case WarpOp::kWgmma:
      return "wgmma.mma_async";
    case WarpOp::kWgmmaFence:
      return "wgmma.fence";
    case WarpOp::kWgmmaCommit:
      return "wgmma.commit_group";
    case WarpOp::kWgmmaWait:
      return "wgmma.wait_group";
    case WarpOp::kSetmaxnreg:
      return "setmaxnreg";
  }
  return "warp collective";
}

uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int lane_param, int width) {
  launch_or_fail(warp_op_name(op));
  return arrive(op, mask, width, value, lane_param, nullptr, nullptr);
}

void aligned_warp_collective(WarpOp op, void* lane_data, WarpFunction function) {
  Launch& l = launch_or_fail(warp_op_name(op));
  const unsigned lanes = l.warps[l.current / kWarpSize].exists;
  if (lanes != ~0u) {
    fail(std::string(warp_op_name(op)) + " in warp " + std::to_string(l.current / kWarpSize) +
         ", which has only " + std::to_string(__builtin_popcount(lanes)) +
         " threads: it needs all 32 lanes of a warp");
  }
  arrive(op, lanes, kWarpSize, 0, 0, lane_data, function);
}

unsigned active_mask() {
  Launch& l = launch_or_fail("__activemask");
  const Warp& w = l.warps[l.current / kWarpSize];
  return w.exists & ~w.exited;
}

void* dynamic_shared_memory() { return launch_or_fail("dynamic shared memory").dynamic_shared; }

uint32_t shared_address(const void* pointer, size_t bytes) {
  const Launch& l = launch_or_fail("a shared-memory address");
  const auto p = reinterpret_cast<uintptr_t>(pointer);
  const auto begin = reinterpret_cast<uintptr_t>(l.dynamic_shared);
  if (p < begin || p - begin > l.dynamic_shared_size ||
      bytes > l.dynamic_shared_size - (p - begin)) {
    std::ostringstream s;
    s << "address " << pointer << " (" << bytes
      << " bytes) is not in the block's dynamic shared memory, where the asynchronous units "
         "(mbarriers, tensor copies, wgmma) address it";
    fail(s.str());
  }
  return static_cast<uint32_t>(p - begin);
}

unsigned char* shared_bytes_at(uint32_t address, size_t bytes, const char* what) {
  const Launch& l = launch_or_fail(what);
  if (address > l.dynamic_shared_size || bytes > l.dynamic_shared_size - address) {
    std::ostringstream s;
    s << what << ": shared address 0x" << std::hex << address << std::dec << " + " << bytes
      << " bytes is past the block's " << l.dynamic_shared_size << " bytes of shared memory";
    fail(s.str());
  }
  return l.dynamic_shared + address;
}

void register_static_shared(void* storage, size_t bytes) {
  static_shared.emplace_back(storage, bytes);
  std::memset(storage, kPoisonByte, bytes);
}

bool in_shared_memory(const void* address, size_t bytes) {
  const Launch& l = launch_or_fail("a shared-memory check");
  const auto p = reinterpret_cast<uintptr_t>(address);
  const auto inside = [&](const void* storage, size_t size) {
    const auto begin = reinterpret_cast<uintptr_t>(storage);
    return p >= begin && p - begin <= size && bytes <= size - (p - begin);
  };
  if (inside(l.dynamic_shared, l.dynamic_shared_size)) return true;
  return std::any_of(static_shared.begin(), static_shared.end(),
                     [&](const auto& region) { return inside(region.first, region.second); });
}

Schedule launch_schedule() { return launch_or_fail("a schedule query").spec->schedule; }

AsyncCopyQueue& async_copies() {
  Launch& l = launch_or_fail("cp.async");
  return l.threads[l.current].copies;
}

void fail(const std::string& message) {
  Launch& l = launch_or_fail("an emulator check");
  l.error = message;
  yield_to_scheduler(l);
  __builtin_unreachable();
}

}  // namespace moe_kernels::emu
