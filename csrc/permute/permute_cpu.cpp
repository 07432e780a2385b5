// permute / unpermute on the CPU (SPEC.md section 3): stable expert-major order of the
// (token, slot) rows, optional padding of each expert's segment to `align` rows, and the
// weighted combine with accumulation in opmath (fp32 for half types). 64-bit row offsets. Id -1
// (and row -1) marks a pair dropped over capacity: it has no row and adds nothing.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "common/dispatch.h"
#include "common/nvtx.h"
#include "emu/cpu_or_emulated.h"
#include "permute/permute.h"
#include "permute/row_map_cpu.h"

namespace moe_kernels::permute {
namespace {

constexpr int64_t kPairsPerChunk = 1 << 14;

}  // namespace

// Chunks of pairs are counted in parallel; each chunk then starts, inside every expert's
// segment, after the pairs of the chunks before it, so the order is stable whatever the threads
// do.
int64_t compute_row_map(const int64_t* ids, int64_t num_pairs, int64_t num_experts, int64_t align,
                        int64_t* row_map, int64_t* tokens_per_expert,
                        std::vector<int64_t>& source_pair) {
  const int64_t num_chunks =
      std::max<int64_t>(1, (num_pairs + kPairsPerChunk - 1) / kPairsPerChunk);
  std::vector<int64_t> chunk_rows(num_chunks * num_experts, 0);
  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      int64_t* counts = chunk_rows.data() + c * num_experts;
      const int64_t stop = std::min(num_pairs, (c + 1) * kPairsPerChunk);
      for (int64_t i = c * kPairsPerChunk; i < stop; ++i) {
        if (ids[i] >= 0) ++counts[ids[i]];
      }
    }
  });
  // Turn per-chunk counts into per-chunk starting rows.
  int64_t next_row = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    int64_t row = next_row;
    for (int64_t c = 0; c < num_chunks; ++c) {
      const int64_t count = chunk_rows[c * num_experts + e];
      chunk_rows[c * num_experts + e] = row;
      row += count;
    }
    tokens_per_expert[e] = row - next_row;
    next_row += (tokens_per_expert[e] + align - 1) / align * align;
  }
  // Without padding R is T * k, as on CUDA, where it is known before the counts: the rows of
  // dropped pairs, if any, are zero rows after the kept ones.
  source_pair.assign(align == 1 ? num_pairs : next_row, -1);
  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      int64_t* start = chunk_rows.data() + c * num_experts;
      const int64_t stop = std::min(num_pairs, (c + 1) * kPairsPerChunk);
      for (int64_t i = c * kPairsPerChunk; i < stop; ++i) {
        if (ids[i] < 0) {
          row_map[i] = -1;
          continue;
        }
        const int64_t row = start[ids[i]]++;
        row_map[i] = row;
        source_pair[row] = i;
      }
    }
  });
  return static_cast<int64_t>(source_pair.size());
}

namespace {

// rows[r] = weights[p] * hidden[p / topk] for p = source_pair[r] (a plain copy without
// weights), and zero where p is -1. Written row after row: the writes stream through memory,
// which matters far more than the order of the reads.
template <typename scalar_t>
void gather_rows(const at::Tensor& hidden, const std::vector<int64_t>& source_pair, int64_t topk,
                 const at::Tensor& weights, at::Tensor& rows) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = hidden.size(1);
  const scalar_t* src = hidden.const_data_ptr<scalar_t>();
  const acc_t* w = weights.defined() ? weights.const_data_ptr<acc_t>() : nullptr;
  scalar_t* dst = rows.mutable_data_ptr<scalar_t>();
  const int64_t num_rows = static_cast<int64_t>(source_pair.size());
  at::parallel_for(0, num_rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, H)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t r = begin; r < end; ++r) {
                       scalar_t* y = dst + r * H;
                       const int64_t pair = source_pair[r];
                       if (pair < 0) {
                         std::fill_n(y, H, scalar_t(0));
                       } else if (w == nullptr) {
                         std::memcpy(y, src + (pair / topk) * H, H * sizeof(scalar_t));
                       } else {
                         const scalar_t* x = src + (pair / topk) * H;
                         const acc_t wp = w[pair];
                         for (int64_t h = 0; h < H; ++h)
                           y[h] = static_cast<scalar_t>(wp * static_cast<acc_t>(x[h]));
                       }
                     }
                   });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_cpu(const at::Tensor& hidden_in,
                                                           const at::Tensor& topk_ids_in,
                                                           int64_t num_experts, int64_t align) {
  MOE_KERNELS_NVTX_RANGE("permute");
  check_permute_args(hidden_in, topk_ids_in, num_experts, align);
  check_index_range(topk_ids_in, num_experts, "topk_ids", "num_experts", -1);
  const at::Tensor hidden = hidden_in.contiguous();
  const at::Tensor ids = topk_ids_in.to(at::kLong).contiguous();
  auto row_map = at::empty(ids.sizes(), ids.options());
  auto tokens_per_expert = at::empty({num_experts}, ids.options());
  std::vector<int64_t> source_pair;
  const int64_t num_rows =
      compute_row_map(ids.const_data_ptr<int64_t>(), ids.numel(), num_experts, align,
                      row_map.mutable_data_ptr<int64_t>(),
                      tokens_per_expert.mutable_data_ptr<int64_t>(), source_pair);
  auto rows = at::empty({num_rows, hidden.size(1)}, hidden.options());
  MOE_KERNELS_DISPATCH_FLOATING(hidden.scalar_type(), "permute_cpu", [&] {
    gather_rows<scalar_t>(hidden, source_pair, ids.size(1), at::Tensor(), rows);
  });
  return {rows, row_map, tokens_per_expert};
}

