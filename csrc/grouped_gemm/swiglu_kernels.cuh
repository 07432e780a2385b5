// SwiGLU of a product [gate | up] (the variant `glu`, swiglu.h), elementwise, and its backward:
// from the gradient of swiglu(gate, up) and the saved product, the gradient of the product. Rows
// in packs of kVec elements (16 bytes when the launcher found them aligned). Torch-free.
#pragma once

#include <cstdint>

#include "device/pack.h"
#include "device/runtime.h"
#include "device/types.h"
#include "grouped_gemm/swiglu.h"

namespace moe_kernels::gemm::MOE_KERNELS_TARGET {

constexpr int kSwigluThreads = 256;

// Calls body(row, col) for every pack of kVec columns of rows of `half` pairs, grid-stride.
template <int kVec, typename Body>
__device__ __forceinline__ void for_each_pack(int64_t rows, int64_t half, const Body& body) {
  const int64_t packs_per_row = half / kVec;
  const int64_t packs = rows * packs_per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < packs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    body(i / packs_per_row, i % packs_per_row * kVec);
  }
}

// pre [rows, 2 * half]; out [rows, half].
template <typename T, int kVec>
__global__ void __launch_bounds__(kSwigluThreads)
    swiglu_kernel(const T* __restrict__ pre, int64_t rows, int64_t half, GluParams glu,
                  T* __restrict__ out) {
  using acc = device::acc_t<T>;
  using Pack = device::Pack<T, kVec>;
  for_each_pack<kVec>(rows, half, [&](int64_t row, int64_t col) {
    const Pack gate = *reinterpret_cast<const Pack*>(pre + row * 2 * half + col);
    const Pack up = *reinterpret_cast<const Pack*>(pre + row * 2 * half + half + col);
    Pack result;
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      result.v[v] =
          static_cast<T>(swiglu(static_cast<acc>(gate.v[v]), static_cast<acc>(up.v[v]), glu));
    }
    *reinterpret_cast<Pack*>(out + row * half + col) = result;
  });
}

// grad_out [rows, half]; pre and grad_pre [rows, 2 * half].
template <typename T, int kVec>
__global__ void __launch_bounds__(kSwigluThreads)
    swiglu_backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ pre, int64_t rows,
                           int64_t half, GluParams glu, T* __restrict__ grad_pre) {
  using acc = device::acc_t<T>;
  using Pack = device::Pack<T, kVec>;
  for_each_pack<kVec>(rows, half, [&](int64_t row, int64_t col) {
    const Pack grad = *reinterpret_cast<const Pack*>(grad_out + row * half + col);
    const Pack gate = *reinterpret_cast<const Pack*>(pre + row * 2 * half + col);
    const Pack up = *reinterpret_cast<const Pack*>(pre + row * 2 * half + half + col);
    Pack grad_gate, grad_up;
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      acc dg, du;
      swiglu_grad(static_cast<acc>(gate.v[v]), static_cast<acc>(up.v[v]),
                  static_cast<acc>(grad.v[v]), &dg, &du, glu);
      grad_gate.v[v] = static_cast<T>(dg);
      grad_up.v[v] = static_cast<T>(du);
    }
    *reinterpret_cast<Pack*>(grad_pre + row * 2 * half + col) = grad_gate;
    *reinterpret_cast<Pack*>(grad_pre + row * 2 * half + half + col) = grad_up;
  });
}

}  // namespace moe_kernels::gemm::MOE_KERNELS_TARGET
