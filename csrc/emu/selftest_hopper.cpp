// Kernels that prove the emulator's Hopper units (python_tests/test_emulator_hopper.py): a
// wgmma tile product from operands the tensor copy engine placed, in every operand layout, with
// the raw accumulator registers returned so the test maps them by CuTe's layout; a tensor copy's
// raw shared-memory bytes; mbarrier phases; and mutations and misuse that must fail.
#include <c10/util/BFloat16.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "device/launch.h"
#include "device/mbarrier.h"
#include "device/tensor_copy.h"
#include "device/tensor_map.h"
#include "device/warpgroup.h"
#include "device/wgmma.h"
#include "grouped_gemm/grouped_gemm_wgmma_launch.h"
#include "grouped_gemm/wgmma_kernels.cuh"

namespace moe_kernels::emu::selftest {
namespace {

using device::LaunchConfig;

void check(cudaError_t err) {
  if (err != cudaSuccess) throw std::runtime_error(cudaGetErrorString(err));
}

enum class Mutation : int {
  kNone,
  kSwizzle,      // the descriptors say 64B swizzle, shared memory holds 128B
  kStride,       // SBO of 512 bytes instead of 1024
  kLeading,      // LBO of 4096 bytes instead of 8192 (MN-major B spans two 64-column blocks)
  kNoWait,       // accumulators read before wgmma.wait_group
  kNoFence,      // wgmma without wgmma.fence
  kWrongParity,  // waits for the phase of parity 1: returns before the copies land
  kNoExpectTx,   // arrives without expecting the copies' bytes
};

constexpr int kTileBytes = 64 * 64 * 2;  // one 64 x 64 box of 16-bit elements
constexpr int kSharedBytes = 3 * kTileBytes + 8 + 1024;

// D (64 x 128) = A (64 x 64) * B (64 x 128) in one warpgroup: A then B by the tensor copy engine
// (A one box, B two of 64 columns or rows), four k16 steps of wgmma m64n128k16. Each thread's 64
// accumulators go to frags[thread][0..64) as they are.
template <typename T, bool kTransA, bool kTransB>
__global__ void wgmma_tile_kernel(const __grid_constant__ device::TensorMap map_a,
                                  const __grid_constant__ device::TensorMap map_b,
                                  Mutation mutation, float* frags) {
  MOE_KERNELS_DYNAMIC_SHARED(unsigned char, raw);
  auto* base = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(raw) + 1023) &
                                                ~uintptr_t{1023});
  unsigned char* a = base;
  unsigned char* b = base + kTileBytes;
  auto* full = reinterpret_cast<uint64_t*>(base + 3 * kTileBytes);
  if (threadIdx.x == 0) {
    device::mbarrier_init(full, 1);
    device::fence_barrier_init();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    if (mutation == Mutation::kNoExpectTx) {
      device::mbarrier_arrive(full);
    } else {
      device::mbarrier_arrive_expect_tx(full, 3 * kTileBytes);
    }
    device::tensor_copy_load<2>(a, map_a, {0, 0}, full);
    // B: K-major, rows n 0-63 then 64-127; MN-major, columns n 0-63 then 64-127.
    device::tensor_copy_load<2>(b, map_b, {0, 0}, full);
    if constexpr (kTransB) {
      device::tensor_copy_load<2>(b + kTileBytes, map_b, {64, 0}, full);
    } else {
      device::tensor_copy_load<2>(b + kTileBytes, map_b, {0, 64}, full);
    }
  }
  device::mbarrier_wait(full, mutation == Mutation::kWrongParity ? 1 : 0);

  const auto layout = mutation == Mutation::kSwizzle ? device::SmemLayout::kSwizzle64B
                                                     : device::SmemLayout::kSwizzle128B;
  const uint32_t stride = mutation == Mutation::kStride ? 512 : 1024;
  const uint32_t leading = mutation == Mutation::kLeading ? 4096 : 8192;
  const uint32_t a_address = device::shared_address(a), b_address = device::shared_address(b);
  float d[64];
  for (float& v : d) v = 0.0f;
  if (mutation != Mutation::kNoFence) device::wgmma_fence();
  for (int kk = 0; kk < 4; ++kk) {
    // K-major: a k16 step is 32 bytes along the swizzled row; MN-major: 16 rows of 128 bytes.
    const uint32_t a_step = kTransA ? kk * 2048 : kk * 32, b_step = kTransB ? kk * 2048 : kk * 32;
    const uint64_t desc_a = device::matrix_descriptor(a_address + a_step, leading, stride, layout);
    const uint64_t desc_b = device::matrix_descriptor(b_address + b_step, leading, stride, layout);
    device::wgmma_m64k16<T, 128, kTransA, kTransB>(d, desc_a, desc_b, true);
  }
  device::wgmma_commit();
  if (mutation != Mutation::kNoWait) device::wgmma_wait<0>();
  for (int v = 0; v < 64; ++v) frags[threadIdx.x * 64 + v] = d[v];
  if (mutation == Mutation::kNoWait) device::wgmma_wait<0>();
}

