// Vectorised row access: a Pack of N elements moves as one 16-byte load or store when N elements
// fill 16 bytes. Launchers choose the width in host code (with_pack_width) and instantiate the
// kernel for it; kernels index rows in packs. Torch-free.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "device/runtime.h"

namespace moe_kernels::device {

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Elements of T in one 16-byte access.
template <typename T>
constexpr int kWidePack = 16 / sizeof(T);

// Calls launch_with(std::integral_constant<int, N>{}) with N = kWidePack<T> when every row of
// `row_elements` elements at each pointer starts on a 16-byte boundary, else with N = 1.
template <typename T, typename Launch>
cudaError_t with_pack_width(int64_t row_elements, std::initializer_list<const void*> rows,
                            Launch&& launch_with) {
  bool wide = row_elements % kWidePack<T> == 0;
  for (const void* p : rows) wide = wide && reinterpret_cast<uintptr_t>(p) % 16 == 0;
  return wide ? launch_with(std::integral_constant<int, kWidePack<T>>{})
              : launch_with(std::integral_constant<int, 1>{});
}

}  // namespace moe_kernels::device
