// Tensor maps for the tensor copy engine (device/tensor_copy.h), encoded on the host: the
// driver's cuTensorMapEncodeTiled under the CUDA build (found through the runtime's driver entry
// point, so nothing links libcuda), the CPU emulator's encoder otherwise. Tiled, 16-bit
// elements, boxes zero-filled outside the tensor, 128-byte swizzle.
#pragma once

#include <cstdint>

#include "device/runtime_api.h"

#if defined(MOE_KERNELS_EMULATOR)
#include <stdexcept>
#include <string>

#include "emu/hopper.h"
#else
#include <cuda.h>
#endif

namespace moe_kernels::device::inline MOE_KERNELS_TARGET {

#if defined(MOE_KERNELS_EMULATOR)
using TensorMap = emu::TensorMap;
#else
using TensorMap = CUtensorMap;
#endif

// dims[0] innermost; strides_bytes[i] is dimension i + 1's; box[i] elements per dimension (box[0]
// * 2 bytes = 128, the swizzle span). `bf16` or fp16 elements.
inline cudaError_t encode_tensor_map(TensorMap* map, int rank, const void* base,
                                     const uint64_t* dims, const uint64_t* strides_bytes,
                                     const uint32_t* box, bool bf16) {
#if defined(MOE_KERNELS_EMULATOR)
  (void)bf16;
  if (const std::string error = emu::encode_tensor_map(map, rank, 2, base, dims, strides_bytes, box,
                                                       emu::TensorSwizzle::k128B);
      !error.empty()) {
    throw std::invalid_argument("moe_kernels emulator: " + error);
  }
  return cudaSuccess;
#else
  using Encode =
      CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  static const Encode encode = [] {
    void* function = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &function, 12000,
                                         cudaEnableDefault, &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      return Encode{nullptr};
    }
    return reinterpret_cast<Encode>(function);
  }();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint32_t element_strides[5] = {1, 1, 1, 1, 1};
  const CUresult result = encode(
      map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
      static_cast<cuuint32_t>(rank), const_cast<void*>(base),
      reinterpret_cast<const cuuint64_t*>(dims), reinterpret_cast<const cuuint64_t*>(strides_bytes),
      box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return result == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
#endif
}

}  // namespace moe_kernels::device::inline MOE_KERNELS_TARGET