// A map over a row-major [rows, cols] matrix of 16-bit elements, 64 x 64 boxes.
device::TensorMap matrix_map(const uint16_t* data, uint64_t rows, uint64_t cols) {
  device::TensorMap map;
  const uint64_t dims[2] = {cols, rows};
  const uint64_t strides[1] = {cols * 2};
  const uint32_t box[2] = {64, 64};
  check(device::encode_tensor_map(&map, 2, data, dims, strides, box, true));
  return map;
}

Mutation mutation_of(const std::string& name) {
  return name == "none"           ? Mutation::kNone
         : name == "swizzle"      ? Mutation::kSwizzle
         : name == "stride"       ? Mutation::kStride
         : name == "leading"      ? Mutation::kLeading
         : name == "no_wait"      ? Mutation::kNoWait
         : name == "no_fence"     ? Mutation::kNoFence
         : name == "wrong_parity" ? Mutation::kWrongParity
         : name == "no_expect_tx" ? Mutation::kNoExpectTx
                                  : throw std::invalid_argument("unknown mutation " + name);
}

template <typename T, bool kTransA, bool kTransB>
void launch_wgmma_tile(const uint16_t* a, const uint16_t* b, Mutation mutation, float* frags) {
  // A as stored: [64 M][64 K] (K-major) or [64 K][64 M]; B: [128 N][64 K] or [64 K][128 N].
  const device::TensorMap map_a = matrix_map(a, 64, 64);
  const device::TensorMap map_b = kTransB ? matrix_map(b, 64, 128) : matrix_map(b, 128, 64);
  const LaunchConfig config{dim3(1), dim3(128), kSharedBytes};
  check(device::launch<wgmma_tile_kernel<T, kTransA, kTransB>>(config, nullptr, map_a, map_b,
                                                               mutation, frags));
}

// a, b: the operands as stored in global memory (see launch_wgmma_tile), as 16-bit patterns.
std::vector<float> wgmma_tile(const std::string& dtype, bool trans_a, bool trans_b,
                              std::vector<int16_t> a, std::vector<int16_t> b,
                              const std::string& mutation) {
  if (a.size() != 64 * 64 || b.size() != 64 * 128) {
    throw std::invalid_argument("wgmma_tile: A is 64 x 64, B 64 x 128");
  }
  std::vector<float> frags(128 * 64);
  const auto* a16 = reinterpret_cast<const uint16_t*>(a.data());
  const auto* b16 = reinterpret_cast<const uint16_t*>(b.data());
  const Mutation m = mutation_of(mutation);
  const auto run = [&](auto type) {
    using T = decltype(type);
    if (trans_a && trans_b) launch_wgmma_tile<T, true, true>(a16, b16, m, frags.data());
    if (trans_a && !trans_b) launch_wgmma_tile<T, true, false>(a16, b16, m, frags.data());
    if (!trans_a && trans_b) launch_wgmma_tile<T, false, true>(a16, b16, m, frags.data());
    if (!trans_a && !trans_b) launch_wgmma_tile<T, false, false>(a16, b16, m, frags.data());
  };
  if (dtype == "bf16") {
    run(device::bf16{});
  } else {
    run(device::fp16{});
  }
  return frags;
}

