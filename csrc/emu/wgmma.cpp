// wgmma on the CPU emulator. Each warp of a warpgroup computes its own 16 rows of the m64 tile
// (rows 16 r .. 16 r + 15 for the warp of rank r), so the instruction is a warp collective here;
// the operands are decoded from their shared-memory matrix descriptors by the canonical layouts
// of the PTX ISA manual, in units of 16-byte "core matrix" rows T (8 elements of 16 bits):
//   K-major, swizzled (W = 2, 4, 8 chunks):  ((8, m), (T, 2)) : ((W T, SBO), (1, T))
//   K-major, interleaved:                    ((8, m), (T, 2)) : ((1 T, SBO), (1, LBO))
//   MN-major, swizzled:               ((T, W, m), (8, k)) : ((1, T, LBO), (W T, SBO))
//   MN-major, interleaved:            ((T, 1, m), (8, k)) : ((1, T, SBO), (1 T, LBO))
// followed by the swizzle of the address (emu/hopper.h). The accumulators of lane l in the warp
// of rank r: d[4 i + 2 h + j] = D[16 r + l / 4 + 8 h][8 i + 2 (l % 4) + j].
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "emu/hopper.h"
#include "emu/hopper_state.h"
#include "emu/scheduler.h"

namespace moe_kernels::emu {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpgroupThreads = 128;

struct Descriptor {
  uint32_t start, lbo, sbo;  // bytes
  int base_offset;
  TensorSwizzle swizzle;
};

Descriptor decode(uint64_t desc) {
  const auto field = [&](int shift, int bits) {
    return static_cast<uint32_t>(desc >> shift) & ((1u << bits) - 1);
  };
  // The layout-type field: 0 interleaved, 1 128B, 2 64B, 3 32B.
  constexpr TensorSwizzle kLayout[] = {TensorSwizzle::kNone, TensorSwizzle::k128B,
                                       TensorSwizzle::k64B, TensorSwizzle::k32B};
  return {field(0, 14) << 4, field(16, 14) << 4, field(32, 14) << 4, static_cast<int>(field(49, 3)),
          kLayout[field(62, 2)]};
}

// The shared address of element (mn, k) of an operand, k in [0, 16).
uint32_t element_address(const Descriptor& d, bool mn_major, int mn, int k) {
  const bool swizzled = d.swizzle != TensorSwizzle::kNone;
  // 16-byte chunks per swizzle row (1: interleaved).
  const uint32_t w = swizzled ? static_cast<uint32_t>(swizzle_bytes(d.swizzle) / 16) : 1;
  const auto umn = static_cast<uint32_t>(mn), uk = static_cast<uint32_t>(k);
  uint32_t offset;
  if (!mn_major) {
    offset = umn % 8 * (swizzled ? w * 16 : 16) + umn / 8 * d.sbo + uk % 8 * 2 +
             uk / 8 * (swizzled ? 16 : d.lbo);
  } else if (swizzled) {
    offset =
        umn % 8 * 2 + umn / 8 % w * 16 + umn / (8 * w) * d.lbo + uk % 8 * w * 16 + uk / 8 * d.sbo;
  } else {
    offset = umn % 8 * 2 + umn / 8 * d.sbo + uk % 8 * 16 + uk / 8 * d.lbo;
  }
  return swizzled_address(d.start + offset, d.swizzle);
}

float element(WgmmaType type, uint32_t address) {
  uint16_t bits;
  std::memcpy(&bits, shared_bytes_at(address, 2, "wgmma operand"), 2);
  if (type == WgmmaType::kBF16) {
    return static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits()));
  }
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

WarpWgmma& this_warp() { return block_async_state().warps[current_thread() / kWarpSize]; }

// D's 16 rows of this warp from the operands as shared memory holds them now, into `acc` (the
// lanes' accumulators, n / 2 each): products of 16-bit values are exact in fp32, summed in k order
// onto the accumulator.
void compute(const WgmmaOp& op, float* const* acc) {
  const Descriptor a = decode(op.desc_a), b = decode(op.desc_b);
  if (a.base_offset != 0 || b.base_offset != 0) {
    fail(
        "wgmma: a matrix base offset other than 0 is not emulated (align operands to the "
        "swizzle pattern's repeat)");
  }
  float av[16][16];
  std::vector<float> bv(static_cast<size_t>(op.n) * 16);
  for (int m = 0; m < 16; ++m) {
    for (int k = 0; k < 16; ++k) {
      av[m][k] = element(op.type, element_address(a, op.trans_a, 16 * op.warp_rank + m, k));
    }
  }
  for (int n = 0; n < op.n; ++n) {
    for (int k = 0; k < 16; ++k)
      bv[n * 16 + k] = element(op.type, element_address(b, op.trans_b, n, k));
  }
  for (int lane = 0; lane < kWarpSize; ++lane) {
    float* d = acc[lane];
    for (int i = 0; i < op.n / 8; ++i) {
      for (int h = 0; h < 2; ++h) {
        for (int j = 0; j < 2; ++j) {
          const int m = lane / 4 + 8 * h, n = 8 * i + 2 * (lane % 4) + j;
          float sum = op.scale_d ? d[4 * i + 2 * h + j] : 0.0f;
          for (int k = 0; k < 16; ++k) sum += av[m][k] * bv[n * 16 + k];
          d[4 * i + 2 * h + j] = sum;
        }
      }
    }
  }
}

