// Expert-parallel dispatch and combine (SPEC.md section 5), for every device: the transports
// move the rows, transpose_segments orders them by local expert on the device.
//
// Rank r of P owns experts [r * E/P, (r + 1) * E/P). `permute` has already grouped a rank's
// rows by global expert, so the rows for rank p are one contiguous block. ep_plan exchanges
// every rank's [E] counts (one small all-to-all, then the dispatcher's one host
// synchronisation: the splits of the all-to-all-v must be known on the host); every rank then
// holds all P x E counts, so argument errors are found identically on every rank and all of
// them raise, rather than some waiting for the others. ep_dispatch_rows sends the rows (they
// arrive grouped by source rank, then local expert) and transposes the segment grid into local
// expert, then source rank; ep_combine_rows is the exact inverse. Neither synchronises.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "comm/transport.h"
#include "common/checks.h"
#include "common/nvtx.h"

namespace moe_kernels::comm {
namespace {

// Each rank's message: num_experts, hidden size, dtype and number of rows, then its counts.
constexpr int64_t kHeader = 4;

at::Tensor transpose_segments(const at::Tensor& rows, const at::Tensor& counts) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("moe_kernels::transpose_segments", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(rows, counts);
}

// Every rank's header and counts against this rank's: the same checks run on every rank over
// the same P messages, so every rank raises the same error.
void check_messages(const at::Tensor& messages, const at::Tensor& header, const Transport& group) {
  const auto* own = header.const_data_ptr<int64_t>();
  const int64_t num_experts = own[0];
  for (int64_t source = 0; source < messages.size(0); ++source) {
    const auto* message = messages[source].const_data_ptr<int64_t>();
    const auto dtype = [](int64_t code) { return static_cast<c10::ScalarType>(code); };
    TORCH_CHECK(message[0] == own[0] && message[1] == own[1] && message[2] == own[2],
                "expert-parallel dispatch: the ranks disagree on shapes: rank ", source,
                " has num_experts=", message[0], ", hidden size ", message[1], ", dtype ",
                dtype(message[2]), "; rank ", group.rank(), " has num_experts=", own[0],
                ", hidden size ", own[1], ", dtype ", dtype(own[2]), " (", group.describe(), ")");
    int64_t total = 0;
    for (int64_t e = 0; e < num_experts; ++e) {
      const int64_t count = message[kHeader + e];
      TORCH_CHECK(count >= 0, "expert-parallel dispatch: tokens_per_expert must be >= 0, rank ",
                  source, " has ", count, " rows for expert ", e);
      total += count;
    }
    TORCH_CHECK(total == message[3],
                "expert-parallel dispatch: rows.size(0) must equal "
                "tokens_per_expert.sum(), rank ",
                source, " has ", message[3],
                " rows and counts "
                "summing to ",
                total);
  }
}

void check_splits(const std::vector<int64_t>& splits, int64_t group_size, const char* name) {
  TORCH_CHECK(static_cast<int64_t>(splits.size()) == group_size, name,
              " must have one entry per rank of the group (", group_size, "), got ", splits.size());
  for (const int64_t split : splits) TORCH_CHECK(split >= 0, name, " must be >= 0, got ", split);
}

int64_t sum(const std::vector<int64_t>& values) {
  int64_t total = 0;
  for (const int64_t value : values) total += value;
  return total;
}

// The arguments of ep_dispatch_rows / ep_combine_rows: `rows` holds sum(rows_splits) rows and
// recv_counts is the [P, E/P] grid of the rows this rank receives.
std::shared_ptr<Transport> check_move_args(const at::Tensor& rows, const at::Tensor& recv_counts,
                                           const std::vector<int64_t>& send_splits,
                                           const std::vector<int64_t>& recv_splits,
                                           const std::vector<int64_t>& rows_splits,
                                           const char* rows_splits_name,
                                           const std::string& group_name,
                                           const std::string& transport_kind) {
  check_dim(rows, 2, "rows");
  check_floating(rows, "rows");
  check_dim(recv_counts, 2, "recv_counts");
  check_integer(recv_counts, "recv_counts");
  check_same_device(recv_counts, rows, "recv_counts", "rows");
  auto transport = transport_for(group_name, transport_kind);
  check_splits(send_splits, transport->size(), "send_splits");
  check_splits(recv_splits, transport->size(), "recv_splits");
  check_size(recv_counts, 0, transport->size(), "recv_counts", "the group size");
  TORCH_CHECK(rows.size(0) == sum(rows_splits), "rows.size(0) must equal sum(", rows_splits_name,
              ")=", sum(rows_splits), ", got ", rows.size(0));
  return transport;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ep_plan(
    const at::Tensor& rows, const at::Tensor& tokens_per_expert, const std::string& group_name,
    const std::string& transport_kind) {
  MOE_KERNELS_NVTX_RANGE("ep_plan");
  check_dim(rows, 2, "rows");
  check_floating(rows, "rows");
  check_dim(tokens_per_expert, 1, "tokens_per_expert");
  check_integer(tokens_per_expert, "tokens_per_expert");
  check_same_device(tokens_per_expert, rows, "tokens_per_expert", "rows");
  const auto transport = transport_for(group_name, transport_kind);
  const int64_t group_size = transport->size(), rank = transport->rank();
  const int64_t num_experts = tokens_per_expert.numel();
  TORCH_CHECK(num_experts % group_size == 0, "num_experts (tokens_per_expert.numel()=", num_experts,
              ") must be divisible by the expert-parallel group size ", group_size, " (",
              transport->describe(), ")");
  const int64_t local_experts = num_experts / group_size;
  const auto header = at::tensor(
      {num_experts, rows.size(1), static_cast<int64_t>(rows.scalar_type()), rows.size(0)},
      at::kLong);
  const auto message =
      at::cat({header.to(rows.device()), tokens_per_expert.to(at::kLong)}).unsqueeze(0);
  auto messages = at::empty({group_size, kHeader + num_experts}, message.options());
  const std::vector<int64_t> one_each(group_size, 1);
  transport->all_to_all_v(message.expand({group_size, -1}).contiguous(), messages, one_each,
                          one_each);
  const auto host = transport->to_host(messages);
  check_messages(host, header, *transport);

  const auto all_counts = messages.narrow(1, kHeader, num_experts);  // [P, E]: rank, expert
  const auto host_counts = host.narrow(1, kHeader, num_experts);
  const auto send_splits = host_counts[rank].view({group_size, local_experts}).sum(1);
  const auto recv_counts = host_counts.narrow(1, rank * local_experts, local_experts).contiguous();
  const auto recv_counts_device =
      all_counts.narrow(1, rank * local_experts, local_experts).contiguous();
  return {send_splits, recv_counts, recv_counts_device, all_counts.sum(0)};
}

at::Tensor ep_dispatch_rows(const at::Tensor& rows, const at::Tensor& recv_counts,
                            at::IntArrayRef send_splits_in, at::IntArrayRef recv_splits_in,
                            const std::string& group_name, const std::string& transport_kind) {
  MOE_KERNELS_NVTX_RANGE("ep_dispatch_rows");
  const std::vector<int64_t> send_splits = send_splits_in.vec(), recv_splits = recv_splits_in.vec();
  const auto transport = check_move_args(rows, recv_counts, send_splits, recv_splits, send_splits,
                                         "send_splits", group_name, transport_kind);
  auto received = at::empty({sum(recv_splits), rows.size(1)}, rows.options());
  transport->all_to_all_v(rows.contiguous(), received, send_splits, recv_splits);
  return transpose_segments(received, recv_counts);  // (source, expert) -> (expert, source)
}

at::Tensor ep_combine_rows(const at::Tensor& expert_rows, const at::Tensor& recv_counts,
                           at::IntArrayRef send_splits_in, at::IntArrayRef recv_splits_in,
                           const std::string& group_name, const std::string& transport_kind) {
  MOE_KERNELS_NVTX_RANGE("ep_combine_rows");
  const std::vector<int64_t> send_splits = send_splits_in.vec(), recv_splits = recv_splits_in.vec();
  const auto transport = check_move_args(expert_rows, recv_counts, send_splits, recv_splits,
                                         recv_splits, "recv_splits", group_name, transport_kind);
  const auto by_source = transpose_segments(expert_rows, recv_counts.t());
  auto rows = at::empty({sum(send_splits), expert_rows.size(1)}, expert_rows.options());
  transport->all_to_all_v(by_source, rows, recv_splits, send_splits);
  return rows;
}

TORCH_LIBRARY_IMPL(moe_kernels, CompositeExplicitAutograd, m) {
  m.impl("ep_plan", &ep_plan);
  m.impl("ep_dispatch_rows", &ep_dispatch_rows);
  m.impl("ep_combine_rows", &ep_combine_rows);
}

}  // namespace moe_kernels::comm
