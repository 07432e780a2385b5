// Kernels that prove the emulator's mma.sync and ldmatrix
// (python_tests/test_emulator_tensor_core.py): fragments built by hand from the PTX ISA manual's
// layouts, a tile product through shared memory the way a GEMM kernel does it, kernels with a
// fragment-index bug, misuse, and the cost of each.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "device/async_copy.h"
#include "device/launch.h"
#include "device/tensor_core.h"
#include "device/warp.h"

namespace moe_kernels::emu::selftest {
namespace {

using device::LaunchConfig;

void check(cudaError_t err) {
  if (err != cudaSuccess) throw std::runtime_error(cudaGetErrorString(err));
}

// Two 16-bit elements in one register, the lower-indexed one in the low half.
__device__ __forceinline__ uint32_t pack(uint16_t low, uint16_t high) {
  return uint32_t{low} | uint32_t{high} << 16;
}

// One warp: A (16x16 row-major), B (16x8, K x N row-major) and C (16x8) read from global memory
// straight into fragments, D = A * B + C stored by the C layout. kSwapA12 swaps a[1] and a[2], a
// fragment-index bug the emulator must expose.
template <typename T, bool kSwapA12>
__global__ void mma_fragments_kernel(const uint16_t* a, const uint16_t* b, const float* c,
                                     float* d) {
  const int lane = device::lane_id(), g = lane / 4, t = lane % 4;
  uint32_t af[4] = {pack(a[g * 16 + 2 * t], a[g * 16 + 2 * t + 1]),
                    pack(a[(g + 8) * 16 + 2 * t], a[(g + 8) * 16 + 2 * t + 1]),
                    pack(a[g * 16 + 2 * t + 8], a[g * 16 + 2 * t + 9]),
                    pack(a[(g + 8) * 16 + 2 * t + 8], a[(g + 8) * 16 + 2 * t + 9])};
  if (kSwapA12) std::swap(af[1], af[2]);
  const uint32_t bf[2] = {pack(b[2 * t * 8 + g], b[(2 * t + 1) * 8 + g]),
                          pack(b[(2 * t + 8) * 8 + g], b[(2 * t + 9) * 8 + g])};
  const float cf[4] = {c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1], c[(g + 8) * 8 + 2 * t],
                       c[(g + 8) * 8 + 2 * t + 1]};
  float df[4];
  device::mma_m16n8k16<T>(df, af, bf, cf);
  d[g * 8 + 2 * t] = df[0];
  d[g * 8 + 2 * t + 1] = df[1];
  d[(g + 8) * 8 + 2 * t] = df[2];
  d[(g + 8) * 8 + 2 * t + 1] = df[3];
}

template <typename T>
void launch_mma_fragments(bool swap_a12, const uint16_t* a, const uint16_t* b, const float* c,
                          float* d) {
  const LaunchConfig config{dim3(1), dim3(32)};
  check(swap_a12 ? device::launch<mma_fragments_kernel<T, true>>(config, nullptr, a, b, c, d)
                 : device::launch<mma_fragments_kernel<T, false>>(config, nullptr, a, b, c, d));
}

std::vector<float> mma_fragments(const std::string& dtype, std::vector<int16_t> a,
                                 std::vector<int16_t> b, std::vector<float> c, bool swap_a12) {
  if (a.size() != 256 || b.size() != 128 || c.size() != 128) {
    throw std::invalid_argument("mma_fragments: A is 16x16, B 16x8, C 16x8");
  }
  std::vector<float> d(128);
  const auto* a16 = reinterpret_cast<const uint16_t*>(a.data());
  const auto* b16 = reinterpret_cast<const uint16_t*>(b.data());
  if (dtype == "bf16") {
    launch_mma_fragments<device::bf16>(swap_a12, a16, b16, c.data(), d.data());
  } else {
    launch_mma_fragments<device::fp16>(swap_a12, a16, b16, c.data(), d.data());
  }
  return d;
}

// Copies `bytes` from global to shared memory, 16 bytes per cp.async, spread over the warp.
__device__ __forceinline__ void copy_tile(void* dst, const void* src, int bytes) {
  for (int offset = 16 * device::lane_id(); offset < bytes; offset += 16 * device::kWarpSize) {
    device::cp_async<16>(static_cast<char*>(dst) + offset, static_cast<const char*>(src) + offset,
                         16);
  }
}

// One warp, D (16x8) = A (16x32, row-major) * B (32x8) as a GEMM's inner loop computes it: both
// tiles through cp.async into shared memory, fragments by ldmatrix, two k16 steps of mma. B is
// stored [K][N] (kBTransposed false: each 8x8 tile must be transposed on its way into b) or
// [N][K]; kTrans picks ldmatrix .trans for B, which is right only for [K][N].
template <typename T, bool kBTransposed, bool kTrans>
__global__ void tile_product_kernel(const uint16_t* a, const uint16_t* b, float* d) {
  MOE_KERNELS_DYNAMIC_SHARED(uint16_t, shared);
  uint16_t* a_tile = shared;        // [16][32]
  uint16_t* b_tile = shared + 512;  // [32][8] or [8][32]
  copy_tile(a_tile, a, 16 * 32 * 2);
  copy_tile(b_tile, b, 32 * 8 * 2);
  device::cp_async_commit();
  device::cp_async_wait<0>();
  __syncthreads();

  const int lane = device::lane_id(), tile = lane / 8, row = lane % 8;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int k0 = 0; k0 < 32; k0 += 16) {
    // A's tiles in a[0..3] order: rows 0-7 and 8-15 of columns k0..k0+7, then of k0+8..k0+15.
    uint32_t af[4];
    device::ldmatrix<4, false>(af, a_tile + (row + 8 * (tile % 2)) * 32 + k0 + 8 * (tile / 2));
    // B's tiles: k0..k0+7, then k0+8..k0+15 (lanes 16-31 repeat lanes 0-15's addresses).
    const int k_tile = tile % 2;
    const uint16_t* b_row =
        kBTransposed ? b_tile + row * 32 + k0 + 8 * k_tile : b_tile + (k0 + 8 * k_tile + row) * 8;
    uint32_t bf[2];
    device::ldmatrix<2, kTrans>(bf, b_row);
    device::mma_m16n8k16<T>(acc, af, bf, acc);
  }
  const int g = lane / 4, t = lane % 4;
  d[g * 8 + 2 * t] = acc[0];
  d[g * 8 + 2 * t + 1] = acc[1];
  d[(g + 8) * 8 + 2 * t] = acc[2];
  d[(g + 8) * 8 + 2 * t + 1] = acc[3];
}

