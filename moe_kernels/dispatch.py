"""Expert-parallel dispatch and combine (SPEC.md section 5).

Across an expert-parallel group of P ranks, rank r owns experts [r * E/P, (r + 1) * E/P).
``ExpertParallelDispatcher.dispatch`` sends every row that ``permute`` grouped by expert to the
rank owning its expert and returns the rows this rank received, grouped by local expert (then by
source rank), with their counts per local expert: ready for the grouped GEMM. ``combine`` is its
exact inverse. Both are differentiable: the backward of dispatch is combine of the gradient, and
the reverse.

The C++ side (csrc/comm) does the work: it exchanges every rank's [E] counts (one small
all-to-all), then moves the rows with one all-to-all-v and orders them with
``transpose_segments`` on the device. Two transports carry the all-to-alls:

- ``"process_group"``: the torch.distributed group's own collective, whatever its backend (Gloo
  between CPU processes, NCCL between GPUs);
- ``"nccl"``: a communicator of NCCL's own for the group (``init_nccl``), one ``ncclSend`` and
  ``ncclRecv`` per peer inside ``ncclGroupStart/End`` on a side stream, ordered with events.
  An explicit opt-in: NCCL documents that two communicators used concurrently on overlapping
  devices can deadlock, and this one runs beside torch's ProcessGroupNCCL. It is safe only in a
  loop where no other NCCL collective on these GPUs can be in flight during a dispatch or
  combine: not beside DDP's or FSDP's collectives overlapped with backward, nor beside async
  collectives of your own. ``moe-train``'s loop is such a loop (it reduces gradients only after
  backward) and picks it on GPUs.

``"auto"`` (the default) is ``"process_group"``: safe beside any other collective.

Host synchronisation: exactly one per dispatch, when the exchanged counts are copied to the host
(the all-to-all-v needs its splits there). Combine and both backwards reuse the plan and never
wait (the first dispatch of a dispatcher also checks, once, that every rank has the same
num_experts). Every rank checks every rank's counts and shapes, so a mismatch (another hidden
size or dtype on some rank, or counts that do not sum to its rows) raises the same error on all
of them instead of leaving some waiting. Every wait of the NCCL transport has its timeout: the
communicator's creation, each exchange (watched on a thread of its own until it completes on the
GPU) and the host wait; a dead peer aborts the communicator and raises an error naming the
group. The process-group transport inherits its group's timeout
(``init_process_group(timeout=...)``).
"""

from __future__ import annotations

import dataclasses
import datetime

import torch
import torch.distributed as dist
from torch import Tensor

from . import _C
from ._nvtx import nvtx_range

_ops = torch.ops.moe_kernels
TRANSPORTS = ("auto", "process_group", "nccl")
LAYOUTS = ("auto", "transpose", "grouped")
_nccl_groups: set[str] = set()


@dataclasses.dataclass(frozen=True)
class DispatchPlan:
    """What a dispatch moved, kept for its combine and both backwards.

    Attributes:
        send_grid: [P * E/P] rows this rank sent to each (rank, local expert of it), row-major.
        recv_grid: [P * E/P] rows it received from each (rank, local expert of its own).
        recv_counts: ``recv_grid`` as a [P, E/P] int64 tensor on the rows' device.
        tokens_per_expert: [E/P] int64, rows per local expert (the grouped GEMM's segments).
        group_tokens_per_expert: [E] int64, the counts of the whole group in this dispatch: the
            load of the computation batch (micro-batch x ep_data_parallel).
        transport: the transport that moved them.
    """

    send_grid: list[int]
    recv_grid: list[int]
    recv_counts: Tensor
    tokens_per_expert: Tensor
    group_tokens_per_expert: Tensor
    transport: str


def nccl_available() -> bool:
    """Whether this build has the direct NCCL transport (CUDA builds with torch's NCCL wheel)."""
    return hasattr(_C, "init_nccl_transport")


def init_nccl(
    group: dist.ProcessGroup | None = None,
    device: torch.device | int | None = None,
    timeout: datetime.timedelta = datetime.timedelta(minutes=10),
) -> None:
    """Creates the direct NCCL transport of ``group`` (the default group when None), on every
    rank of it (collective): rank 0 makes an NCCL unique id, the group broadcasts it, and each
    rank creates its communicator on ``device`` (default: the current CUDA device). ``timeout``
    bounds every wait of the transport: the communicator's creation (a rank that never calls
    ``init_nccl`` fails the others after it), each exchange of rows, the dispatcher's host wait.
    Dispatchers use it only when asked for ``transport="nccl"`` (see the module's docstring for
    when that is safe)."""
    if not nccl_available():
        raise RuntimeError(
            "transport 'nccl' needs a CUDA build of moe_kernels with NCCL "
            f"(moe_kernels.build_info(): {_C.build_info()})"
        )
    group = group or dist.group.WORLD
    index = torch.device("cuda", torch.cuda.current_device()) if device is None else device
    index = torch.device("cuda", index) if isinstance(index, int) else torch.device(index)
    unique_id = [_C.nccl_unique_id() if dist.get_rank(group) == 0 else None]
    dist.broadcast_object_list(unique_id, group_src=0, group=group, device=index)
    _C.init_nccl_transport(
        group.group_name,
        unique_id[0],
        dist.get_rank(group),
        dist.get_world_size(group),
        index.index,
        timeout.total_seconds(),
    )
    _nccl_groups.add(group.group_name)


