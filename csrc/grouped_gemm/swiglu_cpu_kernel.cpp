// The SwiGLU row loops for one instruction set. CMakeLists.txt compiles this file once per
// CPU_CAPABILITY (DEFAULT everywhere; AVX2 and AVX512 on x86-64, with their compiler flags), each
// copy in a namespace of that name, as torch compiles its own CPU kernels; swiglu_cpu.cpp picks
// the copy torch would run. Only ATen's vector headers are included: an inline function of a
// wider header, emitted out of line here with AVX-512 instructions, could be the copy the linker
// keeps for the whole module.
#include "grouped_gemm/swiglu_cpu_kernel.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <limits>

namespace moe_kernels::gemm::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Loads of up to kStep elements of T widened to accumulator vectors, and the rounding stores
// back: fp32 and fp64 are their own accumulator (one vector a step), bf16 and fp16 widen to
// two fp32 vectors.
template <typename T>
struct Wide {
  using Acc = Vectorized<T>;
  static constexpr int kParts = 1;
  static constexpr int64_t kStep = Vectorized<T>::size();
  static std::array<Acc, 1> load(const T* p, int64_t n) {
    return {n == kStep ? Acc::loadu(p) : Acc::loadu(p, n)};
  }
  static void store(T* p, const std::array<Acc, 1>& v, int64_t n) { v[0].store(p, n); }
};

template <typename T>
  requires(at::vec::is_reduced_floating_point_v<T>)
struct Wide<T> {
  using Acc = Vectorized<float>;
  static constexpr int kParts = 2;
  static constexpr int64_t kStep = Vectorized<T>::size();
  static std::array<Acc, 2> load(const T* p, int64_t n) {
    const auto [lo, hi] = at::vec::convert_to_float<T>(n == kStep ? Vectorized<T>::loadu(p)
                                                                  : Vectorized<T>::loadu(p, n));
    return {lo, hi};
  }
  static void store(T* p, const std::array<Acc, 2>& v, int64_t n) {
    at::vec::convert_from_float<T>(v[0], v[1]).store(p, n);
  }
};

// swiglu.h's variant parameters as vectors of the accumulator type. At alpha 1 and offset 0 the
// products and sums with them are exact, so SwiGLU itself computes as torch's silu does.
template <typename V>
struct Glu {
  V alpha, limit, offset;
  bool clamped;
  explicit Glu(const GluParams& p)
      : alpha(p.alpha),
        limit(p.limit),
        offset(p.up_offset),
        clamped(p.limit < std::numeric_limits<float>::infinity()) {}
  // Blends, not minimum/maximum, so that a NaN stays a NaN (as torch.clamp keeps it).
  V gate(V g) const { return clamped ? V::blendv(g, limit, g > limit) : g; }
  V up(V u) const {
    if (!clamped) return u;
    return V::blendv(V::blendv(u, limit, u > limit), limit.neg(), u < limit.neg());
  }
};

// silu(x) = x / (1 + exp(-x)) and silu'(x) = s (1 + x (1 - s)) with s = 1 / (1 + exp(-x)),
// written as torch's silu and silu_backward kernels write them (swiglu.h has the same math),
// with alpha * x in the exponent.
template <typename V>
V swiglu(V gate, V up, const Glu<V>& p) {
  const V one(1), g = p.gate(gate);
  return g / (one + (p.alpha * g).neg().exp()) * (p.up(up) + p.offset);
}

template <typename V>
void swiglu_grad(V gate, V up, V grad, V* grad_gate, V* grad_up, const Glu<V>& p) {
  const V one(1), g = p.gate(gate), u = p.up(up) + p.offset;
  const V denominator = one + (p.alpha * g).neg().exp();
  const V sigmoid = one / denominator;
  *grad_gate = grad * u * sigmoid * (one + p.alpha * g * (one - sigmoid));
  *grad_up = g / denominator * grad;
  if (p.clamped) {  // no gradient at or past the limit, as torch.clamp's backward
    const V zero(0);
    *grad_gate = V::blendv(*grad_gate, zero, gate >= p.limit);
    *grad_up = V::blendv(*grad_up, zero, (up >= p.limit) | (up <= p.limit.neg()));
  }
}

template <typename T>
const T* row(Rows m, int64_t r) {
  return static_cast<const T*>(m.data) + r * m.stride;
}

template <typename T>
T* row(MutableRows m, int64_t r) {
  return static_cast<T*>(m.data) + r * m.stride;
}

template <typename T>
void forward_rows(Rows pre, MutableRows out, int64_t rows, int64_t half, GluParams glu) {
  using W = Wide<T>;
  const Glu<typename W::Acc> p(glu);
  for (int64_t r = 0; r < rows; ++r) {
    const T* gate = row<T>(pre, r);
    const T* up = gate + half;
    T* o = row<T>(out, r);
    for (int64_t j = 0; j < half; j += W::kStep) {
      const int64_t n = std::min(W::kStep, half - j);
      auto g = W::load(gate + j, n);
      const auto u = W::load(up + j, n);
      for (int i = 0; i < W::kParts; ++i) g[i] = swiglu(g[i], u[i], p);
      W::store(o + j, g, n);
    }
  }
}

template <typename T>
void backward_rows(Rows grad_out, Rows pre, MutableRows grad_pre, int64_t rows, int64_t half,
                   GluParams glu) {
  using W = Wide<T>;
  const Glu<typename W::Acc> p(glu);
  for (int64_t r = 0; r < rows; ++r) {
    const T* gate = row<T>(pre, r);
    const T* up = gate + half;
    const T* grad = row<T>(grad_out, r);
    T* grad_gate = row<T>(grad_pre, r);
    T* grad_up = grad_gate + half;
    for (int64_t j = 0; j < half; j += W::kStep) {
      const int64_t n = std::min(W::kStep, half - j);
      const auto g = W::load(gate + j, n), u = W::load(up + j, n), d = W::load(grad + j, n);
      std::array<typename W::Acc, W::kParts> dg, du;
      for (int i = 0; i < W::kParts; ++i) swiglu_grad(g[i], u[i], d[i], &dg[i], &du[i], p);
      W::store(grad_gate + j, dg, n);
      W::store(grad_up + j, du, n);
    }
  }
}

// The one switch over dtypes (the types of MOE_KERNELS_DISPATCH_FLOATING).
template <typename Body>
void for_dtype(c10::ScalarType dtype, const Body& body) {
  switch (dtype) {
    case c10::ScalarType::Float:
      return body(float{});
    case c10::ScalarType::Double:
      return body(double{});
    case c10::ScalarType::BFloat16:
      return body(c10::BFloat16{});
    case c10::ScalarType::Half:
      return body(c10::Half{});
    default:
      // The ops check dtypes before they get here.
      __builtin_unreachable();
  }
}

void forward(c10::ScalarType dtype, Rows pre, MutableRows out, int64_t rows, int64_t half,
             GluParams glu) {
  for_dtype(dtype, [&](auto t) { forward_rows<decltype(t)>(pre, out, rows, half, glu); });
}

void backward(c10::ScalarType dtype, Rows grad_out, Rows pre, MutableRows grad_pre, int64_t rows,
              int64_t half, GluParams glu) {
  for_dtype(dtype,
            [&](auto t) { backward_rows<decltype(t)>(grad_out, pre, grad_pre, rows, half, glu); });
}

}  // namespace

extern const SwigluRowKernels kSwigluRowKernels{&forward, &backward};

}  // namespace moe_kernels::gemm::CPU_CAPABILITY
