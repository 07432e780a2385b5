// drop_over_capacity for CUDA tensors: checks, device guard, allocation, current stream. Compiled
// twice: for the CUDA build, and for the CPU emulator (moe_kernels.emulate()). Ids are not
// range-checked (that would synchronise the host with the device): a pair whose id is outside
// [0, num_experts), -1 included, is in no expert and stays -1.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "capacity/capacity.h"
#include "capacity/capacity_launch.h"
#include "common/dispatch.h"
#include "common/nvtx.h"
#include "device/torch_device.h"
#include "permute/row_map_launch.h"

namespace moe_kernels::capacity::MOE_KERNELS_TARGET {

namespace row_map = permute::MOE_KERNELS_TARGET;

std::tuple<at::Tensor, at::Tensor, at::Tensor> drop_over_capacity_cuda(
    const at::Tensor& topk_ids_in, const std::optional<at::Tensor>& topk_weights,
    int64_t num_experts, int64_t capacity, c10::string_view policy) {
  MOE_KERNELS_NVTX_RANGE("drop_over_capacity");
  const DropPolicy drop =
      check_drop_over_capacity_args(topk_ids_in, topk_weights, num_experts, capacity, policy);
  TORCH_CHECK(num_experts <= row_map::kMaxPermuteExperts,
              "num_experts must be <= ", row_map::kMaxPermuteExperts, " on CUDA, got ",
              num_experts);
  const device::DeviceGuard guard(topk_ids_in.device());
  const at::Tensor ids = topk_ids_in.contiguous();
  const int64_t num_pairs = ids.numel();
  const auto int64 = ids.options().dtype(at::kLong);
  auto kept_ids = at::full(ids.sizes(), -1, int64);
  auto slots = at::full(ids.sizes(), -1, int64);
  auto dropped = at::zeros({num_experts}, int64);
  if (num_pairs == 0) return {kept_ids, slots, dropped};

  // Each expert's pairs in pair order: permute's row map, without padding.
  row_map::PairChunks chunks;
  device::check_launch(row_map::plan_pair_chunks(num_pairs, &chunks));
  auto chunk_rows = at::empty({chunks.num_chunks, num_experts}, int64);
  auto tokens_per_expert = at::empty({num_experts}, int64);
  auto num_rows = at::empty({1}, int64);
  auto pair_rows = at::empty({num_pairs}, int64);
  auto source_pair = at::empty({num_pairs}, int64);
  MOE_KERNELS_DISPATCH_INDEX(ids.scalar_type(), "drop_over_capacity_cuda", [&] {
    device::check_launch(row_map::launch_row_map(
        ids.const_data_ptr<index_t>(), num_pairs, num_experts, /*align=*/1, chunks,
        chunk_rows.mutable_data_ptr<int64_t>(), tokens_per_expert.mutable_data_ptr<int64_t>(),
        num_rows.mutable_data_ptr<int64_t>(), pair_rows.mutable_data_ptr<int64_t>(),
        source_pair.mutable_data_ptr<int64_t>(), device::current_stream()));
  });

  const bool by_weight = drop == DropPolicy::kProbs;
  // Half weights widen exactly, so they rank as they are.
  const at::Tensor weights =
      by_weight ? topk_weights->to(opmath_dtype(topk_weights->scalar_type())).contiguous()
                : at::empty({0}, ids.options().dtype(at::kFloat));
  auto keys = at::empty({by_weight ? num_pairs : 0}, int64);
  AT_DISPATCH_FLOATING_TYPES(weights.scalar_type(), "drop_over_capacity_cuda", [&] {
    device::check_launch(launch_drop_over_capacity<scalar_t>(
        by_weight ? weights.const_data_ptr<scalar_t>() : nullptr,
        source_pair.const_data_ptr<int64_t>(), chunk_rows.const_data_ptr<int64_t>(),
        tokens_per_expert.const_data_ptr<int64_t>(), num_experts, capacity,
        reinterpret_cast<uint64_t*>(keys.mutable_data_ptr<int64_t>()),
        kept_ids.mutable_data_ptr<int64_t>(), slots.mutable_data_ptr<int64_t>(),
        dropped.mutable_data_ptr<int64_t>(), device::current_stream()));
  });
  return {kept_ids, slots, dropped};
}

}  // namespace moe_kernels::capacity::MOE_KERNELS_TARGET

#if !defined(MOE_KERNELS_EMULATOR)
TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) {
  m.impl("drop_over_capacity", &moe_kernels::capacity::cuda::drop_over_capacity_cuda);
}
#endif
