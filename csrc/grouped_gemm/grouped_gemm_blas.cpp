// The grouped GEMM as one library GEMM per expert segment, on views of the operands (no copies):
// MKL / OpenBLAS / oneDNN on the CPU (bf16 and fp16 accumulate in fp32), cuBLAS on CUDA.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <atomic>
#include <numeric>
#include <vector>

#include "grouped_gemm/grouped_gemm.h"

namespace moe_kernels::gemm {
namespace {

// Segment sizes on the host, checked: non-negative, and covering exactly `num_rows` rows.
std::vector<int64_t> segment_sizes(const at::Tensor& tokens_per_expert, int64_t num_rows) {
  const at::Tensor counts = tokens_per_expert.to(at::kCPU, at::kLong).contiguous();
  const int64_t* c = counts.const_data_ptr<int64_t>();
  std::vector<int64_t> sizes(c, c + counts.numel());
  int64_t total = 0;
  for (size_t e = 0; e < sizes.size(); ++e) {
    TORCH_CHECK(sizes[e] >= 0, "tokens_per_expert must be >= 0, got ", sizes[e], " for expert ", e);
    total += sizes[e];
  }
  TORCH_CHECK(total == num_rows, "tokens_per_expert must sum to the number of rows of a (",
              num_rows, "), got ", total);
  return sizes;
}

// Runs body(e, first_row) for every expert segment. On the CPU, with many more busy experts
// than threads (8 per thread), each thread runs whole experts, one GEMM at a time on one core:
// a GEMM of a few hundred rows split over all cores spends much of its time synchronising them
// (bf16 forward at the DeepSeek-V3 shape: 57 ms instead of 74 on 2 cores). Threads take the
// largest remaining expert first, so unequal loads still finish together. On CUDA, or with a
// few large experts (whose big GEMMs the library's own threading serves well), one segment
// after the other, each GEMM using the whole machine.
template <typename Body>
void for_each_segment(const std::vector<int64_t>& sizes, bool on_cpu, const Body& body) {
  const int64_t num_experts = static_cast<int64_t>(sizes.size());
  std::vector<int64_t> first_row(sizes.size());
  std::exclusive_scan(sizes.begin(), sizes.end(), first_row.begin(), int64_t{0});
  const int64_t threads = at::get_num_threads();
  const int64_t busy = std::count_if(sizes.begin(), sizes.end(), [](int64_t s) { return s > 0; });
  if (!on_cpu || threads == 1 || busy < 8 * threads) {
    for (int64_t e = 0; e < num_experts; ++e) body(e, first_row[e]);
    return;
  }
  std::vector<int64_t> order(sizes.size());
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t x, int64_t y) { return sizes[x] > sizes[y]; });
  std::atomic<int64_t> next{0};
  // The caller's dispatch state (below autograd, inference mode) is thread-local: workers
  // take it over, or at::mm would dispatch to autograd again.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    const at::ThreadLocalStateGuard guard(caller_state);
    for (int64_t i = next++; i < num_experts; i = next++) body(order[i], first_row[order[i]]);
  });
}

}  // namespace

at::Tensor grouped_gemm_blas(const at::Tensor& a_in, const at::Tensor& b_in,
                             const at::Tensor& tokens_per_expert, bool trans_b,
                             const SegmentEpilogue& epilogue) {
  const std::vector<int64_t> sizes = segment_sizes(tokens_per_expert, a_in.size(0));
  const at::Tensor a = a_in.contiguous();
  const at::Tensor b = b_in.contiguous();
  const int64_t n = b.size(trans_b ? 1 : 2);
  auto c = at::empty({a.size(0), n}, a.options());
  for_each_segment(sizes, a.is_cpu(), [&](int64_t e, int64_t row) {
    if (sizes[e] == 0) return;
    const at::Tensor weight = trans_b ? b.select(0, e).t() : b.select(0, e);
    auto c_e = c.narrow(0, row, sizes[e]);
    at::mm_out(c_e, a.narrow(0, row, sizes[e]), weight);
    if (epilogue) epilogue(c_e, row);
  });
  return c;
}

// grad_b[e] = a_e^T @ grad_c_e ([K, N]), or grad_c_e^T @ a_e ([N, K]) with trans_b; experts
// with no rows get zeros.
at::Tensor grouped_gemm_wgrad_blas(const at::Tensor& a_in, const at::Tensor& grad_c_in,
                                   const at::Tensor& tokens_per_expert, bool trans_b) {
  const std::vector<int64_t> sizes = segment_sizes(tokens_per_expert, a_in.size(0));
  const at::Tensor a = a_in.contiguous();
  const at::Tensor grad_c = grad_c_in.contiguous();
  const int64_t num_experts = static_cast<int64_t>(sizes.size());
  const int64_t k = a.size(1), n = grad_c.size(1);
  auto grad_b = trans_b ? at::empty({num_experts, n, k}, a.options())
                        : at::empty({num_experts, k, n}, a.options());
  for_each_segment(sizes, a.is_cpu(), [&](int64_t e, int64_t row) {
    auto out = grad_b.select(0, e);
    if (sizes[e] == 0) {
      out.zero_();
      return;
    }
    const at::Tensor a_e = a.narrow(0, row, sizes[e]);
    const at::Tensor g_e = grad_c.narrow(0, row, sizes[e]);
    if (trans_b) {
      at::mm_out(out, g_e.t(), a_e);
    } else {
      at::mm_out(out, a_e.t(), g_e);
    }
  });
  return grad_b;
}

}  // namespace moe_kernels::gemm
