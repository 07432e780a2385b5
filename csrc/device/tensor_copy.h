// The tensor copy engine (TMA, sm_90): a tensor map, encoded on the host, describes a tensor in
// global memory (up to 5 dimensions, innermost first, strides in bytes) and the box one copy
// moves; cp.async.bulk.tensor copies the box at given coordinates into shared memory, laid out
// row-major (innermost contiguous) and swizzled, filling elements outside the tensor with zeros,
// and completes the box's byte count on an mbarrier. Kernels take the map as a
// `const __grid_constant__ TensorMap` parameter. Inline PTX under nvcc (sm_90a); the CPU
// emulator's engine otherwise (emu/hopper.h).
#pragma once

#include <cstdint>

#include "device/runtime.h"
#include "device/tensor_map.h"
#include "device/warpgroup.h"

namespace moe_kernels::device::inline MOE_KERNELS_TARGET {

// Loads the box at coords (kRank of them, innermost first) into `dst` (1024-byte aligned for the
// 128B swizzle), signalling `barrier`. One thread issues it.
template <int kRank>
__device__ __forceinline__ void tensor_copy_load(void* dst, const TensorMap& map,
                                                 const int32_t (&coords)[kRank],
                                                 uint64_t* barrier) {
  static_assert(kRank == 2 || kRank == 3, "2D and 3D boxes");
#if defined(MOE_KERNELS_EMULATOR)
  emu::tensor_copy_load(shared_address(dst), &map, coords, shared_address(barrier));
#elif defined(MOE_KERNELS_SM90A)
  const auto map_address = reinterpret_cast<uint64_t>(&map);
  if constexpr (kRank == 2) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes "
        "[%0], [%1, {%2, %3}], [%4];\n" ::"r"(shared_address(dst)),
        "l"(map_address), "r"(coords[0]), "r"(coords[1]), "r"(shared_address(barrier))
        : "memory");
  } else {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes "
        "[%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(shared_address(dst)),
        "l"(map_address), "r"(coords[0]), "r"(coords[1]), "r"(coords[2]),
        "r"(shared_address(barrier))
        : "memory");
  }
#else
  (void)dst, (void)map, (void)coords, (void)barrier;
#endif
}

}  // namespace moe_kernels::device::inline MOE_KERNELS_TARGET
