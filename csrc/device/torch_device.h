// What a host op needs from its target, for the CUDA build and the emulated one alike: a device
// guard, the current stream, the device type of a torch scalar type, and how a failed launch is
// reported. Host ops (*_cuda.cpp) include this; kernels never do.
#pragma once

#include <ATen/ATen.h>

#include "device/runtime_api.h"
#include "device/types.h"

#if !defined(MOE_KERNELS_EMULATOR)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

// Inline functions here differ between the CUDA build and the emulated one, which share a module:
// the target namespace keeps their symbols apart.
namespace moe_kernels::device::inline MOE_KERNELS_TARGET {

#if defined(MOE_KERNELS_EMULATOR)
// The emulator runs on the calling thread, on CPU tensors: no device to select, no stream.
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
inline cudaStream_t current_stream() { return nullptr; }
// The emulator throws on a failed launch; anything else is a launcher's own error code.
inline void check_launch(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "emulated launch failed: ", cudaGetErrorString(err));
}
#else
using DeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }
inline void check_launch(cudaError_t err) { C10_CUDA_CHECK(err); }
#endif

// at::BFloat16 / at::Half as the kernels' types (identical layouts).
template <typename scalar_t>
struct DeviceScalar {
  using type = scalar_t;
};
template <>
struct DeviceScalar<at::BFloat16> {
  using type = bf16;
};
template <>
struct DeviceScalar<at::Half> {
  using type = fp16;
};

template <typename scalar_t>
auto* device_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename DeviceScalar<scalar_t>::type*>(
      t.const_data_ptr<scalar_t>());
}
template <typename scalar_t>
auto* mutable_device_ptr(at::Tensor& t) {
  return reinterpret_cast<typename DeviceScalar<scalar_t>::type*>(t.mutable_data_ptr<scalar_t>());
}

}  // namespace moe_kernels::device::inline MOE_KERNELS_TARGET