// One tensor copy of the box at `coords` from a [dims[rank-1], ..., dims[0]] tensor holding
// 0, 1, 2, ... into shared memory; returns shared memory's bytes as 16-bit values, unswizzled by
// nothing: what the engine wrote where.
__global__ void tensor_copy_kernel(const __grid_constant__ device::TensorMap map, int rank,
                                   int32_t c0, int32_t c1, int32_t c2, int elements,
                                   uint16_t* out) {
  MOE_KERNELS_DYNAMIC_SHARED(unsigned char, raw);
  auto* full = reinterpret_cast<uint64_t*>(raw + 65536);
  if (threadIdx.x == 0) device::mbarrier_init(full, 1);
  __syncthreads();
  if (threadIdx.x == 0) {
    device::mbarrier_arrive_expect_tx(full, static_cast<uint32_t>(elements * 2));
    if (rank == 2) {
      device::tensor_copy_load<2>(raw, map, {c0, c1}, full);
    } else {
      device::tensor_copy_load<3>(raw, map, {c0, c1, c2}, full);
    }
  }
  device::mbarrier_wait(full, 0);
  if (threadIdx.x == 0) std::memcpy(out, raw, static_cast<size_t>(elements) * 2);
}

std::vector<int> tensor_copy(std::vector<uint64_t> dims, std::vector<uint32_t> box,
                             std::vector<int32_t> coords) {
  const int rank = static_cast<int>(dims.size());
  if (rank < 2 || rank > 3 || box.size() != dims.size() || coords.size() != dims.size()) {
    throw std::invalid_argument("tensor_copy: 2 or 3 dimensions, a box and coordinates of each");
  }
  uint64_t total = 1, elements = 1;
  std::vector<uint64_t> strides;
  for (int i = 0; i < rank; ++i) {
    if (i > 0) strides.push_back(total * 2);
    total *= dims[i];
    elements *= box[i];
  }
  std::vector<uint16_t> tensor(total);
  for (uint64_t i = 0; i < total; ++i) tensor[i] = static_cast<uint16_t>(i + 1);  // 0: filled
  device::TensorMap map;
  check(device::encode_tensor_map(&map, rank, tensor.data(), dims.data(), strides.data(),
                                  box.data(), true));
  std::vector<uint16_t> out(elements);
  const LaunchConfig config{dim3(1), dim3(32), 65536 + 8};
  check(device::allow_dynamic_shared<tensor_copy_kernel>(65536 + 8));
  check(device::launch<tensor_copy_kernel>(config, nullptr, map, rank, coords[0], coords[1],
                                           rank == 3 ? coords[2] : 0, static_cast<int>(elements),
                                           out.data()));
  return std::vector<int>(out.begin(), out.end());
}

// mbarrier phases: warp 1 waits for each of three phases in turn, by parity, and records what
// warp 0 has written by then; warp 0 arrives `arrivals` times per phase (from that many lanes)
// after writing the phase's value. A wait for the phase after them never completes: a deadlock.
__global__ void mbarrier_phases_kernel(int arrivals, bool overwait, int* seen) {
  MOE_KERNELS_DYNAMIC_SHARED(unsigned char, raw);
  auto* produced = reinterpret_cast<uint64_t*>(raw);
  auto* consumed = reinterpret_cast<uint64_t*>(raw + 8);
  auto* value = reinterpret_cast<int*>(raw + 16);
  if (threadIdx.x == 0) {
    device::mbarrier_init(produced, static_cast<uint32_t>(arrivals));
    device::mbarrier_init(consumed, 1);
  }
  __syncthreads();
  const int lane = static_cast<int>(threadIdx.x) % 32;
  if (threadIdx.x < 32) {
    for (int phase = 0; phase < 3; ++phase) {
      if (lane == 0) *value = 10 * (phase + 1);
      __syncwarp();
      if (lane < arrivals) device::mbarrier_arrive(produced);
      // The next write waits until the consumer has read this phase's value.
      device::mbarrier_wait(consumed, static_cast<uint32_t>(phase % 2));
    }
  } else if (threadIdx.x == 32) {
    for (int phase = 0; phase < 3 + (overwait ? 1 : 0); ++phase) {
      device::mbarrier_wait(produced, static_cast<uint32_t>(phase % 2));
      seen[phase] = *value;
      device::mbarrier_arrive(consumed);
    }
  }
}

std::vector<int> mbarrier_phases(int arrivals, bool overwait) {
  std::vector<int> seen(4, -1);
  const LaunchConfig config{dim3(1), dim3(64), 64};
  check(device::launch<mbarrier_phases_kernel>(config, nullptr, arrivals, overwait, seen.data()));
  return seen;
}

