// Kernels that prove the emulator's cp.async (python_tests/test_emulator_tensor_core.py): when
// the destination changes under each schedule, zero fill, which groups a wait covers, and the
// misuses that must be errors.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "device/async_copy.h"
#include "device/launch.h"

namespace moe_kernels::emu::selftest {
namespace {

using device::LaunchConfig;

void check(cudaError_t err) {
  if (err != cudaSuccess) throw std::runtime_error(cudaGetErrorString(err));
}

// Each of 32 threads copies 4 floats of `src` into dynamic shared memory and reads them back
// before the wait (out[0..128)) and after it (out[128..256)).
__global__ void async_copy_visibility_kernel(const float* src, float* out) {
  MOE_KERNELS_DYNAMIC_SHARED(float, shared);
  const int t = threadIdx.x;
  device::cp_async<16>(shared + 4 * t, src + 4 * t, 16);
  device::cp_async_commit();
  for (int i = 0; i < 4; ++i) out[4 * t + i] = shared[4 * t + i];
  device::cp_async_wait<0>();
  for (int i = 0; i < 4; ++i) out[128 + 4 * t + i] = shared[4 * t + i];
}

std::vector<float> async_copy_visibility(std::vector<float> src) {
  if (src.size() != 128) throw std::invalid_argument("async_copy_visibility: 128 floats");
  std::vector<float> out(256);
  check(device::launch<async_copy_visibility_kernel>(LaunchConfig{dim3(1), dim3(32), 128 * 4},
                                                     nullptr, src.data(), out.data()));
  return out;
}

// One copy of kBytes of which only src_bytes are read; the destination's bytes after the wait.
template <int kBytes>
__global__ void async_copy_zero_fill_kernel(const uint8_t* src, int src_bytes, uint8_t* out) {
  MOE_KERNELS_SHARED(uint8_t, destination, [16]);
  device::cp_async<kBytes>(destination, src, src_bytes);
  device::cp_async_commit();
  device::cp_async_wait<0>();
  for (int i = 0; i < kBytes; ++i) out[i] = destination[i];
}

std::vector<uint8_t> async_copy_zero_fill(int bytes, int src_bytes) {
  alignas(16) const uint8_t src[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
  std::vector<uint8_t> out(bytes);
  const LaunchConfig config{dim3(1), dim3(1)};
  if (bytes == 4) {
    check(device::launch<async_copy_zero_fill_kernel<4>>(config, nullptr, src, src_bytes,
                                                         out.data()));
  } else if (bytes == 8) {
    check(device::launch<async_copy_zero_fill_kernel<8>>(config, nullptr, src, src_bytes,
                                                         out.data()));
  } else {
    check(device::launch<async_copy_zero_fill_kernel<16>>(config, nullptr, src, src_bytes,
                                                          out.data()));
  }
  return out;
}

// One thread, three copies of one float: groups 0 and 1 committed, then cp_async_wait<1> and
// cp_async_wait<0>; copy 2 never committed before a cp_async_wait<0>, then committed and waited
// for. Row i of the result is what shared memory held at step i.
__global__ void async_copy_groups_kernel(const float* src, float* out) {
  MOE_KERNELS_SHARED(float, shared, [3]);
  const auto record = [&](int step) {
    for (int i = 0; i < 3; ++i) out[step * 3 + i] = shared[i];
  };
  device::cp_async<4>(&shared[0], &src[0], 4);
  device::cp_async_commit();
  device::cp_async<4>(&shared[1], &src[1], 4);
  device::cp_async_commit();
  device::cp_async_wait<1>();
  record(0);
  device::cp_async_wait<0>();
  record(1);
  device::cp_async<4>(&shared[2], &src[2], 4);
  device::cp_async_wait<0>();
  record(2);
  device::cp_async_commit();
  device::cp_async_wait<0>();
  record(3);
}

std::vector<float> async_copy_groups(std::vector<float> src) {
  if (src.size() != 3) throw std::invalid_argument("async_copy_groups: 3 floats");
  std::vector<float> out(4 * 3);
  check(device::launch<async_copy_groups_kernel>(LaunchConfig{dim3(1), dim3(1)}, nullptr,
                                                 src.data(), out.data()));
  return out;
}

// Broken uses of cp.async, each of which must be an error naming the kernel.
enum class Misuse : int {
  kNone,
  kMisalignedDst,
  kMisalignedSrc,
  kGlobalDst,
  kSharedSrc,
  kSrcBytes,
  kExitUncommitted,
  kExitUnwaited,
};

__global__ void async_copy_misuse_kernel(Misuse misuse, const float* src, float* global) {
  MOE_KERNELS_SHARED(float, shared, [8]);
  float* dst = misuse == Misuse::kMisalignedDst ? &shared[1]
               : misuse == Misuse::kGlobalDst   ? global
                                                : &shared[0];
  const float* from = misuse == Misuse::kMisalignedSrc ? &src[1]
                      : misuse == Misuse::kSharedSrc   ? &shared[4]
                                                       : &src[0];
  device::cp_async<16>(dst, from, misuse == Misuse::kSrcBytes ? 17 : 16);
  if (misuse == Misuse::kExitUncommitted) return;
  device::cp_async_commit();
  if (misuse == Misuse::kExitUnwaited) return;
  device::cp_async_wait<0>();
}

void async_copy_misuse(const std::string& misuse) {
  const Misuse kind = misuse == "none"               ? Misuse::kNone
                      : misuse == "misaligned_dst"   ? Misuse::kMisalignedDst
                      : misuse == "misaligned_src"   ? Misuse::kMisalignedSrc
                      : misuse == "global_dst"       ? Misuse::kGlobalDst
                      : misuse == "shared_src"       ? Misuse::kSharedSrc
                      : misuse == "src_bytes"        ? Misuse::kSrcBytes
                      : misuse == "exit_uncommitted" ? Misuse::kExitUncommitted
                      : misuse == "exit_unwaited"    ? Misuse::kExitUnwaited
                                                     : throw std::invalid_argument(misuse);
  alignas(16) const float src[8] = {};
  alignas(16) float global[4] = {};
  check(device::launch<async_copy_misuse_kernel>(LaunchConfig{dim3(1), dim3(32)}, nullptr, kind,
                                                 src, global));
}

}  // namespace

void bind_async_copy(pybind11::module_& m) {
  m.def("async_copy_visibility", &async_copy_visibility);
  m.def("async_copy_zero_fill", &async_copy_zero_fill);
  m.def("async_copy_groups", &async_copy_groups);
  m.def("async_copy_misuse", &async_copy_misuse);
}

}  // namespace moe_kernels::emu::selftest
