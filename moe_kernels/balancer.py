"""Exact per-expert token counts of a training step, and the loss-free bias they drive."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from . import ops
from ._arguments import check_choice, check_int, check_number
from ._precision import KeepsFp32

RULES = ("sign", "proportional")

RateSchedule = Callable[[int], float]


def in_backward_pass() -> bool:
    """Whether autograd is running a backward pass now: a forward that runs then is an
    activation-checkpoint recompute (reentrant or not), which must not count its tokens again.
    Under torch.compile no recompute runs this Python (AOTAutograd recomputes inside the
    compiled backward), so a traced forward always counts; a compiled layer that eager
    ``torch.utils.checkpoint`` recomputes would count twice."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


class Balancer(KeepsFp32):
    """Counts the tokens each expert receives over a training step and, for loss-free
    balancing, moves the routing bias after the optimizer step (SPEC.md section 2).

    A step is everything between two ``update()`` calls: all micro-batches of gradient
    accumulation. Only training forwards count: eval forwards (``module.eval()``) and
    activation-checkpoint recomputes do not. ``update()`` sums the step's counts over
    ``process_group`` (the data x expert-parallel group) when one is given, so every rank moves
    its bias identically, then updates ``bias += rate * sign(mean - counts)`` (or the
    proportional rule) and starts the next step's count.

    Buffers (in ``state_dict``, so a checkpoint resumes exactly): ``bias`` [E] fp32 (only with
    ``loss_free``), ``tokens_per_expert`` [E] int64 (this step so far, local),
    ``step_tokens_per_expert`` [E] int64 (the last complete step, summed over the group),
    ``global_tokens_per_expert`` [E] int64 (this step so far, summed over the group: the
    running balance batch of the global aux loss), ``updates`` int64 (steps completed).

    Args:
        num_experts: E.
        loss_free: hold and update a bias.
        rate: the update rate u, or a schedule ``rate(update_index) -> float``.
        rule: "sign" (Algorithm 1 of arXiv 2408.15664) or "proportional".
        centered: subtract each update's mean, so the biases keep theirs (``ops.update_bias``).
        freeze_after: stop moving the bias after this many updates (counting goes on).
        process_group: the group whose counts are summed; None for one process.
    """

    fp32_tensors = ("bias",)

    def __init__(
        self,
        num_experts: int,
        *,
        loss_free: bool,
        rate: float | RateSchedule = 1e-3,
        rule: str = "sign",
        centered: bool = False,
        freeze_after: int | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        check_int("num_experts", num_experts, 1)
        check_choice("rule", rule, RULES)
        if not callable(rate):
            check_number("rate", rate)
        if freeze_after is not None:
            check_int("freeze_after", freeze_after, 0)
        self.num_experts = num_experts
        self.rate = rate
        self.rule = rule
        self.centered = centered
        self.freeze_after = freeze_after
        self.process_group = process_group
        counts = torch.zeros(num_experts, dtype=torch.int64)
        self.register_buffer("bias", torch.zeros(num_experts) if loss_free else None)
        self.register_buffer("tokens_per_expert", counts)
        self.register_buffer("step_tokens_per_expert", counts.clone())
        self.register_buffer("global_tokens_per_expert", counts.clone())
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))
        # Pairs dropped over capacity: telemetry, not state, so not in checkpoints.
        self.register_buffer("dropped_per_expert", counts.clone(), persistent=False)
        self.register_buffer("step_dropped_per_expert", counts.clone(), persistent=False)

    @property
    def counting(self) -> bool:
        """Whether a forward now is one whose tokens count toward the step."""
        return self.training and not in_backward_pass()

    def record(self, tokens_per_expert: Tensor, dropped_per_expert: Tensor | None = None) -> None:
        """Adds one forward's [E] integer counts (and its pairs dropped over capacity, if any)
        to the step, unless it must not count."""
        if self.counting:
            self.tokens_per_expert += tokens_per_expert
            if dropped_per_expert is not None:
                self.dropped_per_expert += dropped_per_expert

    def step_tallies(self) -> Tensor:
        """The step's [2E] counts then dropped pairs, as they are summed over the group."""
        return torch.cat([self.tokens_per_expert, self.dropped_per_expert])

    def running_global_counts(self, tokens_per_expert: Tensor) -> Tensor:
        """The balance batch of the global aux loss under gradient accumulation: this
        micro-batch's counts summed over the group, added to those of the step's earlier
        micro-batches (what Megatron-Core does; the later micro-batches are not known yet).
        A recompute returns what its forward saw; an eval forward gets its own counts."""
        if not self.counting:
            return self.global_tokens_per_expert if self.training else tokens_per_expert
        micro = self._sum_over_group(tokens_per_expert.clone())
        self.global_tokens_per_expert += micro
        return self.global_tokens_per_expert.clone()

    def current_rate(self) -> float:
        step = int(self.updates)
        if self.freeze_after is not None and step >= self.freeze_after:
            return 0.0
        if not callable(self.rate):
            return self.rate
        rate = self.rate(step)
        check_number(f"rate (the schedule's value for update {step})", rate)
        return rate

    @torch.no_grad()
    def update(self, summed_tallies: Tensor | None = None) -> Tensor:
        """Ends the step (call after the optimizer step): sums its counts over the group, moves
        the bias, and returns those [E] int64 counts (for MaxVio_batch); the dropped pairs go
        to ``step_dropped_per_expert``. ``summed_tallies``: the step's ``step_tallies()``
        already summed over the group (``sum_step_counts``, one collective for many
        balancers)."""
        tallies = (
            self._sum_over_group(self.step_tallies()) if summed_tallies is None else summed_tallies
        )
        counts, dropped = tallies.split(self.num_experts)
        if self.bias is not None:
            rate = self.current_rate()
            if rate > 0:
                ops.update_bias(self.bias, counts, rate, self.rule, self.centered)
        self.step_tokens_per_expert.copy_(counts)
        self.step_dropped_per_expert.copy_(dropped)
        self.tokens_per_expert.zero_()
        self.dropped_per_expert.zero_()
        self.global_tokens_per_expert.zero_()
        self.updates += 1
        return counts

    def _sum_over_group(self, counts: Tensor) -> Tensor:
        if self.process_group is not None:
            dist.all_reduce(counts, group=self.process_group)
        return counts

    def extra_repr(self) -> str:
        rate = "schedule" if callable(self.rate) else self.rate
        return (
            f"num_experts={self.num_experts}, loss_free={self.bias is not None}, rate={rate}, "
            f"rule={self.rule}, centered={self.centered}, freeze_after={self.freeze_after}"
        )


@torch.no_grad()
def sum_step_counts(balancers: Sequence[Balancer]) -> list[Tensor]:
    """The step's tallies (``step_tallies``: counts, then dropped pairs) of each balancer
    summed over its process group, with one all-reduce of the concatenated tallies per group
    and device (a model's layers share one) instead of one per layer: a model of L layers
    ends its step with one collective, not L."""
    summed = [balancer.step_tallies() for balancer in balancers]
    shared: dict[tuple[dist.ProcessGroup, torch.device], list[int]] = {}
    for index, balancer in enumerate(balancers):
        if balancer.process_group is not None:
            key = (balancer.process_group, summed[index].device)
            shared.setdefault(key, []).append(index)
    for (group, _), indices in shared.items():
        flat = torch.cat([summed[index] for index in indices])
        dist.all_reduce(flat, group=group)
        parts = flat.split([summed[index].numel() for index in indices])
        for index, part in zip(indices, parts, strict=True):
            summed[index] = part
    return summed
