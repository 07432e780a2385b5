// The grouped GEMM on Hopper (sm_90a): wgmma fed by the tensor copy engine, warp-specialised and
// persistent, for bf16 and fp16 with fp32 accumulators. Each block walks the device-side tile
// schedule (tile_schedule.cuh) with three warpgroups:
//   - the producer (warpgroup 0; its first warp works, the others leave): for every K-slice of
//     every tile it waits until a stage of the shared-memory ring is free (`empty`), then has
//     the tensor copy engine load the slice's A and B into it, which completes the stage's `full`
//     mbarrier by their byte count;
//   - two consumers (warpgroups 1 and 2), each owning 64 of the tile's 128 rows: they wait for a
//     stage to be full, issue four wgmma m64n128k16 on it, and release the stage they used
//     before once the wgmma that read it has completed (one group stays in flight); then the
//     epilogue writes their accumulators, optionally through SwiGLU.
// Operands land as 64 x 64 boxes of 128-byte lines with the 128B swizzle: a K-major operand's
// lines are its rows (M or N) and a k16 step moves the descriptor 32 bytes along them; an
// MN-major operand's lines are K, 64 MN-elements wide, and a k16 step moves 16 lines.
//
// Ragged experts: a tile of rows (forward, dgrad) reads whole boxes, so rows past its expert's
// segment come from the next expert; each output row depends only on its own A row and those
// rows are never stored. A reduction over rows (wgrad) must not sum the next expert's rows: the
// last, partial K-slice of an expert is loaded by the producer warp with cp.async instead,
// zero-filled past the segment, in the same swizzled layout. Everything past the matrices'
// ends reads as zeros (the tensor maps' bounds).
// Torch-free: compiled by nvcc for sm_90a, and by the CPU emulator.
#pragma once

#include <cstdint>

#include "device/async_copy.h"
#include "device/mbarrier.h"
#include "device/runtime.h"
#include "device/tensor_copy.h"
#include "device/tensor_map.h"
#include "device/types.h"
#include "device/warp.h"
#include "device/warpgroup.h"
#include "device/wgmma.h"
#include "grouped_gemm/grouped_gemm_problem.h"
#include "grouped_gemm/tile_io.cuh"
#include "grouped_gemm/tile_schedule.cuh"

