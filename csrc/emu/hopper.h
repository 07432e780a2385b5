// The CPU emulator's Hopper units, behind device/mbarrier.h, device/tensor_copy.h and
// device/wgmma.h (which document what kernels see): mbarriers with arrival and transaction counts,
// the tensor copy engine (cp.async.bulk.tensor through a tensor map), and wgmma.mma_async with
// its fence / commit / wait. Their state lives per block, in the running launch.
//
// Asynchrony is modelled as cp.async's is: under schedule "forward" a tensor copy lands and a
// wgmma computes at its issue; under "reverse" and "random" as late as the program allows (a
// tensor copy when a thread waits on its mbarrier, a wgmma at the wait_group that covers it,
// its accumulators reading NaN until then, its shared-memory operands read only then). So a
// kernel that reads a stage before its mbarrier completes, reuses a stage a wgmma still reads, or
// reads accumulators before the wait, computes garbage under one schedule or the other.
#pragma once

#include <cstdint>
#include <string>

namespace moe_kernels::emu {

// ---- mbarrier (shared-memory addresses, as the PTX instructions take them)
void mbarrier_init(uint32_t barrier, uint32_t arrivals);
// arrive, with `tx_bytes` more expected first (arrive.expect_tx) when non-zero.
void mbarrier_arrive(uint32_t barrier, uint32_t tx_bytes);
void mbarrier_expect_tx(uint32_t barrier, uint32_t tx_bytes);
// Whether the phase of parity `parity` has completed (mbarrier.try_wait.parity). Before saying
// no, it lands the tensor copies still in flight to this barrier.
bool mbarrier_try_wait_parity(uint32_t barrier, uint32_t parity);

// ---- the tensor copy engine
enum class TensorSwizzle : int { kNone = 0, k32B = 1, k64B = 2, k128B = 3 };

// What cuTensorMapEncodeTiled encodes, for tiled loads of 16-bit elements: dims[0] is the
// innermost; strides (in bytes) of dims 1..rank-1; a box of box[i] elements per dimension.
struct TensorMap {
  uint32_t magic;  // kTensorMapMagic once encoded
  int rank;
  int element_bytes;
  const void* base;
  uint64_t dims[5];
  uint64_t strides[5];  // strides[0] = element_bytes
  uint32_t box[5];
  TensorSwizzle swizzle;
};
constexpr uint32_t kTensorMapMagic = 0x7e45a0d1u;

// The bytes of one swizzle row (the pattern repeats every 8 of them): 128, 64, 32, or 0 for none.
int swizzle_bytes(TensorSwizzle swizzle);

// The address a 16-byte chunk at `address` is stored at under a swizzle mode: its chunk index
// (bits 4-6) XORed with bits 7-9 (128B), 7-8 (64B) or 7 (32B), the pattern both the tensor copy
// engine and wgmma's descriptors apply.
uint32_t swizzled_address(uint32_t address, TensorSwizzle swizzle);

// cuTensorMapEncodeTiled's checks; an empty string when the map is valid.
std::string encode_tensor_map(TensorMap* map, int rank, int element_bytes, const void* base,
                              const uint64_t* dims, const uint64_t* strides_bytes,
                              const uint32_t* box, TensorSwizzle swizzle);

// cp.async.bulk.tensor.{rank}d.shared::cluster.global.mbarrier::complete_tx::bytes: the box at
// coords (innermost first; elements outside the tensor read as zeros) into shared memory at
// `dst`, swizzled by the map's pattern on the shared address, then complete_tx of the box's
// bytes on `barrier`.
void tensor_copy_load(uint32_t dst, const TensorMap* map, const int32_t* coords, uint32_t barrier);

// ---- wgmma, per warp (each warp of a warpgroup computes its 16 rows of the m64 tile)
enum class WgmmaType : int { kBF16, kFP16 };
void wgmma_fence();
// wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{type}: d (n / 2 floats per lane) = A * B +
// (scale_d ? d : 0), A and B from shared memory by their descriptors, MN-major when trans_*.
void wgmma(WgmmaType type, int n, float* d, uint64_t desc_a, uint64_t desc_b, bool scale_d,
           bool trans_a, bool trans_b);
void wgmma_commit();
void wgmma_wait(int in_flight);

// ---- warp specialisation
// elect.sync: true in one lane of `mask` (the lowest), false in the others.
bool elect_one(unsigned mask);
// setmaxnreg.{inc,dec}.sync.aligned.u32: checks its constraints, changes nothing.
void setmaxnreg(int registers, bool increase);

// ---- block state, for the scheduler
void reset_block_async_state();
// What the block left unfinished (copies in flight, wgmma groups never waited for), or "".
std::string block_async_leftover();

}  // namespace moe_kernels::emu