def release_nccl(group: dist.ProcessGroup | None = None) -> None:
    """Destroys the direct NCCL transport of ``group``, if it has one."""
    group = group or dist.group.WORLD
    if group.group_name in _nccl_groups:
        _C.release_nccl_transport(group.group_name)
        _nccl_groups.discard(group.group_name)


class ExpertParallelDispatcher:
    """Dispatch and combine of an MoE layer's rows over an expert-parallel group.

    Args:
        num_experts: E, the layer's experts over the whole group; divisible by the group size.
        group: the expert-parallel group (default: the default group).
        transport: "process_group", "nccl" (after ``init_nccl(group)``; an opt-in, safe only
            when no other NCCL collective on these GPUs runs concurrently: see the module's
            docstring), or "auto": "process_group", safe beside any collective.
        layout: how the rows travel, with the same result: "transpose" (one segment per
            peer, an all-to-all-v, then a pass over the rows on the device to order them by
            local expert, and one before the combine's), "grouped" (one point-to-point segment
            per (peer, local expert), straight into place, without those passes), or "auto":
            "grouped" between CPU processes (1.7-2.8x faster than "transpose" on Gloo,
            ``benchmarks/bench_dispatch.py``), "transpose" on GPUs until measured there.
    """

    def __init__(
        self,
        num_experts: int,
        group: dist.ProcessGroup | None = None,
        transport: str = "auto",
        layout: str = "auto",
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("expert parallelism needs torch.distributed.init_process_group()")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.group = group or dist.group.WORLD
        self.group_name = self.group.group_name
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)
        if num_experts % self.size:
            raise ValueError(
                f"num_experts={num_experts} must be divisible by the expert-parallel group "
                f"size {self.size}"
            )
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.size
        self.first_expert = self.rank * self.num_local_experts
        # "auto" is the transport that is safe beside any other collective.
        self.transport = "process_group" if transport == "auto" else transport
        self.layout = layout
        self._agreed = False

    def _check_num_experts(self, tokens_per_expert: Tensor) -> None:
        """Every rank must cut the same E experts: the counts messages are E long, and messages
        of other sizes would break the collective rather than fail it. Checked once, on every
        rank alike, by the first dispatch (later ones check shapes within the exchange)."""
        if tokens_per_expert.numel() != self.num_experts:
            raise ValueError(
                f"tokens_per_expert must have num_experts={self.num_experts} entries, got "
                f"{tokens_per_expert.numel()}"
            )
        if self._agreed:
            return
        every_rank = [None] * self.size
        dist.all_gather_object(every_rank, self.num_experts, group=self.group)
        if any(e != self.num_experts for e in every_rank):
            raise ValueError(
                f"expert-parallel dispatch: the ranks of the group disagree on num_experts: "
                f"{every_rank} (rank by rank)"
            )
        self._agreed = True

    def plan(self, rows: Tensor, tokens_per_expert: Tensor) -> DispatchPlan:
        """Exchanges the counts of a dispatch of ``rows`` (the dispatcher's one host
        synchronisation): the plan of ``start_dispatch`` and of its combine. Collective."""
        self._check_num_experts(tokens_per_expert)
        send_grid, recv_grid, recv_counts, group_counts = _ops.ep_plan(
            rows, tokens_per_expert, self.group_name, self.transport
        )
        return DispatchPlan(
            send_grid=send_grid.flatten().tolist(),
            recv_grid=recv_grid.flatten().tolist(),
            recv_counts=recv_counts,
            tokens_per_expert=recv_counts.sum(0),
            group_tokens_per_expert=group_counts,
            transport=self.transport,
        )

    def dispatch(self, rows: Tensor, tokens_per_expert: Tensor) -> tuple[Tensor, DispatchPlan]:
        """[R, H] rows grouped by global expert (``permute``'s) and their [E] counts -> the
        rows of this rank's experts, [N, H] grouped by local expert then source rank, and the
        plan (``plan.tokens_per_expert`` holds the [E/P] segment sizes). Collective."""
        plan = self.plan(rows, tokens_per_expert)
        expert_rows = _ops.ep_dispatch_rows(rows, plan.recv_counts, *self._route(plan))
        return expert_rows, plan

    def start_dispatch(self, rows: Tensor, plan: DispatchPlan) -> RowsInFlight:
        """``dispatch``'s rows under ``plan``, started: they travel while the caller computes,
        until ``wait()`` returns them; under autograd, the backward of ``wait()`` starts the
        gradient's way back and that of this call waits for it, so the backward overlaps the
        same work. Collective."""
        return RowsInFlight(rows, plan, self._route(plan), forward="dispatch")

    def start_combine(self, expert_rows: Tensor, plan: DispatchPlan) -> RowsInFlight:
        """``combine``, started (see ``start_dispatch``). Collective."""
        return RowsInFlight(expert_rows, plan, self._route(plan), forward="combine")

    def combine(self, expert_rows: Tensor, plan: DispatchPlan) -> Tensor:
        """The inverse of ``dispatch``: [N, H] rows of this rank's experts -> [R, H] rows back
        on the ranks (and in the order) they came from. Collective; no host synchronisation."""
        return _ops.ep_combine_rows(expert_rows, plan.recv_counts, *self._route(plan))

    def _route(self, plan: DispatchPlan) -> tuple[list[int], list[int], str, str, str]:
        layout = self.layout
        if layout == "auto":
            layout = "grouped" if plan.recv_counts.device.type == "cpu" else "transpose"
        return plan.send_grid, plan.recv_grid, self.group_name, plan.transport, layout

    def __repr__(self) -> str:
        return (
            f"ExpertParallelDispatcher(num_experts={self.num_experts}, rank={self.rank}, "
            f"size={self.size}, transport={self.transport!r}, layout={self.layout!r})"
        )