namespace moe_kernels::gemm::MOE_KERNELS_TARGET {

// Bugs the kernel can be built with, for the tests that prove the emulator finds them:
// descriptors with the wrong swizzle, a stage released before the wgmma reading it has
// completed, a full stage waited for with the wrong phase parity.
enum class WgmmaMutation : int { kNone, kWrongSwizzle, kNoWait, kWrongParity };

struct WgmmaTile {
  static constexpr int kM = 128, kN = 128, kK = 64, kStages = 4;
  static constexpr int kConsumers = 2;  // warpgroups, 64 rows each
  static constexpr int kThreads = (1 + kConsumers) * device::kWarpgroupThreads;
  static constexpr int kBoxBytes = 64 * 64 * 2;        // one 64 x 64 box of 16-bit elements
  static constexpr int kOperandBytes = 2 * kBoxBytes;  // 128 lines (K-major) or 2 blocks
  static constexpr int kStageBytes = 2 * kOperandBytes;
  // The ring, its 2 * kStages mbarriers, and room to align the ring to the swizzle's 1024 bytes.
  static constexpr int kSharedBytes = kStages * kStageBytes + 2 * kStages * 8 + 1024;
};

// The operands' tensor maps (device/tensor_map.h), 64 x 64 boxes with the 128B swizzle:
//   kRows: lhs [M, K] (K-major); rhs the weights [E, N, K] (K-major) or [E, K, N], one matrix
//          per expert in a 3D map so each ends at its own last row;
//   kReduction: lhs [rows, M] and rhs [rows, N] (both MN-major, rows the reduction).
struct WgmmaMaps {
  device::TensorMap lhs;
  device::TensorMap rhs;
};

// A K-slice into one operand's half of a stage through the tensor copy engine: two boxes at
// (lines, k) = (line0, k0) and (line0 + 64, k0) of a K-major operand, or (k0, mn0) and
// (k0, mn0 + 64) of an MN-major one; `extra` is the 3D map's expert coordinate (-1: a 2D map).
template <bool kKMajor>
__device__ __forceinline__ void load_operand(unsigned char* dst, const device::TensorMap& map,
                                             int32_t line0, int32_t line1, int32_t k0,
                                             int32_t extra, uint64_t* full) {
  const int32_t lines[2] = {line0, line1};
  for (int box = 0; box < 2; ++box) {
    unsigned char* to = dst + box * WgmmaTile::kBoxBytes;
    const int32_t inner = kKMajor ? k0 : lines[box], outer = kKMajor ? lines[box] : k0;
    if (extra < 0) {
      device::tensor_copy_load<2>(to, map, {inner, outer}, full);
    } else {
      device::tensor_copy_load<3>(to, map, {inner, outer, extra}, full);
    }
  }
}

// The partial last K-slice of a reduction over an expert's rows: `rows` K-lines of two 64-wide
// MN blocks starting at src (line k at src + k * ld), zeros past them and past `cols`, placed as
// the tensor copy engine places a box (chunk c of line k at chunk c ^ (k % 8)). The producer
// warp's 32 lanes copy, then wait for their copies.
template <typename T>
__device__ __forceinline__ void load_reduction_tail(unsigned char* dst, const T* src, int64_t ld,
                                                    int64_t rows, int64_t cols) {
  const int lane = device::lane_id();
  constexpr int kChunks = 2 * 64 * 8;  // 2 blocks x 64 lines x 8 chunks of 16 bytes
  for (int i = lane; i < kChunks; i += device::kWarpSize) {
    const int block = i / 512, line = i / 8 % 64, chunk = i % 8;
    const int64_t col = block * 64 + chunk * 8;
    const bool valid = line < rows && col < cols;
    unsigned char* to =
        dst + block * WgmmaTile::kBoxBytes + line * 128 + ((chunk ^ (line % 8)) * 16);
    device::cp_async<16>(to, valid ? src + line * ld + col : src, valid ? 16 : 0);
  }
  device::cp_async_commit();
  device::cp_async_wait<0>();
}

template <typename T, Grouping kGrouping, bool kRhsKMajor, bool kSwiglu>
__device__ __forceinline__ void produce(const GroupedGemmProblem& p, const TileSchedule& schedule,
                                        const WgmmaMaps& maps, unsigned char* ring, uint64_t* full,
                                        uint64_t* empty) {
  constexpr bool kRows = kGrouping == Grouping::kRows;
  const bool leader = device::elect_one();
  int64_t slice = 0;  // K-slices loaded so far, over all tiles: stage slice % kStages
  for (int64_t tile = blockIdx.x; tile < schedule.num_tiles(); tile += gridDim.x) {
    const TileWork w = schedule.at(tile);
    const int64_t k_extent = kRows ? p.k : w.segment_rows;
    for (int64_t k0 = 0; k0 < k_extent; k0 += WgmmaTile::kK, ++slice) {
      const int stage = static_cast<int>(slice % WgmmaTile::kStages);
      const auto round = static_cast<uint32_t>(slice / WgmmaTile::kStages);
      device::mbarrier_wait(&empty[stage], (round & 1) ^ 1);
      unsigned char* a = ring + stage * WgmmaTile::kStageBytes;
      unsigned char* b = a + WgmmaTile::kOperandBytes;
      if constexpr (!kRows) {
        if (k0 + WgmmaTile::kK > k_extent) {
          const int64_t row = w.segment_start + k0, rows = k_extent - k0;
          load_reduction_tail(a, static_cast<const T*>(p.lhs.data) + row * p.lhs.ld + w.m0,
                              p.lhs.ld, rows, p.m - w.m0);
          load_reduction_tail(b, static_cast<const T*>(p.rhs.data) + row * p.rhs.ld + w.n0,
                              p.rhs.ld, rows, p.n - w.n0);
          // The wgmma reads through the asynchronous proxy what these threads wrote.
          device::fence_proxy_async_shared();
          __syncwarp();
          if (leader) device::mbarrier_arrive(&full[stage]);
          continue;
        }
      }
      if (!leader) continue;
      device::mbarrier_arrive_expect_tx(&full[stage], WgmmaTile::kStageBytes);
      const auto k = static_cast<int32_t>(k0);
      if constexpr (kRows) {
        const auto row = static_cast<int32_t>(w.segment_start + w.m0);
        const auto e = static_cast<int32_t>(w.expert);
        // SwiGLU: the tile's 64 output columns, gate rows then up rows (`half` further).
        const auto n0 = static_cast<int32_t>(w.n0);
        const int32_t n1 = kSwiglu ? static_cast<int32_t>(p.swiglu_half + w.n0) : n0 + 64;
        load_operand<true>(a, maps.lhs, row, row + 64, k, -1, &full[stage]);
        load_operand<kRhsKMajor>(b, maps.rhs, n0, n1, k, e, &full[stage]);
      } else {
        const auto row = static_cast<int32_t>(w.segment_start + k0);
        const auto m0 = static_cast<int32_t>(w.m0), n0 = static_cast<int32_t>(w.n0);
        load_operand<false>(a, maps.lhs, m0, m0 + 64, row, -1, &full[stage]);
        load_operand<false>(b, maps.rhs, n0, n0 + 64, row, -1, &full[stage]);
      }
    }
  }
}

template <typename T, Grouping kGrouping, bool kRhsKMajor, bool kSwiglu, WgmmaMutation kMutation>
__device__ __forceinline__ void consume(const GroupedGemmProblem& p, const TileSchedule& schedule,
                                        unsigned char* ring, uint64_t* full, uint64_t* empty,
                                        int consumer) {
  constexpr bool kRows = kGrouping == Grouping::kRows;
  constexpr bool kLhsKMajor = kRows;
  const int thread = static_cast<int>(threadIdx.x) % device::kWarpgroupThreads;
  const int warp = thread / device::kWarpSize, lane = device::lane_id();
  constexpr auto kLayout = kMutation == WgmmaMutation::kWrongSwizzle
                               ? device::SmemLayout::kSwizzle64B
                               : device::SmemLayout::kSwizzle128B;
  constexpr uint32_t kParityFlip = kMutation == WgmmaMutation::kWrongParity ? 1 : 0;
  int64_t slice = 0;
  for (int64_t tile = blockIdx.x; tile < schedule.num_tiles(); tile += gridDim.x) {
    const TileWork w = schedule.at(tile);
    const int64_t k_extent = kRows ? p.k : w.segment_rows;
    float acc[WgmmaTile::kN / 2];
#pragma unroll
    for (float& v : acc) v = 0.0f;
    int previous = -1;  // the stage the wgmma group still in flight reads
    for (int64_t k0 = 0; k0 < k_extent; k0 += WgmmaTile::kK, ++slice) {
      const int stage = static_cast<int>(slice % WgmmaTile::kStages);
      device::mbarrier_wait(&full[stage],
                            (static_cast<uint32_t>(slice / WgmmaTile::kStages) & 1) ^ kParityFlip);
      const uint32_t a = device::shared_address(ring + stage * WgmmaTile::kStageBytes);
      const uint32_t b = a + WgmmaTile::kOperandBytes;
      // This consumer's 64 rows: the second 64 lines (K-major) or the second block (MN-major).
      const uint32_t a_rows = a + consumer * WgmmaTile::kBoxBytes;
      device::fence_accumulators(acc);
      device::wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < WgmmaTile::kK / 16; ++kk) {
        const uint32_t a_step = kLhsKMajor ? kk * 32 : kk * 16 * 128;
        const uint32_t b_step = kRhsKMajor ? kk * 32 : kk * 16 * 128;
        // SBO: 8 lines of 128 bytes; LBO: the next 64-wide MN block (MN-major B spans two).
        device::wgmma_m64k16<T, WgmmaTile::kN, !kLhsKMajor, !kRhsKMajor>(
            acc, device::matrix_descriptor(a_rows + a_step, WgmmaTile::kBoxBytes, 1024, kLayout),
            device::matrix_descriptor(b + b_step, WgmmaTile::kBoxBytes, 1024, kLayout), true);
      }
      device::wgmma_commit();
      if constexpr (kMutation == WgmmaMutation::kNoWait) {
        device::mbarrier_arrive(&empty[stage]);
        continue;
      }
      device::wgmma_wait<1>();
      device::fence_accumulators(acc);
      if (previous >= 0) device::mbarrier_arrive(&empty[previous]);
      previous = stage;
    }
    device::wgmma_wait<0>();
    device::fence_accumulators(acc);
    if (previous >= 0) device::mbarrier_arrive(&empty[previous]);

    const int64_t m_extent = kRows ? w.segment_rows : p.m;
    const TileOutput<T> out = tile_output<T, kGrouping, kSwiglu>(p, w, m_extent);
    const int row0 = consumer * 64 + warp * 16 + lane / 4;
#pragma unroll
    for (int i = 0; i < WgmmaTile::kN / 8; ++i) {
      const int c = 8 * i + 2 * (lane % 4);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float* v = &acc[4 * i + 2 * h];
        if constexpr (kSwiglu) {
          // Gate columns 0-63 of the tile, up columns 64-127: the same thread holds both.
          if (i < WgmmaTile::kN / 16) {
            const float* up = &acc[4 * (i + WgmmaTile::kN / 16) + 2 * h];
            out.store_swiglu_at(row0 + 8 * h, c, v[0], v[1], up[0], up[1]);
          }
        } else {
          out.store(row0 + 8 * h, c, v[0], v[1]);
        }
      }
    }
  }
}

