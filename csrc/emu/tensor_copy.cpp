// The tensor copy engine on the CPU emulator: tensor maps with cuTensorMapEncodeTiled's checks,
// and tiled loads (cp.async.bulk.tensor) into shared memory, zero-filled outside the tensor,
// swizzled on the shared address as the hardware does (the 16-byte chunk index, address bits
// 4-6, XORed with bits 7-9 for 128B, 7-8 for 64B, 7 for 32B), completed on an mbarrier by their
// byte count. The source is read at the issue; the bytes land then under "forward", and under the
// other schedules when a thread waits on the mbarrier (the latest moment a correct kernel allows).
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "emu/hopper.h"
#include "emu/hopper_state.h"
#include "emu/scheduler.h"

namespace moe_kernels::emu {
int swizzle_bytes(TensorSwizzle swizzle) {
  switch (swizzle) {
    case TensorSwizzle::k32B:
      return 32;
    case TensorSwizzle::k64B:
      return 64;
    case TensorSwizzle::k128B:
      return 128;
    default:
      return 0;
  }
}

uint32_t swizzled_address(uint32_t address, TensorSwizzle swizzle) {
  const int bytes = swizzle_bytes(swizzle);
  if (bytes == 0) return address;
  const uint32_t rows = static_cast<uint32_t>(bytes / 16 - 1);  // 1, 3 or 7
  return address ^ (((address >> 7) & rows) << 4);
}

std::string encode_tensor_map(TensorMap* map, int rank, int element_bytes, const void* base,
                              const uint64_t* dims, const uint64_t* strides_bytes,
                              const uint32_t* box, TensorSwizzle swizzle) {
  std::ostringstream s;
  if (rank < 1 || rank > 5) {
    s << "rank " << rank << " is outside [1, 5]";
  } else if (element_bytes != 2) {
    s << "only 16-bit elements are emulated, got " << element_bytes << " bytes";
  } else if (reinterpret_cast<uintptr_t>(base) % 16 != 0) {
    s << "the global address must be 16-byte aligned";
  } else if (swizzle != TensorSwizzle::kNone &&
             static_cast<int64_t>(box[0]) * element_bytes > swizzle_bytes(swizzle)) {
    s << "the inner box dimension (" << box[0] * element_bytes
      << " bytes) must not exceed the swizzle span (" << swizzle_bytes(swizzle) << " bytes)";
  } else if (swizzle != TensorSwizzle::kNone &&
             static_cast<int64_t>(box[0]) * element_bytes != swizzle_bytes(swizzle)) {
    s << "an inner box narrower than the swizzle span is not emulated";
  } else if (static_cast<int64_t>(box[0]) * element_bytes % 16 != 0) {
    s << "the inner box dimension must be a multiple of 16 bytes";
  } else {
    for (int i = 0; i < rank && s.tellp() == 0; ++i) {
      if (dims[i] == 0 || dims[i] > (uint64_t{1} << 32)) {
        s << "dimension " << i << " (" << dims[i] << ") is outside [1, 2^32]";
      } else if (box[i] == 0 || box[i] > 256) {
        s << "box dimension " << i << " (" << box[i] << ") is outside [1, 256]";
      } else if (i > 0 &&
                 (strides_bytes[i - 1] % 16 != 0 || strides_bytes[i - 1] >= (uint64_t{1} << 40))) {
        s << "stride " << i << " (" << strides_bytes[i - 1]
          << " bytes) must be a multiple of 16 below 2^40";
      }
    }
  }
  if (s.tellp() != 0) return "cuTensorMapEncodeTiled: " + s.str();
  *map = TensorMap{};
  map->magic = kTensorMapMagic;
  map->rank = rank;
  map->element_bytes = element_bytes;
  map->base = base;
  map->strides[0] = static_cast<uint64_t>(element_bytes);
  for (int i = 0; i < rank; ++i) {
    map->dims[i] = dims[i];
    map->box[i] = box[i];
    if (i > 0) map->strides[i] = strides_bytes[i - 1];
  }
  map->swizzle = swizzle;
  return "";
}

void tensor_copy_load(uint32_t dst, const TensorMap* map, const int32_t* coords, uint32_t barrier) {
  if (map == nullptr || map->magic != kTensorMapMagic) {
    fail("cp.async.bulk.tensor: the tensor map was never encoded");
  }
  const int alignment = map->swizzle == TensorSwizzle::kNone ? 16 : 128;
  if (dst % alignment != 0) {
    fail("cp.async.bulk.tensor: the shared destination 0x" + std::to_string(dst) +
         " must be aligned to " + std::to_string(alignment) + " bytes");
  }
  mbarrier_at(barrier, "cp.async.bulk.tensor");
  // The box in row-major order (dimension 0 innermost), each element read or zero.
  uint64_t elements = 1;
  for (int i = 0; i < map->rank; ++i) elements *= map->box[i];
  const size_t bytes = elements * map->element_bytes;
  shared_bytes_at(dst, bytes, "cp.async.bulk.tensor");
  TensorCopy copy{dst, barrier, std::vector<unsigned char>(bytes, 0)};
  const auto* base = static_cast<const unsigned char*>(map->base);
  for (uint64_t e = 0; e < elements; ++e) {
    uint64_t rest = e, offset = 0;
    bool inside = true;
    for (int i = 0; i < map->rank; ++i) {
      const int64_t at = int64_t{coords[i]} + static_cast<int64_t>(rest % map->box[i]);
      rest /= map->box[i];
      inside = inside && at >= 0 && static_cast<uint64_t>(at) < map->dims[i];
      offset += static_cast<uint64_t>(at) * map->strides[i];
    }
    if (inside) {
      std::memcpy(copy.bytes.data() + e * map->element_bytes, base + offset, map->element_bytes);
    }
  }
  // Swizzled on the destination's address, 16-byte chunk by chunk.
  std::vector<unsigned char> placed(bytes);
  for (size_t chunk = 0; chunk < bytes; chunk += 16) {
    const uint32_t to = swizzled_address(dst + static_cast<uint32_t>(chunk), map->swizzle) - dst;
    std::memcpy(placed.data() + to, copy.bytes.data() + chunk, 16);
  }
  copy.bytes.swap(placed);
  auto& copies = block_async_state().copies;
  copies.push_back(std::move(copy));
  if (launch_schedule() == Schedule::kForward) land_tensor_copies(barrier);
}

void land_tensor_copies(uint32_t barrier) {
  auto& copies = block_async_state().copies;
  std::vector<TensorCopy> landing;
  for (auto it = copies.begin(); it != copies.end();) {
    if (barrier == kAnyBarrier || it->barrier == barrier) {
      landing.push_back(std::move(*it));
      it = copies.erase(it);
    } else {
      ++it;
    }
  }
  for (const TensorCopy& copy : landing) {
    std::memcpy(shared_bytes_at(copy.dst, copy.bytes.size(), "a tensor copy landing"),
                copy.bytes.data(), copy.bytes.size());
    mbarrier_complete_tx(copy.barrier, static_cast<uint32_t>(copy.bytes.size()));
  }
}

}  // namespace moe_kernels::emu