template <typename T, bool kBTransposed>
void launch_tile_product(bool trans, const uint16_t* a, const uint16_t* b, float* d) {
  const LaunchConfig config{dim3(1), dim3(32), (512 + 256) * 2};
  check(trans ? device::launch<tile_product_kernel<T, kBTransposed, true>>(config, nullptr, a, b, d)
              : device::launch<tile_product_kernel<T, kBTransposed, false>>(config, nullptr, a, b,
                                                                            d));
}

std::vector<float> tile_product(const std::string& dtype, const std::string& b_layout, bool trans,
                                std::vector<int16_t> a, std::vector<int16_t> b) {
  if (a.size() != 512 || b.size() != 256) {
    throw std::invalid_argument("tile_product: A is 16x32, B 32x8");
  }
  std::vector<float> d(128);
  const auto* a16 = reinterpret_cast<const uint16_t*>(a.data());
  const auto* b16 = reinterpret_cast<const uint16_t*>(b.data());
  const bool bf16 = dtype == "bf16", nk = b_layout == "nk";
  if (bf16 && nk) launch_tile_product<device::bf16, true>(trans, a16, b16, d.data());
  if (bf16 && !nk) launch_tile_product<device::bf16, false>(trans, a16, b16, d.data());
  if (!bf16 && nk) launch_tile_product<device::fp16, true>(trans, a16, b16, d.data());
  if (!bf16 && !nk) launch_tile_product<device::fp16, false>(trans, a16, b16, d.data());
  return d;
}

// A row of an 8x8 tile of 16-bit elements: ldmatrix's unit, and its alignment.
struct alignas(16) TileRow {
  uint16_t element[8];
};

// ldmatrix straight from a static shared array of 32 rows, row j holding 8j..8j+7: lane l gives
// the address of row order[l]; lanes past the tiles' rows give a misaligned address, which
// ldmatrix ignores. Every lane's registers come back, kTiles per lane.
template <int kTiles, bool kTrans>
__global__ void ldmatrix_layout_kernel(const int* order, uint32_t* out) {
  MOE_KERNELS_SHARED(TileRow, rows, [32]);
  const int lane = device::lane_id();
  for (int e = 0; e < 8; ++e) rows[lane].element[e] = static_cast<uint16_t>(lane * 8 + e);
  __syncwarp();
  const char* row = lane < 8 * kTiles ? reinterpret_cast<const char*>(&rows[order[lane]])
                                      : reinterpret_cast<const char*>(rows) + 2;
  uint32_t r[kTiles];
  device::ldmatrix<kTiles, kTrans>(r, row);
  for (int i = 0; i < kTiles; ++i) out[lane * kTiles + i] = r[i];
}

