// Kernels that exercise one feature of the emulator each, for its own tests
// (python_tests/test_emulator.py), exposed as moe_kernels._C.emulator_selftest.*. They run under
// the schedule of moe_kernels.emulate(); results come back as plain vectors. The tensor-core and
// cp.async kernels live in selftest_tensor_core.cpp and selftest_async_copy.cpp.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "device/launch.h"

namespace moe_kernels::emu::selftest {
namespace {

using device::LaunchConfig;

void check(cudaError_t err) {
  if (err != cudaSuccess) throw std::runtime_error(cudaGetErrorString(err));
}

// Each thread writes where it is: (global id, block x, y, z, thread x, y, z, blockDim.x,
// gridDim.x), and bumps a launch-wide counter to record the order it ran in.
__global__ void where_am_i_kernel(int64_t* out, int64_t* counter) {
  const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
  const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  int64_t* o = out + (static_cast<int64_t>(block) * threads + thread) * 10;
  o[0] = atomicAdd(counter, int64_t{1});
  o[1] = blockIdx.x, o[2] = blockIdx.y, o[3] = blockIdx.z;
  o[4] = threadIdx.x, o[5] = threadIdx.y, o[6] = threadIdx.z;
  o[7] = blockDim.x, o[8] = gridDim.x, o[9] = gridDim.y;
}

std::vector<int64_t> where_am_i(std::vector<unsigned> grid, std::vector<unsigned> block) {
  const dim3 g(grid.at(0), grid.at(1), grid.at(2)), b(block.at(0), block.at(1), block.at(2));
  std::vector<int64_t> out(static_cast<size_t>(g.x) * g.y * g.z * b.x * b.y * b.z * 10, -1);
  int64_t counter = 0;
  check(device::launch<where_am_i_kernel>(LaunchConfig{g, b}, nullptr, out.data(), &counter));
  return out;
}

// A shared-memory tree sum over 256 threads; without the barriers it is a race.
template <bool kSync>
__global__ void block_sum_kernel(const float* values, float* out) {
  MOE_KERNELS_SHARED(float, partial, [256]);
  partial[threadIdx.x] = values[blockIdx.x * 256 + threadIdx.x];
  if (kSync) __syncthreads();
  for (int width = 128; width > 0; width /= 2) {
    if (static_cast<int>(threadIdx.x) < width) partial[threadIdx.x] += partial[threadIdx.x + width];
    if (kSync) __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = partial[0];
}

std::vector<float> block_sum(std::vector<float> values, bool sync) {
  const unsigned blocks = static_cast<unsigned>(values.size() / 256);
  std::vector<float> out(blocks);
  const LaunchConfig config{dim3(blocks), dim3(256)};
  check(sync ? device::launch<block_sum_kernel<true>>(config, nullptr, values.data(), out.data())
             : device::launch<block_sum_kernel<false>>(config, nullptr, values.data(), out.data()));
  return out;
}

// Warp 0 writes shared memory that warp 1 reads, with a warp collective between the write and the
// read but no __syncthreads: a race that only the order of whole warps can show.
__global__ void race_across_warps_kernel(int* out) {
  MOE_KERNELS_SHARED(int, value, );
  if (threadIdx.x == 0) value = 42;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int first = __shfl_sync(0xffffffffu, lane, 0);
  if (threadIdx.x == 32) out[0] = value + first;
}

int race_across_warps() {
  int out = 0;
  check(device::launch<race_across_warps_kernel>(LaunchConfig{dim3(1), dim3(64)}, nullptr, &out));
  return out;
}

// Threads below `exit_below` return before a __syncthreads that the others reach.
__global__ void divergent_barrier_kernel(int exit_below, int* out) {
  if (static_cast<int>(threadIdx.x) < exit_below) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

void divergent_barrier(int exit_below) {
  std::vector<int> out(64);
  check(device::launch<divergent_barrier_kernel>(LaunchConfig{dim3(1), dim3(64)}, nullptr,
                                                 exit_below, out.data()));
}

// Lanes below `exit_below` return; the others shuffle with the full mask, which waits for them.
__global__ void divergent_shuffle_kernel(int exit_below, int* out) {
  if (static_cast<int>(threadIdx.x) < exit_below) return;
  out[threadIdx.x] = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x), 0);
}

void divergent_shuffle(int exit_below) {
  std::vector<int> out(32);
  check(device::launch<divergent_shuffle_kernel>(LaunchConfig{dim3(1), dim3(32)}, nullptr,
                                                 exit_below, out.data()));
}

// Every warp collective on `values` (one per lane of a 64-thread block: two warps, the second
// one partial when `threads` < 64). Row r of `out` holds op r's result for each thread.
__global__ void warp_ops_kernel(const int* values, int param, int width, int64_t* out) {
  const int t = threadIdx.x, n = blockDim.x;
  const unsigned lanes = n - t / 32 * 32 >= 32 ? 0xffffffffu : (1u << (n - t / 32 * 32)) - 1;
  const int v = values[t];
  out[0 * n + t] = __shfl_sync(lanes, v, param, width);
  out[1 * n + t] = __shfl_up_sync(lanes, v, param, width);
  out[2 * n + t] = __shfl_down_sync(lanes, v, param, width);
  out[3 * n + t] = __shfl_xor_sync(lanes, v, param, width);
  out[4 * n + t] = __ballot_sync(lanes, v % 3 == 0);
  out[5 * n + t] = __any_sync(lanes, v > param);
  out[6 * n + t] = __all_sync(lanes, v > param);
  out[7 * n + t] = __match_any_sync(lanes, v % 4);
  out[8 * n + t] = __activemask();
  out[9 * n + t] = __shfl_xor_sync(lanes, static_cast<double>(v) + 0.5, 1) * 2;
  __syncwarp(lanes);
}

std::vector<int64_t> warp_ops(std::vector<int> values, int param, int width) {
  const int n = static_cast<int>(values.size());
  std::vector<int64_t> out(10 * n);
  check(device::launch<warp_ops_kernel>(LaunchConfig{dim3(1), dim3(n)}, nullptr, values.data(),
                                        param, width, out.data()));
  return out;
}

// Lane 0 shuffles inside mask 0xffff but reads lane `src`.
__global__ void shuffle_outside_mask_kernel(int src, int* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_sync(0xffffu, 1, threadIdx.x == 0 ? src : 0);
}

void shuffle_outside_mask(int src) {
  std::vector<int> out(32);
  check(device::launch<shuffle_outside_mask_kernel>(LaunchConfig{dim3(1), dim3(32)}, nullptr, src,
                                                    out.data()));
}

// Reads shared memory before writing it, in each of `blocks` blocks, then writes it: each block
// must see the poison, never the previous block's values.
__global__ void shared_poison_kernel(uint32_t* out) {
  MOE_KERNELS_SHARED(uint32_t, fixed, [64]);
  MOE_KERNELS_DYNAMIC_SHARED(uint32_t, dynamic);
  const int t = threadIdx.x;
  out[(blockIdx.x * 2 + 0) * 64 + t] = fixed[t];
  out[(blockIdx.x * 2 + 1) * 64 + t] = dynamic[t];
  __syncthreads();
  fixed[t] = 7;
  dynamic[t] = 9;
}

std::vector<uint32_t> shared_poison(unsigned blocks) {
  std::vector<uint32_t> out(blocks * 2 * 64);
  check(device::launch<shared_poison_kernel>(LaunchConfig{dim3(blocks), dim3(64), 64 * 4}, nullptr,
                                             out.data()));
  return out;
}

// Every thread of every block adds to shared and global counters.
__global__ void atomics_kernel(unsigned long long* total, int* maximum) {
  MOE_KERNELS_SHARED(unsigned int, block_total, );
  if (threadIdx.x == 0) block_total = 0;
  __syncthreads();
  atomicAdd(&block_total, threadIdx.x + 1);
  atomicMax(maximum, static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x));
  __syncthreads();
  if (threadIdx.x == 0) atomicAdd(total, static_cast<unsigned long long>(block_total));
}

std::vector<int64_t> atomics(unsigned blocks, unsigned threads) {
  unsigned long long total = 0;
  int maximum = -1;
  check(device::launch<atomics_kernel>(LaunchConfig{dim3(blocks), dim3(threads)}, nullptr, &total,
                                       &maximum));
  return {static_cast<int64_t>(total), maximum};
}

__global__ void empty_kernel() {}

void launch_config(std::vector<unsigned> grid, std::vector<unsigned> block, size_t shared_bytes) {
  check(device::launch<empty_kernel>(
      LaunchConfig{dim3(grid.at(0), grid.at(1), grid.at(2)),
                   dim3(block.at(0), block.at(1), block.at(2)), shared_bytes},
      nullptr));
}

// Thread 0 writes the last byte of `bytes` of dynamic shared memory, after the kernel's limit is
// set to `allowed` bytes (unless negative).
__global__ void large_shared_kernel(size_t bytes) {
  MOE_KERNELS_DYNAMIC_SHARED(unsigned char, shared);
  if (threadIdx.x == 0) shared[bytes - 1] = 0;
}

void large_shared(size_t bytes, int allowed) {
  if (allowed >= 0) check(device::allow_dynamic_shared<large_shared_kernel>(allowed));
  check(
      device::launch<large_shared_kernel>(LaunchConfig{dim3(1), dim3(32), bytes}, nullptr, bytes));
}

}  // namespace

void bind_tensor_core(pybind11::module_& m);
void bind_async_copy(pybind11::module_& m);
void bind_hopper(pybind11::module_& m);

void bind(pybind11::module_& m) {
  m.def("where_am_i", &where_am_i);
  m.def("block_sum", &block_sum);
  m.def("race_across_warps", &race_across_warps);
  m.def("divergent_barrier", &divergent_barrier);
  m.def("divergent_shuffle", &divergent_shuffle);
  m.def("warp_ops", &warp_ops);
  m.def("shuffle_outside_mask", &shuffle_outside_mask);
  m.def("shared_poison", &shared_poison);
  m.def("atomics", &atomics);
  m.def("launch_config", &launch_config);
  m.def("large_shared", &large_shared);
  bind_tensor_core(m);
  bind_async_copy(m);
  bind_hopper(m);
}

}  // namespace moe_kernels::emu::selftest