template <typename T, Grouping kGrouping, bool kRhsKMajor, bool kSwiglu,
          WgmmaMutation kMutation = WgmmaMutation::kNone>
__global__ void __launch_bounds__(WgmmaTile::kThreads, 1)
    wgmma_gemm_kernel(GroupedGemmProblem p, TileSchedule schedule,
                      const __grid_constant__ WgmmaMaps maps) {
#if defined(__CUDA_ARCH__) && !defined(MOE_KERNELS_SM90A)
  __trap();  // built for a GPU without wgmma: the launcher never runs it there
#else
  MOE_KERNELS_DYNAMIC_SHARED(unsigned char, raw);
  auto* ring = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(raw) + 1023) &
                                                ~uintptr_t{1023});
  auto* full = reinterpret_cast<uint64_t*>(ring + WgmmaTile::kStages * WgmmaTile::kStageBytes);
  uint64_t* empty = full + WgmmaTile::kStages;
  if (threadIdx.x == 0) {
    for (int s = 0; s < WgmmaTile::kStages; ++s) {
      device::mbarrier_init(&full[s], 1);
      device::mbarrier_init(&empty[s], WgmmaTile::kConsumers * device::kWarpgroupThreads);
    }
    device::fence_barrier_init();
  }
  __syncthreads();
  const int warpgroup = static_cast<int>(threadIdx.x) / device::kWarpgroupThreads;
  if (warpgroup == 0) {
    device::setmaxnreg<40, false>();
    if (device::warp_id() == 0)
      produce<T, kGrouping, kRhsKMajor, kSwiglu>(p, schedule, maps, ring, full, empty);
  } else {
    device::setmaxnreg<232, true>();
    consume<T, kGrouping, kRhsKMajor, kSwiglu, kMutation>(p, schedule, ring, full, empty,
                                                          warpgroup - 1);
  }
#endif
}

}  // namespace moe_kernels::gemm::MOE_KERNELS_TARGET
