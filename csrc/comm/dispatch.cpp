// Expert-parallel dispatch and combine (SPEC.md section 5), for every device: the transports
// move the rows, transpose_segments orders them by local expert on the device.
//
// Rank r of P owns experts [r * E/P, (r + 1) * E/P). `permute` has already grouped a rank's
// rows by global expert, so the rows for rank p are one contiguous block. ep_plan exchanges
// every rank's [E] counts (one small all-to-all, then the dispatcher's one host
// synchronisation: the splits of the all-to-all-v must be known on the host); every rank then
// holds all P x E counts, so argument errors are found identically on every rank and all of
// them raise, rather than some waiting for the others. ep_dispatch_rows sends the rows grouped by
// local expert, then source rank; ep_combine_rows is the exact inverse. Neither synchronises.
// Both are a start (dispatch.h: the rows travel while the caller computes) and a wait.
//
// Two layouts of the transfer, with the same result: "transpose" moves one segment per peer (an
// all-to-all-v: the rows arrive grouped by source rank, then local expert) and transposes the
// segment grid on the device, a pass over the rows each way; "grouped" moves one segment per
// (peer, local expert) straight into place, point-to-point, without those passes.
#include "comm/dispatch.h"

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

int64_t sum(const std::vector<int64_t>& values) {
  int64_t total = 0;
  for (const int64_t value : values) total += value;
  return total;
}

// Who exchanges how many rows: send[p * L + e] rows go from this rank to local expert e of rank
// p; recv[s * L + e] rows come from rank s to this rank's local expert e.
struct Grids {
  int64_t peers, local;
  std::vector<int64_t> send, recv;

  // Rows per peer (the all-to-all-v's splits).
  std::vector<int64_t> splits(const std::vector<int64_t>& grid) const {
    std::vector<int64_t> out(peers, 0);
    for (int64_t p = 0; p < peers; ++p) {
      for (int64_t e = 0; e < local; ++e) out[p] += grid[p * local + e];
    }
    return out;
  }

  // The grid's segments over rows ordered by peer, then expert (permute's order) or by expert,
  // then peer (the grouped GEMM's); listed peer by peer in expert order either way, so that
  // both ends of a pair list theirs alike.
  std::vector<Segment> segments(const std::vector<int64_t>& grid, bool expert_major) const {
    std::vector<int64_t> first_row(grid.size());
    int64_t row = 0;
    for (int64_t outer = 0; outer < (expert_major ? local : peers); ++outer) {
      for (int64_t inner = 0; inner < (expert_major ? peers : local); ++inner) {
        const int64_t cell = expert_major ? inner * local + outer : outer * local + inner;
        first_row[cell] = row;
        row += grid[cell];
      }
    }
    std::vector<Segment> out;
    for (int64_t p = 0; p < peers; ++p) {
      for (int64_t e = 0; e < local; ++e) {
        const int64_t cell = p * local + e;
        if (grid[cell]) out.push_back({static_cast<int>(p), first_row[cell], grid[cell]});
      }
    }
    return out;
  }
};

void check_grid(const std::vector<int64_t>& grid, int64_t cells, const char* name) {
  TORCH_CHECK(static_cast<int64_t>(grid.size()) == cells, name,
              " must have one entry per (rank, local expert) of the group (", cells, "), got ",
              grid.size());
  for (const int64_t count : grid) TORCH_CHECK(count >= 0, name, " must be >= 0, got ", count);
}

bool grouped_layout(const std::string& layout) {
  TORCH_CHECK(layout == "transpose" || layout == "grouped",
              "layout must be 'transpose' or 'grouped', got '", layout, "'");
  return layout == "grouped";
}

// The arguments of ep_dispatch_rows / ep_combine_rows: recv_counts is the [P, E/P] grid of the
// rows this rank receives (on the rows' device), send_grid and recv_grid the host grids, and
// `rows` holds the rows of the send grid (a dispatch, `rows_are_sent`) or of the receive grid
// (a combine).
std::shared_ptr<Transport> check_move_args(const at::Tensor& rows, const at::Tensor& recv_counts,
                                           const Grids& grids, bool rows_are_sent,
                                           const std::string& group_name,
                                           const std::string& transport_kind) {
  check_dim(rows, 2, "rows");
  check_floating(rows, "rows");
  check_dim(recv_counts, 2, "recv_counts");
  check_integer(recv_counts, "recv_counts");
  check_same_device(recv_counts, rows, "recv_counts", "rows");
  auto transport = transport_for(group_name, transport_kind);
  check_size(recv_counts, 0, transport->size(), "recv_counts", "the group size");
  check_grid(grids.send, grids.peers * grids.local, "send_grid");
  check_grid(grids.recv, grids.peers * grids.local, "recv_grid");
  const char* name = rows_are_sent ? "send_grid" : "recv_grid";
  const int64_t expected = sum(rows_are_sent ? grids.send : grids.recv);
  TORCH_CHECK(rows.size(0) == expected, "rows.size(0) must equal sum(", name, ")=", expected,
              ", got ", rows.size(0));
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
  const auto send_grid = host_counts[rank].view({group_size, local_experts});
  const auto recv_counts = host_counts.narrow(1, rank * local_experts, local_experts).contiguous();
  const auto recv_counts_device =
      all_counts.narrow(1, rank * local_experts, local_experts).contiguous();
  return {send_grid, recv_counts, recv_counts_device, all_counts.sum(0)};
}

