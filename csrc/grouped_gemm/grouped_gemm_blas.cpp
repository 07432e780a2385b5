// The grouped GEMM as one library GEMM per expert segment, on views of the operands (no copies):
// MKL / OpenBLAS / oneDNN on the CPU (bf16 and fp16 accumulate in fp32), cuBLAS on CUDA.
//
// Two choices on the CPU, per call, from measurements on 2 cores of an AMD EPYC (Zen 3, AVX2,
// no AVX-512, MKL 2024.2, torch 2.14; fastest of 4 calls, every product of a forward+backward
// at the DeepSeek-V3-like shape (64 experts, 2 to 1463 rows each, hidden 1024, FFN 512) and the
// Mixtral-like one (8 experts, 34 to 1455 rows, FFN 3584); benchmarks/results/cpu/amd-epyc-zen3/
// grouped_gemm_cpu_strategy.md has the table):
// - Scheduling. One MKL sgemm on 2 threads runs at 154-166 GFLOP/s where one thread runs at
//   89-94 (83-89% of twice that), so whole experts per thread, one single-threaded GEMM each,
//   win whenever the experts split evenly over the threads: every fp32 product at both shapes,
//   by 5-30% (the SwiGLU product at the Mixtral shape 448 ms against 519-667, its dgrad 352
//   against 383). By the same figures they lose once the busiest thread's experts pass an even
//   share by more than 1 / 0.87 (one large expert that the other threads would wait out); then
//   one expert at a time with all threads.
// - bf16 / fp16 where torch has no native GEMM for the type (no AVX-512 / AMX: oneDNN is not
//   used, see torch.ops.mkldnn._is_mkldnn_bf16_supported): torch's fallback GEMM runs at 10
//   GFLOP/s per thread with a transposed weight and about 0.5 without one (a dgrad: 16-58 s
//   against 0.16-0.6 s), so each segment is multiplied in fp32 (exact copies of its operands,
//   fp32 accumulation as the library's bf16 GEMM does, one rounding to the output).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <atomic>
#include <numeric>
#include <vector>

#include "common/parallel.h"
#include "grouped_gemm/grouped_gemm.h"

namespace moe_kernels::gemm {

std::vector<int64_t> segment_sizes(const at::Tensor& tokens_per_expert, int64_t num_rows) {
  const at::Tensor counts = tokens_per_expert.to(at::kCPU, at::kLong).contiguous();
  const int64_t* c = counts.const_data_ptr<int64_t>();
  std::vector<int64_t> sizes(c, c + counts.numel());
  int64_t total = 0;
  for (size_t e = 0; e < sizes.size(); ++e) {
    TORCH_CHECK(sizes[e] >= 0, "tokens_per_expert must be >= 0, got ", sizes[e], " for expert ", e);
    total += sizes[e];
  }
  TORCH_CHECK(total <= num_rows, "tokens_per_expert must sum to at most the number of rows of a (",
              num_rows, "), got ", total);
  return sizes;
}

// Whole experts per thread lose to one expert at a time on all threads once the busiest thread's
// rows (experts dealt largest first to the least loaded thread, as for_each_segment runs them)
// exceed an even share by more than the threaded GEMM's loss: 1 / 0.87, the efficiency above.
constexpr double kMaxImbalance = 1.15;

// Whether to run whole experts per thread; `order` has the segments largest first, the order
// in which the threads take them.
bool experts_per_thread(const std::vector<int64_t>& sizes, const std::vector<int64_t>& order,
                        int64_t threads) {
  if (threads == 1) return false;
  std::vector<int64_t> load(threads, 0);
  int64_t total = 0;
  for (const int64_t e : order) {
    *std::min_element(load.begin(), load.end()) += sizes[e];
    total += sizes[e];
  }
  const int64_t busiest = *std::max_element(load.begin(), load.end());
  return static_cast<double>(busiest) * threads <= kMaxImbalance * static_cast<double>(total);
}

namespace {

// A product that is not kept is computed in blocks of rows of at most this many bytes, into a
// buffer each expert reuses. Small enough that glibc's malloc serves it from memory it already
// has (its mmap threshold rises to the size of a freed block up to 32 MB; a whole-layer buffer
// is fresh pages, zeroed by the kernel on first touch: see grouped_gemm.h). Large enough for the
// library GEMM's full speed: on the Xeon of benchmarks/results (AMX), a 1024 x 7168 bf16
// product runs at 72% of its 1024-row speed with 256 rows, 89% with 512 (fp32: 96%, 99%).
constexpr int64_t kDiscardedProductBlockBytes = int64_t{16} << 20;

// Runs body(e, first_row) for every expert segment: on the CPU whole experts per thread when
// they balance (see experts_per_thread), else (and on CUDA) one segment after the other.
template <typename Body>
void for_each_segment(const std::vector<int64_t>& sizes, bool on_cpu, const Body& body) {
  const int64_t num_experts = static_cast<int64_t>(sizes.size());
  std::vector<int64_t> first_row(sizes.size());
  std::exclusive_scan(sizes.begin(), sizes.end(), first_row.begin(), int64_t{0});
  const int64_t threads = at::get_num_threads();
  std::vector<int64_t> order(sizes.size());
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t x, int64_t y) { return sizes[x] > sizes[y]; });
  if (!on_cpu || !experts_per_thread(sizes, order, threads)) {
    for (int64_t e = 0; e < num_experts; ++e) body(e, first_row[e]);
    return;
  }
  std::atomic<int64_t> next{0};
  parallel_for_in_caller_state(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t i = next++; i < num_experts; i = next++) body(order[i], first_row[order[i]]);
  });
}