template <int kTiles>
void launch_ldmatrix_layout(bool trans, const int* order, uint32_t* out) {
  const LaunchConfig config{dim3(1), dim3(32)};
  check(trans ? device::launch<ldmatrix_layout_kernel<kTiles, true>>(config, nullptr, order, out)
              : device::launch<ldmatrix_layout_kernel<kTiles, false>>(config, nullptr, order, out));
}

std::vector<uint32_t> ldmatrix_layout(int tiles, bool trans, std::vector<int> order) {
  if (order.size() != 32) throw std::invalid_argument("ldmatrix_layout: one row per lane");
  std::vector<uint32_t> out(32 * tiles);
  if (tiles == 1) launch_ldmatrix_layout<1>(trans, order.data(), out.data());
  if (tiles == 2) launch_ldmatrix_layout<2>(trans, order.data(), out.data());
  if (tiles == 4) launch_ldmatrix_layout<4>(trans, order.data(), out.data());
  return out;
}

// Broken uses of the tensor-core collectives, each of which must be an error naming the kernel.
// kNone is the control: a correct ldmatrix (which a partial warp still may not run).
enum class Misuse : int { kNone, kMisaligned, kNotShared, kLdmatrixLaneExits, kMmaLaneExits };

__global__ void tensor_core_misuse_kernel(Misuse misuse, const uint16_t* global) {
  MOE_KERNELS_SHARED(TileRow, rows, [8]);
  const int lane = device::lane_id();
  const bool exits = misuse == Misuse::kLdmatrixLaneExits || misuse == Misuse::kMmaLaneExits;
  if (exits && lane == 7) return;
  if (misuse == Misuse::kMmaLaneExits) {
    const uint32_t a[4] = {}, b[2] = {};
    float d[4] = {};
    device::mma_m16n8k16<device::bf16>(d, a, b, d);
    return;
  }
  const void* row = &rows[lane % 8];
  if (misuse == Misuse::kMisaligned && lane == 3) row = &rows[3].element[4];
  if (misuse == Misuse::kNotShared && lane == 5) row = global;
  uint32_t r[1];
  device::ldmatrix<1, false>(r, row);
}

void tensor_core_misuse(const std::string& misuse, unsigned threads) {
  const Misuse kind = misuse == "none"             ? Misuse::kNone
                      : misuse == "misaligned"     ? Misuse::kMisaligned
                      : misuse == "not_shared"     ? Misuse::kNotShared
                      : misuse == "ldmatrix_exits" ? Misuse::kLdmatrixLaneExits
                      : misuse == "mma_exits"      ? Misuse::kMmaLaneExits
                                                   : throw std::invalid_argument(misuse);
  alignas(16) const uint16_t global[8] = {};
  check(device::launch<tensor_core_misuse_kernel>(LaunchConfig{dim3(1), dim3(threads)}, nullptr,
                                                  kind, global));
}

// `iterations` of one instruction by one warp, to time it.
template <bool kMma>
__global__ void tensor_core_loop_kernel(int iterations) {
  MOE_KERNELS_SHARED(TileRow, rows, [32]);
  const int lane = device::lane_id();
  const uint32_t a[4] = {}, b[2] = {};
  float d[4] = {};
  uint32_t r[4];
  for (int i = 0; i < iterations; ++i) {
    if (kMma) {
      device::mma_m16n8k16<device::bf16>(d, a, b, d);
    } else {
      device::ldmatrix<4, false>(r, &rows[lane]);
    }
  }
}

template <bool kMma>
double seconds(int iterations) {
  const auto start = std::chrono::steady_clock::now();
  check(device::launch<tensor_core_loop_kernel<kMma>>(LaunchConfig{dim3(1), dim3(32)}, nullptr,
                                                      iterations));
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Microseconds per warp-wide mma.sync and per ldmatrix.x4, launch cost subtracted.
std::vector<double> tensor_core_cost(int iterations) {
  const double mma = seconds<true>(iterations) - seconds<true>(0);
  const double ldmatrix = seconds<false>(iterations) - seconds<false>(0);
  return {mma * 1e6 / iterations, ldmatrix * 1e6 / iterations};
}

}  // namespace

void bind_tensor_core(pybind11::module_& m) {
  m.def("mma_fragments", &mma_fragments);
  m.def("tile_product", &tile_product);
  m.def("ldmatrix_layout", &ldmatrix_layout);
  m.def("tensor_core_misuse", &tensor_core_misuse);
  m.def("tensor_core_cost", &tensor_core_cost);
}

}  // namespace moe_kernels::emu::selftest
