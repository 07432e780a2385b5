// The slice of the CUDA runtime API that launchers use, for builds that run kernels on the CPU
// emulator instead of a GPU (MOE_KERNELS_EMULATOR). Torch-free and toolkit-free.
#pragma once

#include <cstddef>

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
};

enum cudaError_t : int { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorNotSupported = 801 };
using cudaStream_t = struct EmulatedStream*;

enum cudaDeviceAttr : int {
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

enum cudaFuncAttribute : int {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
};

namespace moe_kernels::emu {

// The emulated device: few SMs, so that grid-stride loops and multi-block paths run even on the
// small shapes the emulator can afford; the compute capability and shared-memory limits of an
// H100 (sm_90, whose kernels it has them all).
constexpr int kNumSMs = 4;
constexpr int kComputeCapabilityMajor = 9;
constexpr int kComputeCapabilityMinor = 0;
constexpr int kSharedMemoryPerBlock = 48 * 1024;
constexpr int kSharedMemoryPerBlockOptin = 227 * 1024;

// The most dynamic shared memory a launch of `kernel` may ask for: kSharedMemoryPerBlock until
// cudaFuncSetAttribute changes it. Process-wide, as the attribute is per device in CUDA.
cudaError_t set_max_dynamic_shared_bytes(const void* kernel, int bytes);
size_t max_dynamic_shared_bytes(const void* kernel);

}  // namespace moe_kernels::emu

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount:
      *value = moe_kernels::emu::kNumSMs;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor:
      *value = moe_kernels::emu::kComputeCapabilityMajor;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor:
      *value = moe_kernels::emu::kComputeCapabilityMinor;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock:
      *value = moe_kernels::emu::kSharedMemoryPerBlock;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = moe_kernels::emu::kSharedMemoryPerBlockOptin;
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

// The CUDA runtime's C++ overload: a template over the kernel's function type.
template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return moe_kernels::emu::set_max_dynamic_shared_bytes(reinterpret_cast<const void*>(kernel),
                                                        value);
}

inline cudaError_t cudaGetLastError() { return cudaSuccess; }

inline const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "no error";
    case cudaErrorNotSupported:
      return "operation not supported";
    default:
      return "invalid argument";
  }
}