struct WgmmaLane {
  WgmmaOp op;  // lane 0's is the warp's; d[lane] of each
  float* d;
};

void check_warpgroup(const char* what) {
  const int warpgroup = current_thread() / kWarpgroupThreads;
  if ((warpgroup + 1) * kWarpgroupThreads > block_threads()) {
    fail(std::string(what) + ": the block's threads " +
         std::to_string(warpgroup * kWarpgroupThreads) + ".. do not make a whole warpgroup of 128");
  }
}

void issue_warp(void* const* lanes) {
  WgmmaOp op = static_cast<const WgmmaLane*>(lanes[0])->op;
  for (int l = 0; l < kWarpSize; ++l) {
    const WgmmaLane& lane = *static_cast<const WgmmaLane*>(lanes[l]);
    if (lane.op.n != op.n || lane.op.desc_a != op.desc_a || lane.op.desc_b != op.desc_b ||
        lane.op.scale_d != op.scale_d || lane.op.type != op.type) {
      fail("wgmma.mma_async: lanes 0 and " + std::to_string(l) + " differ in their operands");
    }
    op.d[l] = lane.d;
  }
  WarpWgmma& w = this_warp();
  if (!w.fenced) {
    fail(
        "wgmma.mma_async without a wgmma.fence since the warp last waited (the accumulators "
        "may be written by earlier instructions)");
  }
  if (launch_schedule() == Schedule::kForward) {
    compute(op, op.d);
  } else {
    for (float* d : op.d) {
      if (w.shadow.count(d) == 0) {
        w.shadow[d].assign(d, d + op.n / 2);
        std::fill(d, d + op.n / 2, std::numeric_limits<float>::quiet_NaN());
      }
    }
  }
  w.open.push_back(op);
}

void finish_warp(WarpWgmma& w, size_t keep) {
  while (w.committed.size() > keep) {
    for (const WgmmaOp& op : w.committed.front()) {
      if (launch_schedule() == Schedule::kForward) continue;
      float* acc[kWarpSize];
      for (int l = 0; l < kWarpSize; ++l) acc[l] = w.shadow.at(op.d[l]).data();
      compute(op, acc);
    }
    w.committed.pop_front();
  }
  // Accumulators no wgmma still in flight writes get their values.
  for (auto it = w.shadow.begin(); it != w.shadow.end();) {
    bool busy = false;
    for (const auto& group : w.committed) {
      for (const WgmmaOp& op : group) {
        for (float* d : op.d) busy = busy || d == it->first;
      }
    }
    for (const WgmmaOp& op : w.open) {
      for (float* d : op.d) busy = busy || d == it->first;
    }
    if (busy) {
      ++it;
    } else {
      std::memcpy(it->first, it->second.data(), it->second.size() * sizeof(float));
      it = w.shadow.erase(it);
    }
  }
}

}  // namespace

void wgmma_fence() {
  check_warpgroup("wgmma.fence");
  aligned_warp_collective(WarpOp::kWgmmaFence, nullptr,
                          [](void* const*) { this_warp().fenced = true; });
}

void wgmma(WgmmaType type, int n, float* d, uint64_t desc_a, uint64_t desc_b, bool scale_d,
           bool trans_a, bool trans_b) {
  check_warpgroup("wgmma.mma_async");
  if (n < 8 || n > 256 || n % 8 != 0) {
    fail("wgmma.mma_async: N must be a multiple of 8 in [8, 256], got " + std::to_string(n));
  }
  WgmmaLane lane{
      WgmmaOp{
          type, n, {}, desc_a, desc_b, scale_d, trans_a, trans_b, current_thread() / kWarpSize % 4},
      d};
  aligned_warp_collective(WarpOp::kWgmma, &lane, issue_warp);
}

void wgmma_commit() {
  check_warpgroup("wgmma.commit_group");
  aligned_warp_collective(WarpOp::kWgmmaCommit, nullptr, [](void* const*) {
    WarpWgmma& w = this_warp();
    w.committed.push_back(std::move(w.open));
    w.open.clear();
  });
}

void wgmma_wait(int in_flight) {
  check_warpgroup("wgmma.wait_group");
  if (in_flight < 0 || in_flight > 7) {
    fail("wgmma.wait_group: N must be in [0, 7], got " + std::to_string(in_flight));
  }
  // The warp function gets no parameter of its own: the count travels in the lanes' data.
  aligned_warp_collective(WarpOp::kWgmmaWait, &in_flight, [](void* const* lanes) {
    WarpWgmma& w = this_warp();
    finish_warp(w, static_cast<size_t>(*static_cast<const int*>(lanes[0])));
    w.fenced = false;
  });
}

bool elect_one(unsigned mask) {
  return warp_collective(WarpOp::kElect, mask, 0, 0, kWarpSize) != 0;
}

void setmaxnreg(int registers, bool increase) {
  check_warpgroup("setmaxnreg");
  if (registers < 24 || registers > 256 || registers % 8 != 0) {
    fail(std::string("setmaxnreg.") + (increase ? "inc" : "dec") +
         ": the register count must be a multiple of 8 in [24, 256], got " +
         std::to_string(registers));
  }
  aligned_warp_collective(WarpOp::kSetmaxnreg, nullptr, [](void* const*) {});
}

}  // namespace moe_kernels::emu
