// What CUDA kernel source sees when it is compiled as host C++ for the CPU emulator: the
// execution-space keywords, the built-in index variables, barriers, warp collectives, atomics
// and intrinsics, each mapped onto the scheduler. Include through device/runtime.h.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <type_traits>

#include "emu/launch.h"
#include "emu/runtime_api.h"
#include "emu/scheduler.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) alignas(n)
// Shared memory needs registering for poisoning: kernels declare it with MOE_KERNELS_SHARED.
#define __shared__ \
  static_assert(false, "declare shared memory with MOE_KERNELS_SHARED / _DYNAMIC_SHARED");

#define threadIdx (::moe_kernels::emu::thread_index())
#define blockIdx (::moe_kernels::emu::block_index())
#define blockDim (::moe_kernels::emu::block_dim())
#define gridDim (::moe_kernels::emu::grid_dim())
constexpr int warpSize = 32;

namespace moe_kernels::emu {

// The storage of a static shared declaration: allocated on the heap (where AddressSanitizer
// guards its ends), poisoned now and at the start of every block. Once per declaration (per
// template instantiation, as in CUDA).
template <typename T>
T& static_shared() {
  static_assert(std::is_trivially_default_constructible_v<std::remove_all_extents_t<T>>,
                "shared memory holds trivial types, as in CUDA");
  void* storage = ::operator new(sizeof(T), std::align_val_t{alignof(T) > 16 ? alignof(T) : 16});
  register_static_shared(storage, sizeof(T));
  return *static_cast<T*>(storage);
}

template <typename T>
uint64_t to_bits(T value) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "warp shuffles move <= 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  return bits;
}

template <typename T>
T from_bits(uint64_t bits) {
  T value;
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

template <typename T>
T shuffle(WarpOp op, unsigned mask, T var, int lane_param, int width) {
  return from_bits<T>(warp_collective(op, mask, to_bits(var), lane_param, width));
}

}  // namespace moe_kernels::emu

inline void __syncthreads() { ::moe_kernels::emu::sync_threads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::moe_kernels::emu::warp_collective(::moe_kernels::emu::WarpOp::kSync, mask, 0, 0, warpSize);
}
// Fibers switch only at barriers and collectives, and blocks run one after another, so every
// write is visible to every later read: fences have nothing to do.
inline void __threadfence() {}
inline void __threadfence_block() {}

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  return ::moe_kernels::emu::shuffle(::moe_kernels::emu::WarpOp::kShflIdx, mask, var, src_lane,
                                     width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return ::moe_kernels::emu::shuffle(::moe_kernels::emu::WarpOp::kShflUp, mask, var,
                                     static_cast<int>(delta), width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return ::moe_kernels::emu::shuffle(::moe_kernels::emu::WarpOp::kShflDown, mask, var,
                                     static_cast<int>(delta), width);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  return ::moe_kernels::emu::shuffle(::moe_kernels::emu::WarpOp::kShflXor, mask, var, lane_mask,
                                     width);
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return static_cast<unsigned>(::moe_kernels::emu::warp_collective(
      ::moe_kernels::emu::WarpOp::kBallot, mask, predicate != 0, 0, warpSize));
}
inline int __any_sync(unsigned mask, int predicate) {
  return static_cast<int>(::moe_kernels::emu::warp_collective(::moe_kernels::emu::WarpOp::kAny,
                                                              mask, predicate != 0, 0, warpSize));
}
inline int __all_sync(unsigned mask, int predicate) {
  return static_cast<int>(::moe_kernels::emu::warp_collective(::moe_kernels::emu::WarpOp::kAll,
                                                              mask, predicate != 0, 0, warpSize));
}
template <typename T>
unsigned __match_any_sync(unsigned mask, T value) {
  return static_cast<unsigned>(
      ::moe_kernels::emu::warp_collective(::moe_kernels::emu::WarpOp::kMatchAny, mask,
                                          ::moe_kernels::emu::to_bits(value), 0, warpSize));
}
inline unsigned __activemask() { return ::moe_kernels::emu::active_mask(); }

// Atomics: fibers never switch inside one, so a plain read-modify-write is atomic.
namespace moe_kernels::emu {
template <typename T, typename Update>
T read_modify_write(T* address, Update update) {
  const T old = *address;
  *address = update(old);
  return old;
}
}  // namespace moe_kernels::emu

template <typename T>
T atomicAdd(T* address, T value) {
  return ::moe_kernels::emu::read_modify_write(address, [&](T old) { return old + value; });
}
template <typename T>
T atomicSub(T* address, T value) {
  return ::moe_kernels::emu::read_modify_write(address, [&](T old) { return old - value; });
}
template <typename T>
T atomicMax(T* address, T value) {
  return ::moe_kernels::emu::read_modify_write(address,
                                               [&](T old) { return old < value ? value : old; });
}
template <typename T>
T atomicMin(T* address, T value) {
  return ::moe_kernels::emu::read_modify_write(address,
                                               [&](T old) { return value < old ? value : old; });
}
template <typename T>
T atomicExch(T* address, T value) {
  return ::moe_kernels::emu::read_modify_write(address, [&](T) { return value; });
}
template <typename T>
T atomicCAS(T* address, T compare, T value) {
  return ::moe_kernels::emu::read_modify_write(address,
                                               [&](T old) { return old == compare ? value : old; });
}
template <typename T>
T atomicOr(T* address, T value) {
  return ::moe_kernels::emu::read_modify_write(address, [&](T old) { return old | value; });
}
template <typename T>
T atomicAnd(T* address, T value) {
  return ::moe_kernels::emu::read_modify_write(address, [&](T old) { return old & value; });
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
template <typename T>
T __ldg(const T* address) {
  return *address;
}