_START = {"dispatch": _C.ep_start_dispatch_rows, "combine": _C.ep_start_combine_rows}
_REVERSE = {"dispatch": "combine", "combine": "dispatch"}


class RowsInFlight:
    """A dispatch or combine between its start and its ``wait()`` (``ExpertParallelDispatcher.
    start_dispatch``/``start_combine``): the work queued in between overlaps the transfer, on
    Gloo because its worker threads move the rows, on GPUs because the transfer runs on a
    communication stream that the current stream waits for only at ``wait()``.

    Under autograd the backward overlaps the same work, mirrored. The two ends are two autograd
    nodes joined by an empty token: the backward of ``wait()`` starts the gradient's move back
    (the inverse exchange) and the backward of the start waits for it. The autograd engine runs
    the ready node of the highest sequence number first, so whatever was computed between the
    start and ``wait()`` in the forward (and so depends on neither) has its backward run
    between the two as well."""

    def __init__(self, rows: Tensor, plan: DispatchPlan, route: tuple, forward: str) -> None:
        self._exchange = _Exchange(plan.recv_counts, route, forward)
        self._token = _StartMove.apply(rows, self._exchange)

    def wait(self) -> Tensor:
        """The moved rows (as ``dispatch``/``combine`` return them). Once."""
        return _FinishMove.apply(self._token, self._exchange)


class _Exchange:
    """What both ends of a move in flight share: its plan, and the transfer in flight (the
    forward's, then the gradient's). Stages are named after the forward's move: the backward of
    a dispatch is "dispatch.backward.start" and "dispatch.backward.wait" (a combine's move)."""

    def __init__(self, recv_counts: Tensor, route: tuple, forward: str) -> None:
        self.recv_counts, self.route, self.forward = recv_counts, route, forward
        self.pending = None

    def start(self, rows: Tensor, backward: bool) -> None:
        move = _REVERSE[self.forward] if backward else self.forward
        with nvtx_range(self._stage(backward, "start")):
            self.pending = _START[move](rows, self.recv_counts, *self.route)

    def finish(self, backward: bool) -> Tensor:
        pending, self.pending = self.pending, None
        with nvtx_range(self._stage(backward, "wait")):
            pending.arrive()
            return pending.take()

    def _stage(self, backward: bool, end: str) -> str:
        return f"{self.forward}{'.backward' if backward else ''}.{end}"


class _StartMove(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: Tensor, exchange: _Exchange) -> Tensor:
        exchange.start(rows, backward=False)
        ctx.exchange = exchange
        return rows.new_empty(0)  # the token: the finish comes after this start, both ways

    @staticmethod
    def backward(ctx, _grad_token: Tensor) -> tuple[Tensor, None]:
        return ctx.exchange.finish(backward=True), None


class _FinishMove(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token: Tensor, exchange: _Exchange) -> Tensor:
        ctx.exchange = exchange
        return exchange.finish(backward=False)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        # The gradient goes back by the inverse move, under the same plan.
        ctx.exchange.start(grad, backward=True)
        return grad.new_empty(0), None
