"""``MoELayer``: router -> permute -> SwiGLU experts on the grouped GEMM -> unpermute, with
every load-balancing strategy the papers compare."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import balance, ops
from ._arguments import check_choice, check_int, check_number
from ._nvtx import backward_range, nvtx_range
from .balancer import Balancer, RateSchedule, sum_step_counts
from .dispatch import ExpertParallelDispatcher
from .experts import SwiGLUExperts, SwiGLUMLP
from .router import Router

BALANCING = ("loss_free", "aux_loss", "seq_aux_loss", "global_aux_loss", "expert_choice", "none")
AUX_LOSSES = ("aux_loss", "seq_aux_loss", "global_aux_loss")
GLOBAL_COUNTS = ("running", "previous")
DROP_POLICIES = ("probs", "position")


def balancing_parts(balancing: str) -> tuple[bool, str | None]:
    """Whether a balancing moves a loss-free bias, and its aux loss (None without): one of
    ``BALANCING``, or the bias with one of ``AUX_LOSSES`` joined by "+" (DeepSeek-V3 trains
    with ``"loss_free+seq_aux_loss"`` at a small ``aux_coeff``)."""
    bias, _, loss = str(balancing).partition("+")
    composed = bias == "loss_free" and loss in AUX_LOSSES
    if balancing not in BALANCING and not composed:
        raise ValueError(
            f"balancing must be one of {BALANCING}, or 'loss_free+' and one of {AUX_LOSSES}, "
            f"got {balancing!r}"
        )
    if composed:
        return True, loss
    return balancing == "loss_free", balancing if balancing in AUX_LOSSES else None


class MoELayer(nn.Module):
    """A Mixture-of-Experts FFN layer: each token goes to ``topk`` of ``num_experts`` SwiGLU
    experts, plus optional shared experts that see every token (DeepSeekMoE).

    Balancing strategies (``balancing``):
        ``"loss_free"``: a per-expert bias added to the scores only to choose the top-k
            (arXiv 2408.15664), moved by ``update_balance()`` after each optimizer step from
            the exact counts of the whole step (all micro-batches; summed over
            ``process_group``).
        ``"aux_loss"``: the Switch/GShard loss of each micro-batch, ``aux_coeff`` * it in
            ``self.aux_loss`` after the forward (add it to the model's loss).
        ``"seq_aux_loss"``: the same per sequence, averaged (DeepSeek-V3); sequences are the
            leading dimension of [B, S, H] inputs (a [T, H] input is one sequence). With
            ``aux_group_size`` g > 1, per group of g consecutive sequences: the balance batch
            between a sequence and the micro-batch (arXiv 2501.11873's balance-batch sweep at
            equal compute; g = B is ``"aux_loss"``).
        ``"global_aux_loss"``: Qwen's global-batch loss (arXiv 2501.11873): expert loads
            counted over every micro-batch of the step so far and every rank of
            ``process_group`` (``global_counts="running"``), or the previous step's complete
            counts (``"previous"``: the whole balance batch, one step stale; zero loss on the
            first step).
        ``"expert_choice"``: each expert takes its ``capacity_factor * T * k / E`` best tokens
            (Zhou et al. 2022): perfectly balanced, but a token's output depends on the other
            tokens of the batch, later ones included, so a causal model sees the future.
        ``"none"``: plain top-k.
        ``"loss_free+<aux loss>"``: the loss-free bias and one of the aux losses together, e.g.
            ``"loss_free+seq_aux_loss"`` (DeepSeek-V3, with ``aux_coeff`` 1e-4): the bias
            chooses, the loss sees the counts of that choice and the unbiased scores.

    Token-choice capacity (``drop_policy``, with any strategy but ``"expert_choice"``): each
    expert keeps at most ``ceil(capacity_factor * T * k / E)`` of a forward's T tokens' pairs
    and drops the rest (GShard, Switch; Megatron-Core's ``moe_expert_capacity_factor``), by
    lowest weight (``"probs"``) or by position (``"position"``, the last tokens); a dropped
    pair adds nothing, the token keeps its residual path (``ops.drop_over_capacity``). Padding
    tokens take no capacity. ``pad_to_capacity`` gives every expert exactly its capacity of
    rows (zero rows after the kept ones): static shapes, for ``torch.compile`` or CUDA graphs,
    at the price of computing the padding. The counts that move the bias, and those of the aux
    losses, are the routing choices before dropping: the imbalance the bias is there to remove.
    After each forward, ``dropped_per_expert`` holds its [E] dropped pairs; the balancer sums
    them over the step as it does the counts (for the drop rate of ``balance.load_stats``).
    Under expert parallelism each rank drops among its own tokens, before the dispatch.

    Counts are exact int64. Only training forwards count toward the step: eval forwards and
    activation-checkpoint recomputes do not. Tokens marked in ``padding_mask`` are routed but
    never counted, here or in any aux loss. After each forward, ``tokens_per_expert`` holds
    that forward's [E] counts (for MaxVio per computation batch and over an eval set).

    Args:
        hidden_size: H.
        ffn_hidden_size: F, each routed expert's intermediate size.
        num_experts: E.
        topk: k.
        balancing: one of ``BALANCING``, or "loss_free+" and one of ``AUX_LOSSES``.
        score_fn, n_groups, topk_groups, group_score, normalize, route_scale: routing (see
            ``Router``).
        num_shared_experts: shared experts, each of intermediate size F (0: none).
        rate, rule, freeze_after: the loss-free bias update (see ``Balancer``).
        center_bias: subtract each bias update's mean, so the biases stay centred (torchtitan's
            choice; the top-k choice is the same either way). ``Balancer``'s ``centered``.
        aux_coeff: alpha of the aux losses.
        z_loss_coeff: the weight of the router z-loss (``balance.router_z_loss``; 0: none), in
            ``self.z_loss`` after each forward, with any strategy.
        aux_group_size: sequences per balance group of ``"seq_aux_loss"``; B must be a
            multiple of it.
        global_counts: "running" or "previous", for ``global_aux_loss``.
        capacity_factor: for ``expert_choice``, and for token-choice capacity with
            ``drop_policy``.
        drop_policy: None (the default: no capacity, no token dropped), or the pairs an expert
            over its capacity drops: "probs" (lowest weight) or "position" (last).
        pad_to_capacity: with ``drop_policy``, pad every expert's rows to its capacity.
        process_group: the data x expert-parallel group counts are summed over.
        backend: the grouped GEMM backend.
        ep_group: the expert-parallel group: its P ranks hold E/P experts each (rank r experts
            [r * E/P, (r + 1) * E/P)) and exchange rows with all-to-alls (see
            ``moe_kernels.dispatch``); routing, the bias and shared experts stay replicated.
            None: every expert here.
        ep_transport: the dispatcher's transport, "auto", "process_group" or "nccl".
        ep_overlap: under expert parallelism, compute while the rows travel, forward and
            backward: the shared experts' first half (and the aux loss) during the dispatch,
            their second half during the combine (``dispatch.RowsInFlight``). The results are
            the same either way.
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        num_experts: int,
        topk: int,
        *,
        balancing: str = "loss_free",
        score_fn: str = "sigmoid",
        n_groups: int = 1,
        topk_groups: int = 1,
        group_score: str = "top2",
        normalize: bool = True,
        route_scale: float = 1.0,
        num_shared_experts: int = 0,
        rate: float | RateSchedule = 1e-3,
        rule: str = "sign",
        center_bias: bool = False,
        freeze_after: int | None = None,
        aux_coeff: float = 1e-3,
        z_loss_coeff: float = 0.0,
        aux_group_size: int = 1,
        global_counts: str = "running",
        capacity_factor: float = 1.0,
        drop_policy: str | None = None,
        pad_to_capacity: bool = False,
        process_group: dist.ProcessGroup | None = None,
        backend: str = "auto",
        ep_group: dist.ProcessGroup | None = None,
        ep_transport: str = "auto",
        ep_overlap: bool = True,
    ) -> None:
        super().__init__()
        self.loss_free, self.aux_loss_kind = balancing_parts(balancing)
        check_int("hidden_size", hidden_size, 1)
        check_int("ffn_hidden_size", ffn_hidden_size, 1)
        check_int("num_shared_experts", num_shared_experts, 0)
        check_number("aux_coeff", aux_coeff)
        check_number("z_loss_coeff", z_loss_coeff)
        check_int("aux_group_size", aux_group_size, 1)
        check_choice("global_counts", global_counts, GLOBAL_COUNTS)
        check_number("capacity_factor", capacity_factor, strict=True)
        if drop_policy is not None:
            check_choice("drop_policy", drop_policy, DROP_POLICIES)
            if balancing == "expert_choice":
                raise ValueError(
                    "drop_policy is token-choice capacity; balancing='expert_choice' keeps "
                    "capacity_factor * T * k / E tokens per expert by its own rule"
                )
        if pad_to_capacity and drop_policy is None:
            raise ValueError("pad_to_capacity pads to the capacity of a drop_policy, got None")
        if ep_group is not None and balancing == "expert_choice":
            raise ValueError("balancing='expert_choice' does not support expert parallelism")
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.topk = topk
        self.balancing = balancing
        self.aux_coeff = aux_coeff
        self.z_loss_coeff = z_loss_coeff
        self.aux_group_size = aux_group_size
        self.global_counts = global_counts
        self.capacity_factor = capacity_factor
        self.drop_policy = drop_policy
        self.pad_to_capacity = pad_to_capacity
        self.ep_overlap = ep_overlap
        self.router = Router(
            hidden_size,
            num_experts,
            topk,
            score_fn=score_fn,
            n_groups=n_groups,
            topk_groups=topk_groups,
            group_score=group_score,
            normalize=normalize,
            route_scale=route_scale,
        )
        self.balancer = Balancer(
            num_experts,
            loss_free=self.loss_free,
            rate=rate,
            rule=rule,
            centered=center_bias,
            freeze_after=freeze_after,
            process_group=process_group,
        )
        self.dispatcher = (
            None
            if ep_group is None
            else ExpertParallelDispatcher(num_experts, ep_group, ep_transport)
        )
        self.experts = SwiGLUExperts(
            num_experts,
            hidden_size,
            ffn_hidden_size,
            backend,
            first_expert=0 if self.dispatcher is None else self.dispatcher.first_expert,
            num_local_experts=None
            if self.dispatcher is None
            else self.dispatcher.num_local_experts,
        )
        self.shared_experts = (
            SwiGLUMLP(hidden_size, num_shared_experts * ffn_hidden_size)
            if num_shared_experts
            else None
        )
        self.aux_loss: Tensor | None = None
        self.z_loss: Tensor | None = None
        self.tokens_per_expert: Tensor | None = None
        self.dropped_per_expert: Tensor | None = None

    def forward(self, hidden_states: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """[..., H] -> [..., H]; ``padding_mask`` ([...], bool, True at padding tokens)."""
        shape = hidden_states.shape
        if shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden_states must be [..., hidden_size={self.hidden_size}], got shape "
                f"{tuple(shape)}"
            )
        if padding_mask is not None and padding_mask.shape != shape[:-1]:
            raise ValueError(
                f"padding_mask must have the shape of hidden_states without its last "
                f"dimension, {tuple(shape[:-1])}, got {tuple(padding_mask.shape)}"
            )
        x = hidden_states.reshape(-1, self.hidden_size)
        keep = None if padding_mask is None else ~padding_mask.reshape(-1).bool()
        with nvtx_range("router.logits"):
            logits = self.router.logits(x)
            self.z_loss = (
                balance.router_z_loss(logits, self.z_loss_coeff, keep)
                if self.z_loss_coeff > 0
                else None
            )
        shared = _SharedExperts(self.shared_experts, x)
        if self.balancing == "expert_choice":
            out, counts = self._expert_choice(x, logits, keep)
        else:
            out, counts = self._token_choice(x, logits, keep, shape, shared)
        self.tokens_per_expert = counts.detach()
        self.balancer.record(self.tokens_per_expert, self.dropped_per_expert)
        return shared.add_to(out).view(shape)

    def _token_choice(
        self,
        x: Tensor,
        logits: Tensor,
        keep: Tensor | None,
        shape: torch.Size,
        shared: _SharedExperts,
    ) -> tuple[Tensor, Tensor]:
        with nvtx_range("router.topk"):
            weights, ids, counts = self.router(logits, self.balancer.bias)
            if keep is not None:
                counts = balance.counts_per_sequence(ids.unsqueeze(0), self.num_experts, keep)[0]
        with nvtx_range("permute"):
            if self.drop_policy is None:
                rows, row_map, rows_per_expert = ops.permute(x, ids, self.num_experts)
            else:
                rows, row_map, rows_per_expert = self._permute_within_capacity(
                    x, weights, ids, keep
                )
        if self.dispatcher is None:
            self.aux_loss = self._balance_loss(logits, ids, counts, keep, shape)
            with nvtx_range("experts"):
                rows = self.experts(rows, rows_per_expert)
        else:
            if self.drop_policy is not None and not self.pad_to_capacity:
                # The rows of dropped pairs trail the kept ones; the plan reads the counts on
                # the host for its splits anyway.
                rows = rows[: int(rows_per_expert.sum())]
            with nvtx_range("dispatch.plan"):
                plan = self.dispatcher.plan(rows, rows_per_expert)
            in_flight = self.dispatcher.start_dispatch(rows, plan)
            # Work that needs no dispatched row runs while they travel.
            self.aux_loss = self._balance_loss(logits, ids, counts, keep, shape)
            if self.ep_overlap:
                shared.up()
            rows = in_flight.wait()
            with nvtx_range("experts"):
                rows = self.experts(rows, plan.tokens_per_expert)
            in_flight = self.dispatcher.start_combine(rows, plan)
            if self.ep_overlap:
                shared.down()
            rows = in_flight.wait()
        with nvtx_range("unpermute"):
            return ops.unpermute(rows, row_map, weights), counts

    def _permute_within_capacity(
        self, x: Tensor, weights: Tensor, ids: Tensor, keep: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``permute`` of the pairs each expert keeps within its capacity (the others get row
        -1), padded to the capacity with ``pad_to_capacity``; the dropped pairs per expert in
        ``self.dropped_per_expert``."""
        capacity = ops.expert_capacity(
            x.shape[0], self.topk, self.num_experts, self.capacity_factor
        )
        if keep is not None:
            ids = ids.masked_fill(~keep.unsqueeze(1), -1)  # padding takes no capacity
        ids, slots, dropped = ops.drop_over_capacity(
            ids, weights, self.num_experts, capacity, self.drop_policy
        )
        self.dropped_per_expert = dropped
        if not self.pad_to_capacity:
            return ops.permute(x, ids, self.num_experts)
        row_map = torch.where(slots >= 0, ids * capacity + slots, -1)
        rows = ops.permute_with_map(x, row_map, None, self.num_experts * capacity)
        return rows, row_map, torch.full_like(dropped, capacity)

    def _balance_loss(
        self,
        logits: Tensor,
        ids: Tensor,
        counts: Tensor,
        keep: Tensor | None,
        shape: torch.Size,
    ) -> Tensor | None:
        if self.aux_loss_kind is None:
            return None
        scores = balance.routing_probabilities(logits, self.router.score_fn)
        if keep is not None:
            scores = scores * keep.unsqueeze(1)
        if self.aux_loss_kind == "seq_aux_loss":
            sequences = math.prod(shape[:-2]) if len(shape) > 2 else 1
            if sequences % self.aux_group_size:
                raise ValueError(
                    f"seq_aux_loss balances groups of aux_group_size={self.aux_group_size} "
                    f"sequences; the batch's {sequences} sequences do not split into them"
                )
            groups = sequences // self.aux_group_size
            per_group = balance.counts_per_sequence(
                ids.view(groups, -1, self.topk),
                self.num_experts,
                None if keep is None else keep.view(groups, -1),
            )
            return balance.seq_aux_loss(
                scores.view(groups, -1, self.num_experts), per_group, self.topk, self.aux_coeff
            )
        num_tokens = logits.shape[0] if keep is None else keep.sum()
        if self.aux_loss_kind == "aux_loss":
            return balance.aux_loss(scores, counts, num_tokens, self.topk, self.aux_coeff)
        if self.global_counts == "running":
            global_counts = self.balancer.running_global_counts(counts)
        else:
            global_counts = self.balancer.step_tokens_per_expert
        global_tokens = (global_counts.sum() / self.topk).clamp_min(1)
        return balance.aux_loss(
            scores,
            global_counts,
            global_tokens,
            self.topk,
            self.aux_coeff,
            num_scored_tokens=num_tokens,
        )

    def _expert_choice(
        self, x: Tensor, logits: Tensor, keep: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        num_tokens = x.shape[0]
        capacity = min(
            num_tokens,
            math.ceil(num_tokens * self.topk * self.capacity_factor / self.num_experts),
        )
        with nvtx_range("router.topk"):
            scores = balance.scores_of(logits, self.router.score_fn)
            choice = scores if keep is None else scores.masked_fill(~keep.unsqueeze(1), -math.inf)
            token_ids = choice.t().topk(capacity, dim=1).indices  # [E, C]
            weights = scores.t().gather(1, token_ids)
            if keep is not None:
                picked = keep[token_ids]
                weights = weights * picked
                counts = picked.sum(dim=1)
            else:
                counts = torch.full(
                    (self.num_experts,), capacity, dtype=torch.int64, device=x.device
                )
            self.aux_loss = None
        with nvtx_range("permute"):
            rows = x.index_select(0, token_ids.flatten())
            rows_per_expert = torch.full_like(counts, capacity)
        with nvtx_range("experts"):
            rows = self.experts(rows, rows_per_expert)
        with nvtx_range("unpermute"):
            rows = rows * weights.reshape(-1, 1).to(rows.dtype)
            return x.new_zeros(x.shape).index_add(0, token_ids.flatten(), rows), counts

    def update_balance(self, summed_tallies: Tensor | None = None) -> Tensor:
        """Ends a training step (call after the optimizer step): moves the loss-free bias and
        returns the step's [E] counts, summed over the process group (see ``Balancer``;
        ``summed_tallies`` when they were summed already)."""
        with nvtx_range("balancer_update"):
            return self.balancer.update(summed_tallies)

    def extra_repr(self) -> str:
        group = f", aux_group_size={self.aux_group_size}" if self.aux_group_size > 1 else ""
        z_loss = f", z_loss_coeff={self.z_loss_coeff}" if self.z_loss_coeff else ""
        capacity = ""
        if self.drop_policy is not None:
            capacity = (
                f", capacity_factor={self.capacity_factor}, drop_policy={self.drop_policy}"
                f"{', pad_to_capacity=True' if self.pad_to_capacity else ''}"
            )
        return f"balancing={self.balancing}, aux_coeff={self.aux_coeff}{group}{z_loss}{capacity}"


class _SharedExperts:
    """The shared experts' output for the tokens ``x``, computed in two halves whenever the
    layer has time for them (``up()`` then ``down()``: while rows travel, under expert
    parallelism), else at the end (``add_to``). Each half's backward is a stage of its own, so
    a timeline shows what it overlapped."""

    def __init__(self, mlp: SwiGLUMLP | None, x: Tensor) -> None:
        self.mlp, self.x = mlp, x
        self.hidden: Tensor | None = None
        self.out: Tensor | None = None

    def up(self) -> None:
        if self.mlp is not None and self.hidden is None:
            with nvtx_range("shared_experts.up"):
                self.hidden = backward_range("shared_experts.up.backward", self.x, self.mlp.up)

    def down(self) -> None:
        self.up()
        if self.mlp is not None and self.out is None:
            with nvtx_range("shared_experts.down"):
                self.out = backward_range(
                    "shared_experts.down.backward", self.hidden, self.mlp.down
                )

    def add_to(self, routed: Tensor) -> Tensor:
        if self.mlp is None:
            return routed
        self.down()
        return routed + self.out


def moe_layers(model: nn.Module) -> Iterator[MoELayer]:
    """Every MoELayer of ``model``, in module order."""
    return (module for module in model.modules() if isinstance(module, MoELayer))


def total_aux_loss(model: nn.Module) -> Tensor | None:
    """The sum of the aux losses and router z-losses of the last forward of every MoELayer of
    ``model`` (None when no layer has either): add it to the model's loss."""
    losses = [
        loss
        for layer in moe_layers(model)
        for loss in (layer.aux_loss, layer.z_loss)
        if loss is not None
    ]
    return torch.stack(losses).sum() if losses else None


def update_balance(model: nn.Module) -> list[Tensor]:
    """``update_balance()`` of every MoELayer of ``model`` (call after the optimizer step), the
    counts of all layers summed over their process group in one all-reduce
    (``sum_step_counts``); returns each layer's counts of the step, for MaxVio_batch."""
    layers = list(moe_layers(model))
    summed = sum_step_counts([layer.balancer for layer in layers])
    return [layer.update_balance(counts) for layer, counts in zip(layers, summed, strict=True)]
