// The CUDA execution model on the CPU: a launch runs its blocks one after another on the calling
// OS thread, each block's threads as fibers, switched only at barriers, warp collectives and
// exit. Between two __syncthreads the warps run one at a time, in the order of a schedule
// (forward, reverse or seeded random), and within a warp the lanes run in rounds between warp
// collectives, in the same order; so a missing barrier or a race gives different results under
// different schedules. A barrier or collective that not every thread reaches is reported as an
// error naming the kernel, never a hang. Launches are serialised process-wide.
//
// Tensor-core instructions (mma.sync, ldmatrix, wgmma) are warp collectives too: the last lane to
// arrive computes for the whole warp. Each thread also owns the queue of its cp.async copies,
// emptied at every block start; a thread that exits while some are in flight is an error.
//
// Warp-specialised kernels meet at mbarriers, not at __syncthreads: a thread whose mbarrier wait
// fails steps aside (wait_for_progress) and the block's other warps run; the waiters try again
// after every pass over the warps in which something happened (note_progress), and a pass in
// which nothing did while some still wait is a deadlock, reported as such. The asynchronous units
// of Hopper (mbarriers, the tensor copy engine, wgmma) keep per-block state (emu/hopper.h), reset
// at every block start and checked at its end.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "emu/runtime_api.h"

namespace moe_kernels::emu {

enum class Schedule : int { kForward = 0, kReverse = 1, kRandom = 2 };

class AsyncCopyQueue;

struct LaunchSpec {
  std::string kernel_name;
  const void* kernel;  // the key of its attributes (cudaFuncSetAttribute)
  dim3 grid;
  dim3 block;
  size_t dynamic_shared_bytes;
  Schedule schedule;
  uint64_t seed;
};

// Runs call_kernel(kernel_call) once per emulated thread. Throws std::runtime_error on a bad
// launch configuration or a failure inside the kernel (divergent barrier, deadlock, bad mask).
void run_launch(const LaunchSpec& spec, void (*call_kernel)(void*), void* kernel_call);

// What kernels call, through emu/runtime.h. Valid only inside an emulated thread.
uint3 thread_index();
uint3 block_index();
dim3 block_dim();
dim3 grid_dim();
void sync_threads();

enum class WarpOp : int {
  kSync,
  kShflIdx,
  kShflUp,
  kShflDown,
  kShflXor,
  kBallot,
  kAny,
  kAll,
  kMatchAny,
  kMma,
  kLdmatrix,
  kElect,
  kWgmma,
  kWgmmaFence,
  kWgmmaCommit,
  kWgmmaWait,
  kSetmaxnreg,
};
const char* warp_op_name(WarpOp op);

// One lane's part of a warp collective over the lanes of `mask`: the caller waits until every
// lane of the mask has arrived with the same op and mask, then gets its result (the 64 bits of
// the value it reads, or the vote's mask or boolean).
uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int lane_param, int width);

// A collective whose lanes bring more than 64 bits each (mma.sync's fragments, ldmatrix's
// addresses and registers). It is `.aligned`: every lane of a full warp calls it, so a lane that
// exited makes it a deadlock error. Each lane passes a pointer to its own operands and
// results, which stay alive on its stack while it waits; the lane that arrives last runs
// function(lanes), lanes[l] being lane l's pointer, before any lane goes on.
using WarpFunction = void (*)(void* const* lanes);
void aligned_warp_collective(WarpOp op, void* lane_data, WarpFunction function);

// Lanes of the caller's warp that exist and have not exited.
unsigned active_mask();

// Dynamic shared memory of the running block, poisoned at the block's start; 1024-byte aligned,
// as the swizzle patterns of the tensor copy engine and wgmma need.
void* dynamic_shared_memory();
// The shared-state-space address of a pointer into dynamic shared memory (what
// __cvta_generic_to_shared gives on a GPU): its offset from the start. Fails for any other pointer.
uint32_t shared_address(const void* pointer, size_t bytes);
// The bytes at a shared-state-space address; fails when [address, address + bytes) is outside.
unsigned char* shared_bytes_at(uint32_t address, size_t bytes, const char* what);
// The calling thread's linear index in its block, and its warp's.
int current_thread();
// The running block's number of threads.
int block_threads();
// A thread whose wait cannot complete yet steps aside until the block has moved on.
void wait_for_progress();
// Something other threads may wait for has happened (an mbarrier changed, a copy landed).
void note_progress();
// Registers static shared storage: poisoned now and at the start of every block.
void register_static_shared(void* storage, size_t bytes);
// Whether [address, address + bytes) lies in the running block's dynamic shared memory or in one
// registered static shared declaration.
bool in_shared_memory(const void* address, size_t bytes);

// The running launch's schedule, for primitives whose timing it decides (cp.async).
Schedule launch_schedule();
// The calling thread's cp.async copies.
AsyncCopyQueue& async_copies();

// Stops the calling thread's block with an error, reported by run_launch.
[[noreturn]] void fail(const std::string& message);

// The byte that fills shared memory at every block start: float NaN, integer -1.
constexpr unsigned char kPoisonByte = 0xff;

}  // namespace moe_kernels::emu
