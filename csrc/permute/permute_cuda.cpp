// The permute family for CUDA tensors: checks, device guard, allocation, current stream.
// Compiled twice: for the CUDA build, and for the CPU emulator (moe_kernels.emulate()).
// Unlike the CPU ops, these do not check the index ranges of ids and row maps (that would
// synchronise the host with the device): out-of-range entries are skipped, as each launcher
// says. The only synchronisation is permute's read of its row count when align > 1.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "common/dispatch.h"
#include "common/nvtx.h"
#include "device/torch_device.h"
#include "permute/gather_launch.h"
#include "permute/permute.h"
#include "permute/row_map_launch.h"

namespace moe_kernels::permute::MOE_KERNELS_TARGET {
namespace {

// rows[r] = weights[p] * hidden[p / topk] for p = source_pair[r], zero where p is -1.
at::Tensor gather_rows(const at::Tensor& hidden, int64_t topk, const at::Tensor& source_pair,
                       int64_t num_rows, const at::Tensor& weights) {
  auto rows = at::empty({num_rows, hidden.size(1)}, hidden.options());
  MOE_KERNELS_DISPATCH_FLOATING(hidden.scalar_type(), "gather_rows_cuda", [&] {
    using acc = at::opmath_type<scalar_t>;
    device::check_launch(
        launch_gather_rows(device::device_ptr<scalar_t>(hidden), hidden.size(1), topk,
                           source_pair.const_data_ptr<int64_t>(), num_rows,
                           weights.defined() ? weights.const_data_ptr<acc>() : nullptr,
                           device::mutable_device_ptr<scalar_t>(rows), device::current_stream()));
  });
  return rows;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_cuda(const at::Tensor& hidden_in,
                                                            const at::Tensor& topk_ids_in,
                                                            int64_t num_experts, int64_t align) {
  MOE_KERNELS_NVTX_RANGE("permute");
  check_permute_args(hidden_in, topk_ids_in, num_experts, align);
  TORCH_CHECK(num_experts <= kMaxPermuteExperts, "num_experts must be <= ", kMaxPermuteExperts,
              " on CUDA, got ", num_experts);
  const device::DeviceGuard guard(hidden_in.device());
  const at::Tensor hidden = hidden_in.contiguous();
  const at::Tensor ids = topk_ids_in.contiguous();
  const int64_t num_pairs = ids.numel();
  PairChunks chunks;
  device::check_launch(plan_pair_chunks(num_pairs, &chunks));
  const auto int64 = ids.options().dtype(at::kLong);
  auto chunk_rows = at::empty({chunks.num_chunks, num_experts}, int64);
  auto row_map = at::empty(ids.sizes(), int64);
  auto tokens_per_expert = at::empty({num_experts}, int64);
  auto num_rows = at::empty({1}, int64);
  // Sized without knowing R: every padded segment holds a pair, so at most min(pairs, experts)
  // segments add fewer than align rows each.
  auto source_pair =
      at::full({num_pairs + std::min(num_pairs, num_experts) * (align - 1)}, -1, int64);
  MOE_KERNELS_DISPATCH_INDEX(ids.scalar_type(), "permute_cuda", [&] {
    device::check_launch(launch_row_map(
        ids.const_data_ptr<index_t>(), num_pairs, num_experts, align, chunks,
        chunk_rows.mutable_data_ptr<int64_t>(), tokens_per_expert.mutable_data_ptr<int64_t>(),
        num_rows.mutable_data_ptr<int64_t>(), row_map.mutable_data_ptr<int64_t>(),
        source_pair.mutable_data_ptr<int64_t>(), device::current_stream()));
  });
  // Without padding R is the number of pairs. With it, R depends on the counts, and allocating
  // rows needs it on the host: the op's one device-to-host copy (a synchronisation).
  const int64_t R = align == 1 || num_pairs == 0 ? num_pairs : num_rows.item<int64_t>();
  return {gather_rows(hidden, ids.size(1), source_pair, R, at::Tensor()), row_map,
          tokens_per_expert};
}

at::Tensor permute_with_map_cuda(const at::Tensor& hidden_in, const at::Tensor& row_map_in,
                                 const std::optional<at::Tensor>& weights, int64_t num_rows) {
  MOE_KERNELS_NVTX_RANGE("permute_with_map");
  check_permute_with_map_args(hidden_in, row_map_in, weights, num_rows);
  const device::DeviceGuard guard(hidden_in.device());
  const at::Tensor hidden = hidden_in.contiguous();
  const at::Tensor row_map = row_map_in.to(at::kLong).contiguous();
  auto source_pair = at::full({num_rows}, -1, row_map.options());
  device::check_launch(launch_invert_row_map(row_map.const_data_ptr<int64_t>(), row_map.numel(),
                                             num_rows, source_pair.mutable_data_ptr<int64_t>(),
                                             device::current_stream()));
  return gather_rows(hidden, row_map.size(1), source_pair, num_rows,
                     weights_in_opmath(weights, hidden.scalar_type()));
}

at::Tensor unpermute_cuda(const at::Tensor& rows_in, const at::Tensor& row_map_in,
                          const std::optional<at::Tensor>& weights) {
  MOE_KERNELS_NVTX_RANGE("unpermute");
  check_unpermute_args(rows_in, row_map_in, weights);
  const device::DeviceGuard guard(rows_in.device());
  const at::Tensor rows = rows_in.contiguous();
  const at::Tensor row_map = row_map_in.to(at::kLong).contiguous();
  const at::Tensor w = weights_in_opmath(weights, rows.scalar_type());
  auto out = at::empty({row_map.size(0), rows.size(1)}, rows.options());
  MOE_KERNELS_DISPATCH_FLOATING(rows.scalar_type(), "unpermute_cuda", [&] {
    using acc = at::opmath_type<scalar_t>;
    device::check_launch(
        launch_unpermute(device::device_ptr<scalar_t>(rows), rows.size(0), rows.size(1),
                         row_map.const_data_ptr<int64_t>(), row_map.size(0), row_map.size(1),
                         w.defined() ? w.const_data_ptr<acc>() : nullptr,
                         device::mutable_device_ptr<scalar_t>(out), device::current_stream()));
  });
  return out;
}

at::Tensor unpermute_weights_grad_cuda(const at::Tensor& grad_in, const at::Tensor& rows_in,
                                       const at::Tensor& row_map_in) {
  MOE_KERNELS_NVTX_RANGE("unpermute_weights_grad");
  check_unpermute_weights_grad_args(grad_in, rows_in, row_map_in);
  const device::DeviceGuard guard(rows_in.device());
  const at::Tensor rows = rows_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor row_map = row_map_in.to(at::kLong).contiguous();
  auto grad_weights =
      at::empty(row_map.sizes(), rows.options().dtype(opmath_dtype(rows.scalar_type())));
  MOE_KERNELS_DISPATCH_FLOATING(rows.scalar_type(), "unpermute_weights_grad_cuda", [&] {
    using acc = at::opmath_type<scalar_t>;
    device::check_launch(launch_unpermute_weights_grad(
        device::device_ptr<scalar_t>(grad), device::device_ptr<scalar_t>(rows), rows.size(0),
        rows.size(1), row_map.const_data_ptr<int64_t>(), row_map.size(0), row_map.size(1),
        grad_weights.mutable_data_ptr<acc>(), device::current_stream()));
  });
  return grad_weights;
}

}  // namespace moe_kernels::permute::MOE_KERNELS_TARGET

#if !defined(MOE_KERNELS_EMULATOR)
TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) {
  m.impl("permute", &moe_kernels::permute::cuda::permute_cuda);
  m.impl("permute_with_map", &moe_kernels::permute::cuda::permute_with_map_cuda);
  m.impl("unpermute", &moe_kernels::permute::cuda::unpermute_cuda);
  m.impl("unpermute_weights_grad", &moe_kernels::permute::cuda::unpermute_weights_grad_cuda);
}
#endif