// Broken uses of the Hopper units, each of which must be an error naming the kernel.
__global__ void hopper_misuse_kernel(int misuse) {
  MOE_KERNELS_DYNAMIC_SHARED(unsigned char, raw);
  auto* bar = reinterpret_cast<uint64_t*>(raw);
  switch (misuse) {
    case 1:  // never initialised
      device::mbarrier_arrive(bar);
      break;
    case 2:  // a parity that is not 0 or 1
      if (threadIdx.x == 0) {
        device::mbarrier_init(bar, 1);
        device::mbarrier_wait(bar, 2);
      }
      break;
    case 3:  // setmaxnreg outside its range
      emu::setmaxnreg(300, true);
      break;
    case 4: {  // a wgmma group never waited for
      float d[16] = {};
      device::wgmma_fence();
      device::wgmma_m64k16<device::bf16, 32, false, false>(
          d, device::matrix_descriptor(1024, 16, 1024, device::SmemLayout::kSwizzle128B),
          device::matrix_descriptor(1024, 16, 1024, device::SmemLayout::kSwizzle128B), false);
      device::wgmma_commit();
      break;
    }
    case 5:  // elect in every lane: exactly one is elected
      if (__popc(__ballot_sync(0xffffffffu, device::elect_one())) != 1) emu::fail("elect");
      break;
    default:
      break;
  }
}

void hopper_misuse(int misuse, int threads) {
  constexpr int kBytes = 16 * 1024;
  check(device::allow_dynamic_shared<hopper_misuse_kernel>(kBytes));
  check(device::launch<hopper_misuse_kernel>(LaunchConfig{dim3(1), dim3(threads), kBytes}, nullptr,
                                             misuse));
}

// The grouped GEMM's forward (c = a_e @ b[e]^T, bf16) on the wgmma kernel built with a mutation:
// the tests expect each to compute a wrong product under one schedule or another.
std::vector<float> wgmma_gemm_mutant(const std::string& mutation, std::vector<int16_t> a,
                                     std::vector<int16_t> b, std::vector<int64_t> sizes, int64_t k,
                                     int64_t n) {
  using gemm::emulated::WgmmaMutation;
  gemm::GroupedGemmProblem p;
  p.m = 0;
  for (int64_t rows : sizes) p.m += rows;
  p.k = k;
  p.n = n;
  p.num_experts = static_cast<int64_t>(sizes.size());
  if (static_cast<int64_t>(a.size()) != p.m * k ||
      static_cast<int64_t>(b.size()) != p.num_experts * n * k) {
    throw std::invalid_argument("wgmma_gemm_mutant: a is [sum(sizes), k], b [E, n, k]");
  }
  std::vector<uint16_t> c(static_cast<size_t>(p.m * n));
  std::vector<int64_t> workspace(2 * (sizes.size() + 1));
  p.lhs = {a.data(), k, 0, true};
  p.rhs = {b.data(), k, n * k, true};
  p.out = {c.data(), n, 0};
  p.tokens_per_expert = sizes.data();
  p.workspace = workspace.data();
  const auto run = [&](auto mutant) {
    check(gemm::emulated::launch_wgmma_gemm<device::bf16, decltype(mutant)::value>(p, nullptr));
  };
  if (mutation == "wrong_swizzle") {
    run(std::integral_constant<WgmmaMutation, WgmmaMutation::kWrongSwizzle>{});
  } else if (mutation == "no_wait") {
    run(std::integral_constant<WgmmaMutation, WgmmaMutation::kNoWait>{});
  } else if (mutation == "wrong_parity") {
    run(std::integral_constant<WgmmaMutation, WgmmaMutation::kWrongParity>{});
  } else if (mutation == "none") {
    run(std::integral_constant<WgmmaMutation, WgmmaMutation::kNone>{});
  } else {
    throw std::invalid_argument("unknown mutation " + mutation);
  }
  std::vector<float> out(c.size());
  for (size_t i = 0; i < c.size(); ++i) {
    out[i] = static_cast<float>(c10::BFloat16(c[i], c10::BFloat16::from_bits()));
  }
  return out;
}

}  // namespace

void bind_hopper(pybind11::module_& m) {
  m.def("wgmma_gemm_mutant", &wgmma_gemm_mutant);
  m.def("wgmma_tile", &wgmma_tile);
  m.def("tensor_copy", &tensor_copy);
  m.def("mbarrier_phases", &mbarrier_phases);
  m.def("hopper_misuse", &hopper_misuse);
}

}  // namespace moe_kernels::emu::selftest
