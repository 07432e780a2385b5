// expert_histogram on the CPU: exact int64 counts of each expert id in topk_ids (any shape).
#include "routing/histogram_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <mutex>

#include "common/dispatch.h"
#include "common/nvtx.h"
#include "emu/cpu_or_emulated.h"
#include "routing/histogram.h"

namespace moe_kernels::routing {
namespace {

at::Tensor expert_histogram_cpu(const at::Tensor& topk_ids_in, int64_t num_experts) {
  MOE_KERNELS_NVTX_RANGE("expert_histogram");
  check_expert_histogram_args(topk_ids_in, num_experts);
  check_index_range(topk_ids_in, num_experts, "topk_ids", "num_experts");
  const at::Tensor topk_ids = topk_ids_in.contiguous();
  auto counts = at::zeros({num_experts}, topk_ids.options().dtype(at::kLong));
  int64_t* counts_ptr = counts.mutable_data_ptr<int64_t>();
  std::mutex merge_mutex;
  MOE_KERNELS_DISPATCH_INDEX(topk_ids.scalar_type(), "expert_histogram_cpu", [&] {
    const index_t* ids = topk_ids.const_data_ptr<index_t>();
    at::parallel_for(0, topk_ids.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
      ChunkHistogram histogram(num_experts);
      for (int64_t i = begin; i < end; ++i) histogram.add(ids[i]);
      histogram.merge_into(counts_ptr, merge_mutex);
    });
  });
  return counts;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_kernels, CPU, m) {
  emu::impl_cpu_or_emulated<&expert_histogram_cpu, &emulated::expert_histogram_cuda>(
      m, "expert_histogram");
}

}  // namespace moe_kernels::routing
