// A kernel launch written once for both targets: `launch<kernel>(config, stream, args...)` is
// `kernel<<<grid, block, shared_bytes, stream>>>(args...)` under nvcc, and the same launch on
// the CPU emulator under MOE_KERNELS_EMULATOR. Launchers compute the LaunchConfig in plain host
// code, so the emulated run is exactly the launch a GPU gets.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <utility>

#include "device/runtime.h"

// Inline functions here differ between the CUDA build and the emulated one, which share a module:
// the target namespace keeps their symbols apart.
namespace moe_kernels::device::inline MOE_KERNELS_TARGET {

struct LaunchConfig {
  dim3 grid;
  dim3 block;
  size_t shared_bytes = 0;
};

template <auto Kernel, typename... Args>
cudaError_t launch(const LaunchConfig& config, cudaStream_t stream, Args&&... args) {
#if defined(MOE_KERNELS_EMULATOR)
  (void)stream;
  emu::launch<Kernel>(config.grid, config.block, config.shared_bytes, std::forward<Args>(args)...);
  return cudaSuccess;
#else
  // In a .h, clang-format takes <<< >>> for shifts and splits the >>>.
  // clang-format off
  Kernel<<<config.grid, config.block, config.shared_bytes, stream>>>(std::forward<Args>(args)...);
  // clang-format on
  return cudaGetLastError();
#endif
}

// Lets Kernel launch with up to `bytes` of dynamic shared memory, past the 48 KB a block gets
// without opting in (up to the device's cudaDevAttrMaxSharedMemoryPerBlockOptin).
template <auto Kernel>
cudaError_t allow_dynamic_shared(size_t bytes) {
  return cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

// Streaming multiprocessors of the current device (of the emulated one: a few).
inline cudaError_t multiprocessor_count(int* count) {
  int device = 0;
  if (cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) return err;
  return cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, device);
}

// Blocks for a grid-stride loop over `items`, `items_per_block` per block and pass: as many as
// the work needs, at most `blocks_per_sm` per SM (more would only wait for a slot), at least one.
inline cudaError_t grid_stride_blocks(int64_t items, int64_t items_per_block, int blocks_per_sm,
                                      dim3* grid) {
  int num_sms = 1;
  if (cudaError_t err = multiprocessor_count(&num_sms); err != cudaSuccess) return err;
  const int64_t needed = (items + items_per_block - 1) / items_per_block;
  *grid = dim3(static_cast<unsigned>(
      std::clamp<int64_t>(needed, 1, static_cast<int64_t>(blocks_per_sm) * num_sms)));
  return cudaSuccess;
}

}  // namespace moe_kernels::device::inline MOE_KERNELS_TARGET