PendingRows::PendingRows(std::unique_ptr<Exchange> exchange, at::Tensor received,
                         std::optional<at::Tensor> transpose_counts)
    : exchange_(std::move(exchange)),
      received_(std::move(received)),
      transpose_counts_(std::move(transpose_counts)) {}

void PendingRows::arrive() {
  if (!exchange_) return;
  const auto exchange = std::move(exchange_);
  exchange->wait();
}

at::Tensor PendingRows::take() {
  TORCH_CHECK(received_.has_value(), "rows in flight are taken once");
  arrive();
  auto rows = std::move(*received_);
  received_.reset();
  return transpose_counts_ ? transpose_segments(rows, *transpose_counts_) : rows;
}

PendingRows start_dispatch_rows(const at::Tensor& rows, const at::Tensor& recv_counts,
                                const std::vector<int64_t>& send_grid,
                                const std::vector<int64_t>& recv_grid,
                                const std::string& group_name, const std::string& transport_kind,
                                const std::string& layout) {
  MOE_KERNELS_NVTX_RANGE("ep_dispatch_rows.start");
  const Grids grids{recv_counts.size(0), recv_counts.size(1), send_grid, recv_grid};
  const auto transport =
      check_move_args(rows, recv_counts, grids, true, group_name, transport_kind);
  auto received = at::empty({sum(recv_grid), rows.size(1)}, rows.options());
  if (grouped_layout(layout)) {
    auto exchange =
        transport->start_segments(rows.contiguous(), received, grids.segments(grids.send, false),
                                  grids.segments(grids.recv, true));
    return {std::move(exchange), std::move(received), std::nullopt};
  }
  auto exchange = transport->start_all_to_all_v(rows.contiguous(), received,
                                                grids.splits(grids.send), grids.splits(grids.recv));
  // (source, expert) -> (expert, source) once they arrive
  return {std::move(exchange), std::move(received), recv_counts};
}

PendingRows start_combine_rows(const at::Tensor& expert_rows, const at::Tensor& recv_counts,
                               const std::vector<int64_t>& send_grid,
                               const std::vector<int64_t>& recv_grid, const std::string& group_name,
                               const std::string& transport_kind, const std::string& layout) {
  MOE_KERNELS_NVTX_RANGE("ep_combine_rows.start");
  const Grids grids{recv_counts.size(0), recv_counts.size(1), send_grid, recv_grid};
  const auto transport =
      check_move_args(expert_rows, recv_counts, grids, false, group_name, transport_kind);
  auto rows = at::empty({sum(send_grid), expert_rows.size(1)}, expert_rows.options());
  std::unique_ptr<Exchange> exchange;
  if (grouped_layout(layout)) {
    exchange =
        transport->start_segments(expert_rows.contiguous(), rows, grids.segments(grids.recv, true),
                                  grids.segments(grids.send, false));
  } else {
    const auto by_source = transpose_segments(expert_rows, recv_counts.t());
    exchange = transport->start_all_to_all_v(by_source, rows, grids.splits(grids.recv),
                                             grids.splits(grids.send));
  }
  return {std::move(exchange), std::move(rows), std::nullopt};
}

at::Tensor ep_dispatch_rows(const at::Tensor& rows, const at::Tensor& recv_counts,
                            at::IntArrayRef send_grid, at::IntArrayRef recv_grid,
                            const std::string& group_name, const std::string& transport_kind,
                            const std::string& layout) {
  MOE_KERNELS_NVTX_RANGE("ep_dispatch_rows");
  return start_dispatch_rows(rows, recv_counts, send_grid.vec(), recv_grid.vec(), group_name,
                             transport_kind, layout)
      .take();
}

at::Tensor ep_combine_rows(const at::Tensor& expert_rows, const at::Tensor& recv_counts,
                           at::IntArrayRef send_grid, at::IntArrayRef recv_grid,
                           const std::string& group_name, const std::string& transport_kind,
                           const std::string& layout) {
  MOE_KERNELS_NVTX_RANGE("ep_combine_rows");
  return start_combine_rows(expert_rows, recv_counts, send_grid.vec(), recv_grid.vec(), group_name,
                            transport_kind, layout)
      .take();
}

TORCH_LIBRARY_IMPL(moe_kernels, CompositeExplicitAutograd, m) {
  m.impl("ep_plan", &ep_plan);
  m.impl("ep_dispatch_rows", &ep_dispatch_rows);
  m.impl("ep_combine_rows", &ep_combine_rows);
}

}  // namespace moe_kernels::comm
