// mma.sync m16n8k16 and ldmatrix on the CPU emulator: the whole warp's fragments are rebuilt into
// matrices by the PTX ISA manual's layouts (device/tensor_core.h), so a kernel that puts an
// element in the wrong register multiplies the wrong matrices here too.
#include "emu/tensor_core.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>
#include <sstream>
#include <string>

#include "emu/scheduler.h"

namespace moe_kernels::emu {
namespace {

constexpr int kWarpSize = 32;

struct MmaLane {
  MmaType type;
  float* d;
  const uint32_t* a;
  const uint32_t* b;
  const float* c;
};

float to_float(MmaType type, uint16_t bits) {
  if (type == MmaType::kBF16) {
    return static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits()));
  }
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// Element `half` (0: low, 1: high) of a register that holds two 16-bit values.
uint16_t half_of(uint32_t reg, int half) { return static_cast<uint16_t>(reg >> (16 * half)); }

void mma_warp(void* const* lanes) {
  const MmaType type = static_cast<const MmaLane*>(lanes[0])->type;
  float a[16][16], b[16][8], c[16][8];
  for (int l = 0; l < kWarpSize; ++l) {
    const auto& lane = *static_cast<const MmaLane*>(lanes[l]);
    if (lane.type != type) fail("mma.sync: lanes 0 and " + std::to_string(l) + " differ in type");
    const int g = l / 4, t = l % 4;
    for (int h = 0; h < 2; ++h) {
      a[g][2 * t + h] = to_float(type, half_of(lane.a[0], h));
      a[g + 8][2 * t + h] = to_float(type, half_of(lane.a[1], h));
      a[g][2 * t + 8 + h] = to_float(type, half_of(lane.a[2], h));
      a[g + 8][2 * t + 8 + h] = to_float(type, half_of(lane.a[3], h));
      b[2 * t + h][g] = to_float(type, half_of(lane.b[0], h));
      b[2 * t + 8 + h][g] = to_float(type, half_of(lane.b[1], h));
      c[g][2 * t + h] = lane.c[h];
      c[g + 8][2 * t + h] = lane.c[2 + h];
    }
  }
  // All of C is read before any D is written: d and c are often the same registers. Products of
  // 16-bit values are exact in fp32; the sum runs from C in k order, so two chained k16 steps
  // give the same sum as one k32 step.
  for (int l = 0; l < kWarpSize; ++l) {
    float* d = static_cast<const MmaLane*>(lanes[l])->d;
    const int g = l / 4, t = l % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
      float sum = c[row][col];
      for (int k = 0; k < 16; ++k) sum += a[row][k] * b[k][col];
      d[i] = sum;
    }
  }
}

struct LdmatrixLane {
  int tiles;
  bool trans;
  uint32_t* r;
  const void* row;
};

std::string address_error(int lane, const void* row, int tile, const char* problem) {
  std::ostringstream s;
  s << "ldmatrix: lane " << lane << " gives row address " << row << " (row " << lane % 8
    << " of tile " << tile << "), which " << problem;
  return s.str();
}

void ldmatrix_warp(void* const* lanes) {
  const auto& first = *static_cast<const LdmatrixLane*>(lanes[0]);
  uint16_t tile[4][8][8];
  for (int l = 0; l < kWarpSize; ++l) {
    const auto& lane = *static_cast<const LdmatrixLane*>(lanes[l]);
    if (lane.tiles != first.tiles || lane.trans != first.trans) {
      fail("ldmatrix: lanes 0 and " + std::to_string(l) + " differ in .num or .trans");
    }
    const int i = l / 8;
    if (i >= first.tiles) continue;  // lanes past the tiles' rows give ignored addresses
    if (reinterpret_cast<uintptr_t>(lane.row) % 16 != 0) {
      fail(address_error(l, lane.row, i, "is not 16-byte aligned"));
    }
    if (!in_shared_memory(lane.row, 16)) {
      fail(address_error(l, lane.row, i,
                         "is not in shared memory (dynamic, or a MOE_KERNELS_SHARED declaration)"));
    }
    std::memcpy(tile[i][l % 8], lane.row, 16);
  }
  for (int l = 0; l < kWarpSize; ++l) {
    const auto& lane = *static_cast<const LdmatrixLane*>(lanes[l]);
    const int row = l / 4, col = 2 * (l % 4);
    for (int i = 0; i < first.tiles; ++i) {
      const uint16_t low = first.trans ? tile[i][col][row] : tile[i][row][col];
      const uint16_t high = first.trans ? tile[i][col + 1][row] : tile[i][row][col + 1];
      lane.r[i] = uint32_t{low} | uint32_t{high} << 16;
    }
  }
}

}  // namespace

void mma_m16n8k16(MmaType type, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                  const float (&c)[4]) {
  MmaLane lane{type, d, a, b, c};
  aligned_warp_collective(WarpOp::kMma, &lane, mma_warp);
}

void ldmatrix(int tiles, bool trans, uint32_t* r, const void* row) {
  LdmatrixLane lane{tiles, trans, r, row};
  aligned_warp_collective(WarpOp::kLdmatrix, &lane, ldmatrix_warp);
}

}  // namespace moe_kernels::emu