at::Tensor permute_with_map_cpu(const at::Tensor& hidden_in, const at::Tensor& row_map_in,
                                const std::optional<at::Tensor>& weights, int64_t num_rows) {
  MOE_KERNELS_NVTX_RANGE("permute_with_map");
  check_permute_with_map_args(hidden_in, row_map_in, weights, num_rows);
  check_index_range(row_map_in, num_rows, "row_map", "num_rows", -1);
  const at::Tensor row_map = row_map_in.to(at::kLong).contiguous();
  // The inverse map; two pairs writing one row would make the result depend on their order.
  std::vector<int64_t> source_pair(num_rows, -1);
  const int64_t* map = row_map.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < row_map.numel(); ++i) {
    if (map[i] < 0) continue;
    TORCH_CHECK(source_pair[map[i]] < 0, "row_map must not repeat a row, but row ", map[i],
                " appears twice");
    source_pair[map[i]] = i;
  }
  const at::Tensor hidden = hidden_in.contiguous();
  const at::Tensor w = weights_in_opmath(weights, hidden.scalar_type());
  auto rows = at::empty({num_rows, hidden.size(1)}, hidden.options());
  MOE_KERNELS_DISPATCH_FLOATING(hidden.scalar_type(), "permute_with_map_cpu", [&] {
    gather_rows<scalar_t>(hidden, source_pair, row_map.size(1), w, rows);
  });
  return rows;
}

// out[t] = sum_j weights[t, j] * rows[row_map[t, j]], accumulated in opmath; row -1 adds nothing.
at::Tensor unpermute_cpu(const at::Tensor& rows_in, const at::Tensor& row_map_in,
                         const std::optional<at::Tensor>& weights) {
  MOE_KERNELS_NVTX_RANGE("unpermute");
  check_unpermute_args(rows_in, row_map_in, weights);
  check_index_range(row_map_in, rows_in.size(0), "row_map", "rows.size(0)", -1);
  const at::Tensor rows = rows_in.contiguous();
  const at::Tensor row_map = row_map_in.to(at::kLong).contiguous();
  const at::Tensor w = weights_in_opmath(weights, rows.scalar_type());
  const int64_t T = row_map.size(0), K = row_map.size(1), H = rows.size(1);
  auto out = at::empty({T, H}, rows.options());
  MOE_KERNELS_DISPATCH_FLOATING(rows.scalar_type(), "unpermute_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = rows.const_data_ptr<scalar_t>();
    const int64_t* map = row_map.const_data_ptr<int64_t>();
    const acc_t* wp = w.defined() ? w.const_data_ptr<acc_t>() : nullptr;
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, T, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, H * K)),
                     [&](int64_t begin, int64_t end) {
                       std::vector<acc_t> acc(H);
                       for (int64_t t = begin; t < end; ++t) {
                         std::fill(acc.begin(), acc.end(), acc_t(0));
                         for (int64_t j = 0; j < K; ++j) {
                           if (map[t * K + j] < 0) continue;
                           const scalar_t* y = src + map[t * K + j] * H;
                           const acc_t wj = wp ? wp[t * K + j] : acc_t(1);
                           for (int64_t h = 0; h < H; ++h) acc[h] += wj * static_cast<acc_t>(y[h]);
                         }
                         for (int64_t h = 0; h < H; ++h)
                           dst[t * H + h] = static_cast<scalar_t>(acc[h]);
                       }
                     });
  });
  return out;
}

// d(loss)/d(topk_weights)[t, j] = <grad_output[t], rows[row_map[t, j]]>, in opmath; 0 for row -1.
at::Tensor unpermute_weights_grad_cpu(const at::Tensor& grad_in, const at::Tensor& rows_in,
                                      const at::Tensor& row_map_in) {
  MOE_KERNELS_NVTX_RANGE("unpermute_weights_grad");
  check_unpermute_weights_grad_args(grad_in, rows_in, row_map_in);
  check_index_range(row_map_in, rows_in.size(0), "row_map", "rows.size(0)", -1);
  const at::Tensor rows = rows_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor row_map = row_map_in.to(at::kLong).contiguous();
  const int64_t T = row_map.size(0), K = row_map.size(1), H = rows.size(1);
  auto grad_weights = at::empty({T, K}, rows.options().dtype(opmath_dtype(rows.scalar_type())));
  MOE_KERNELS_DISPATCH_FLOATING(rows.scalar_type(), "unpermute_weights_grad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* y = rows.const_data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const int64_t* map = row_map.const_data_ptr<int64_t>();
    acc_t* out = grad_weights.mutable_data_ptr<acc_t>();
    at::parallel_for(0, T, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, H * K)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t t = begin; t < end; ++t) {
                         for (int64_t j = 0; j < K; ++j) {
                           acc_t dot = 0;
                           if (map[t * K + j] >= 0) {
                             const scalar_t* row = y + map[t * K + j] * H;
                             for (int64_t h = 0; h < H; ++h)
                               dot += static_cast<acc_t>(g[t * H + h]) * static_cast<acc_t>(row[h]);
                           }
                           out[t * K + j] = dot;
                         }
                       }
                     });
  });
  return grad_weights;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_kernels, CPU, m) {
  emu::impl_cpu_or_emulated<&permute_cpu, &emulated::permute_cuda>(m, "permute");
  emu::impl_cpu_or_emulated<&permute_with_map_cpu, &emulated::permute_with_map_cuda>(
      m, "permute_with_map");
  emu::impl_cpu_or_emulated<&unpermute_cpu, &emulated::unpermute_cuda>(m, "unpermute");
  emu::impl_cpu_or_emulated<&unpermute_weights_grad_cpu, &emulated::unpermute_weights_grad_cuda>(
      m, "unpermute_weights_grad");
}

}  // namespace moe_kernels::permute