// Whether torch has a native GEMM for a's dtype here (see the top of the file).
bool native_gemm(const at::Tensor& a) {
  if (!a.is_cpu() || !at::isReducedFloatingType(a.scalar_type())) return true;
  static const auto query = [](const char* op) {
    return c10::Dispatcher::singleton().findSchemaOrThrow(op, "").typed<bool()>().call();
  };
  static const bool bf16 = query("mkldnn::_is_mkldnn_bf16_supported");
  static const bool fp16 = query("mkldnn::_is_mkldnn_fp16_supported");
  return a.scalar_type() == at::kBFloat16 ? bf16 : fp16;
}

// out = x @ y: by the library in the operands' dtype, or in fp32 and rounded once into out.
void mm_into(at::Tensor& out, const at::Tensor& x, const at::Tensor& y, bool native) {
  if (native) {
    at::mm_out(out, x, y);
  } else {
    out.copy_(at::mm(x.to(at::kFloat), y.to(at::kFloat)));
  }
}

}  // namespace

at::Tensor grouped_gemm_blas(const at::Tensor& a_in, const at::Tensor& b_in,
                             const at::Tensor& tokens_per_expert, bool trans_b,
                             const SegmentEpilogue& epilogue, bool keep_product) {
  TORCH_INTERNAL_ASSERT(keep_product || epilogue, "a product that is not kept needs an epilogue");
  // The out= GEMMs below are refused on views of tensors that require grad unless autograd is
  // excluded, which no autograd kernel has done for the backward-only ops (grouped_gemm_wgrad,
  // swiglu_backward) when they are called directly.
  const at::AutoDispatchBelowAutograd below_autograd;
  const std::vector<int64_t> sizes = segment_sizes(tokens_per_expert, a_in.size(0));
  const at::Tensor a = a_in.contiguous();
  const at::Tensor b = b_in.contiguous();
  const int64_t n = b.size(trans_b ? 1 : 2);
  auto c = at::empty({keep_product ? a.size(0) : 0, n}, a.options());
  const bool native = native_gemm(a);
  for_each_segment(sizes, a.is_cpu(), [&](int64_t e, int64_t row) {
    if (sizes[e] == 0) return;
    const at::Tensor weight = trans_b ? b.select(0, e).t() : b.select(0, e);
    // A kept product is one block, in place; one that is not, blocks of a reused buffer.
    const int64_t block = keep_product
                              ? sizes[e]
                              : std::clamp<int64_t>(kDiscardedProductBlockBytes /
                                                        std::max<int64_t>(1, n * a.element_size()),
                                                    1, sizes[e]);
    const at::Tensor scratch = keep_product ? at::Tensor() : at::empty({block, n}, a.options());
    for (int64_t r = 0; r < sizes[e]; r += block) {
      const int64_t rows = std::min(block, sizes[e] - r);
      auto c_r = keep_product ? c.narrow(0, row + r, rows) : scratch.narrow(0, 0, rows);
      mm_into(c_r, a.narrow(0, row + r, rows), weight, native);
      if (epilogue) epilogue(c_r, row + r);
    }
  });
  return c;
}

// grad_b[e] = a_e^T @ grad_c_e ([K, N]), or grad_c_e^T @ a_e ([N, K]) with trans_b; experts
// with no rows get zeros.
at::Tensor grouped_gemm_wgrad_blas(const at::Tensor& a_in, const at::Tensor& grad_c_in,
                                   const at::Tensor& tokens_per_expert, bool trans_b) {
  const at::AutoDispatchBelowAutograd below_autograd;  // as in grouped_gemm_blas
  const std::vector<int64_t> sizes = segment_sizes(tokens_per_expert, a_in.size(0));
  const at::Tensor a = a_in.contiguous();
  const at::Tensor grad_c = grad_c_in.contiguous();
  const int64_t num_experts = static_cast<int64_t>(sizes.size());
  const int64_t k = a.size(1), n = grad_c.size(1);
  auto grad_b = trans_b ? at::empty({num_experts, n, k}, a.options())
                        : at::empty({num_experts, k, n}, a.options());
  const bool native = native_gemm(a);
  for_each_segment(sizes, a.is_cpu(), [&](int64_t e, int64_t row) {
    auto out = grad_b.select(0, e);
    if (sizes[e] == 0) {
      out.zero_();
      return;
    }
    const at::Tensor a_e = a.narrow(0, row, sizes[e]);
    const at::Tensor g_e = grad_c.narrow(0, row, sizes[e]);
    if (trans_b) {
      mm_into(out, g_e.t(), a_e, native);
    } else {
      mm_into(out, a_e.t(), g_e, native);
    }
  });
  return grad_b;
}

}  // namespace moe_kernels::gemm
