// The order in which drop_over_capacity keeps an expert's pairs, as one unsigned key per pair:
// the smaller key is kept first, and equal keys go in pair order (token, then slot). One
// definition for the CPU op, the CUDA kernel and the emulator.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/host_device.h"

namespace moe_kernels::capacity {

// Which of an expert's pairs over its capacity are dropped.
enum class DropPolicy : int {
  kProbs = 0,     // the lowest routing weights (Megatron-Core's "probs")
  kPosition = 1,  // the last in pair order (GShard, Switch)
};

template <typename weight_t>
struct KeyBits;
template <>
struct KeyBits<float> {
  using type = uint32_t;
  static constexpr type kNegativeInfinity = 0xFF800000u;
};
template <>
struct KeyBits<double> {
  using type = uint64_t;
  static constexpr type kNegativeInfinity = 0xFFF0000000000000ull;
};

// A weight's key: the higher the weight, the smaller the key, over every float (a sign-magnitude
// flip of the bits). NaN ranks as -inf, as in biased_topk, and -0 as +0, so equal weights have
// equal keys. Keys of floats fill 32 bits, those of doubles 64.
template <typename weight_t>
MOE_KERNELS_HOST_DEVICE uint64_t drop_key(weight_t weight) {
  using bits_t = typename KeyBits<weight_t>::type;
  constexpr bits_t kSign = bits_t(1) << (8 * sizeof(bits_t) - 1);
  bits_t bits = 0;
  if (weight != weight) {
    bits = KeyBits<weight_t>::kNegativeInfinity;
  } else if (weight != weight_t(0)) {
    std::memcpy(&bits, &weight, sizeof(bits));
  }
  // Negative weights keep their bits (more negative, larger); positive ones flip below kSign.
  return (bits & kSign) ? bits : static_cast<bits_t>(~bits & (kSign - 1));
}

}  // namespace moe_kernels::capacity
