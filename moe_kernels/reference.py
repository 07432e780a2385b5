"""Pure-PyTorch definitions of every op: the oracle of the tests and the baseline of the
benchmarks. Written for clarity, with the same signatures and semantics as ``moe_kernels.ops``
(SPEC.md sections 1-5); differentiable through ordinary autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _descending_order(values: Tensor) -> Tensor:
    """Indices sorting the last axis by descending value, ties to the lower index."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices


def score(logits: Tensor, score_fn: str) -> Tensor:
    """The routing scores of [T, E] logits, by their definitions."""
    if score_fn == "sigmoid":
        return torch.sigmoid(logits)
    if score_fn == "softmax":
        return torch.softmax(logits, dim=-1)
    return F.softplus(logits).sqrt()  # "sqrtsoftplus" (DeepSeek-V4)


def group_score_size(group_score: str, experts_per_group: int, k: int, topk_groups: int) -> int:
    """How many of a group's best choice values its score sums."""
    if group_score == "top2":
        return min(2, experts_per_group)
    return 1 if group_score == "max" else k // topk_groups


def biased_topk(
    logits: Tensor,
    bias: Tensor | None,
    k: int,
    score_fn: str = "sigmoid",
    n_groups: int = 1,
    topk_groups: int = 1,
    normalize: bool = True,
    scale: float = 1.0,
    group_score: str = "top2",
    token_mask: Tensor | None = None,
    norm_eps: float = 0.0,
    norm_min: float = 0.0,
    choose_on: str = "scores",
) -> tuple[Tensor, Tensor, Tensor]:
    x = logits.to(_opmath(logits.dtype))
    scores = score(x, score_fn)
    choice = x if choose_on == "logits" else scores
    choice = choice if bias is None else choice + bias.to(scores.dtype)
    choice = choice.masked_fill(choice.isnan(), float("-inf"))
    num_tokens, num_experts = choice.shape
    if n_groups > 1:
        per_group = num_experts // n_groups
        size = group_score_size(group_score, per_group, k, topk_groups)
        grouped = choice.view(num_tokens, n_groups, per_group)
        group_scores = grouped.topk(size, dim=-1).values.sum(dim=-1)
        kept = _descending_order(group_scores)[:, :topk_groups]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(
            num_tokens, num_experts
        )
    ids = _descending_order(choice)[:, :k]
    weights = scores.gather(1, ids)
    if normalize:
        total = (weights.sum(dim=-1, keepdim=True) + norm_eps).clamp(min=norm_min)
        weights = weights / torch.where(total == 0, torch.ones_like(total), total)
    weights = weights * scale
    counted = ids if token_mask is None else ids[token_mask]
    counts = torch.bincount(counted.flatten(), minlength=num_experts)
    return weights, ids, counts


def expert_histogram(topk_ids: Tensor, num_experts: int) -> Tensor:
    return torch.bincount(topk_ids.flatten().long(), minlength=num_experts)


def update_bias(
    bias: Tensor,
    tokens_per_expert: Tensor,
    rate: float = 1e-3,
    rule: str = "sign",
    centered: bool = False,
) -> None:
    load = tokens_per_expert.double()
    mean = load.mean()
    if rule == "sign":
        sign = torch.sign(mean - load)
        bias += (rate * (sign - sign.mean() if centered else sign)).float()
    elif mean > 0:
        bias += (rate * (mean - load) / mean).float()


def permute(
    hidden: Tensor, topk_ids: Tensor, num_experts: int, align: int = 1
) -> tuple[Tensor, Tensor, Tensor]:
    num_tokens, topk = topk_ids.shape
    experts = topk_ids.flatten().long()
    kept = experts >= 0  # id -1: dropped over capacity, no row
    counts = torch.bincount(experts[kept], minlength=num_experts)
    padded = (counts + align - 1) // align * align
    segment_start = torch.cumsum(padded, 0) - padded
    first_pair = torch.cumsum(counts, 0) - counts  # of each expert, in the sorted order
    order = torch.sort(experts, stable=True).indices  # pairs in expert order, then pair order
    order = order[kept[order]]
    sorted_experts = experts[order]
    rank = torch.arange(order.numel(), device=experts.device) - first_pair[sorted_experts]
    row_map = torch.full_like(experts, -1)
    row_map[order] = segment_start[sorted_experts] + rank
    num_rows = experts.numel() if align == 1 else int(padded.sum())  # dropped: zero rows at the end
    rows = hidden.new_zeros(num_rows, hidden.shape[1])
    rows = rows.index_copy(0, row_map[kept], hidden.repeat_interleave(topk, dim=0)[kept])
    return rows, row_map.view(num_tokens, topk), counts


def drop_over_capacity(
    topk_ids: Tensor,
    topk_weights: Tensor | None,
    num_experts: int,
    capacity: int,
    policy: str = "probs",
) -> tuple[Tensor, Tensor, Tensor]:
    experts = topk_ids.flatten().long()
    pairs = torch.arange(experts.numel(), device=experts.device)
    # Pairs by expert, then by the policy's preference (a stable sort keeps pair order in ties).
    order = pairs
    if policy == "probs":
        weights = topk_weights.flatten().to(_opmath(topk_weights.dtype))
        weights = weights.nan_to_num(nan=-torch.inf, posinf=torch.inf, neginf=-torch.inf)
        order = torch.sort(weights, descending=True, stable=True).indices
    order = order[torch.sort(experts[order], stable=True).indices]
    order = order[experts[order] >= 0]
    counts = torch.bincount(experts[order], minlength=num_experts)
    first = torch.cumsum(counts, 0) - counts
    preference = torch.arange(order.numel(), device=experts.device) - first[experts[order]]
    keep = torch.zeros_like(experts, dtype=torch.bool)
    keep[order[preference < capacity]] = True
    kept_ids = torch.where(keep, experts, -1)
    # Slots: places among the expert's kept pairs in pair order.
    kept_order = torch.sort(kept_ids, stable=True).indices
    kept_order = kept_order[kept_ids[kept_order] >= 0]
    kept_counts = torch.bincount(kept_ids[kept_order], minlength=num_experts)
    kept_first = torch.cumsum(kept_counts, 0) - kept_counts
    slots = torch.full_like(experts, -1)
    slots[kept_order] = (
        torch.arange(kept_order.numel(), device=experts.device) - kept_first[kept_ids[kept_order]]
    )
    dropped = counts - kept_counts
    return kept_ids.view(topk_ids.shape), slots.view(topk_ids.shape), dropped


def permute_with_map(
    hidden: Tensor, row_map: Tensor, topk_weights: Tensor | None, num_rows: int
) -> Tensor:
    num_tokens, topk = row_map.shape
    rows_of_pairs = hidden.repeat_interleave(topk, dim=0).to(_opmath(hidden.dtype))
    if topk_weights is not None:
        rows_of_pairs = rows_of_pairs * topk_weights.flatten().to(rows_of_pairs.dtype).unsqueeze(1)
    landed = row_map.flatten() >= 0
    rows = rows_of_pairs.new_zeros(num_rows, hidden.shape[1])
    rows = rows.index_copy(0, row_map.flatten()[landed].long(), rows_of_pairs[landed])
    return rows.to(hidden.dtype)


def unpermute(rows: Tensor, row_map: Tensor, topk_weights: Tensor | None = None) -> Tensor:
    num_tokens, topk = row_map.shape
    padded = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])  # row -1 reads the zero row
    gathered = padded[row_map.flatten().long()].view(num_tokens, topk, rows.shape[1])
    gathered = gathered.to(_opmath(rows.dtype))
    if topk_weights is not None:
        gathered = gathered * topk_weights.to(gathered.dtype).unsqueeze(-1)
    # A dropped pair adds nothing, whatever its weight.
    gathered = torch.where((row_map >= 0).unsqueeze(-1), gathered, 0)
    return gathered.sum(dim=1).to(rows.dtype)


def grouped_gemm(
    a: Tensor,
    b: Tensor,
    tokens_per_expert: Tensor,
    trans_b: bool = False,
    backend: str = "auto",
) -> Tensor:
    weights = b.transpose(1, 2) if trans_b else b
    sizes = tokens_per_expert.tolist()
    segments = a[: sum(sizes)].split(sizes)
    outputs = [a_e @ w_e for a_e, w_e in zip(segments, weights.unbind(0), strict=True)]
    # Rows past the segments are no expert's: the op leaves them unwritten, zeros here.
    tail = a.new_zeros(a.shape[0] - sum(sizes), weights.shape[2])
    return torch.cat([*outputs, tail])


def swiglu(
    pre: Tensor, alpha: float = 1.0, limit: float | None = None, up_offset: float = 0.0
) -> Tensor:
    gate, up = pre.to(_opmath(pre.dtype)).chunk(2, dim=-1)
    if limit is not None:
        # where, not clamp: an element at the limit passes no gradient on every torch (clamp's
        # backward passes it there before torch 2.14).
        gate = torch.where(gate >= limit, limit, gate)
        up = torch.where(up >= limit, limit, torch.where(up <= -limit, -limit, up))
    activated = F.silu(gate) if alpha == 1.0 else gate * torch.sigmoid(alpha * gate)
    return (activated * (up + up_offset if up_offset else up)).to(pre.dtype)


def grouped_gemm_swiglu(
    a: Tensor,
    b: Tensor,
    tokens_per_expert: Tensor,
    trans_b: bool = False,
    backend: str = "auto",
    alpha: float = 1.0,
    limit: float | None = None,
    up_offset: float = 0.0,
) -> Tensor:
    return swiglu(grouped_gemm(a, b, tokens_per_expert, trans_b), alpha, limit, up_offset)


def swiglu_backward(
    grad_out: Tensor,
    pre: Tensor,
    alpha: float = 1.0,
    limit: float | None = None,
    up_offset: float = 0.0,
) -> Tensor:
    pre = pre.detach().to(_opmath(pre.dtype)).requires_grad_()
    out = swiglu(pre, alpha, limit, up_offset)
    (grad_pre,) = torch.autograd.grad(out, pre, grad_out.to(pre.dtype))
    return grad_pre.to(grad_out.dtype)


def transpose_segments(rows: Tensor, counts: Tensor) -> Tensor:
    num_a, num_b = counts.shape
    segments = rows.split(counts.flatten().tolist())
    reordered = [segments[a * num_b + b] for b in range(num_b) for a in range(num_a)]
    return torch.cat(reordered) if reordered else rows.clone()  # an empty grid holds no rows


def ep_dispatch(rows: Tensor, tokens_per_expert: Tensor, group=None) -> tuple[Tensor, Tensor]:
    """Expert-parallel dispatch (SPEC.md section 5) on ``torch.distributed``'s all_gather and
    ``all_to_all_single``: the rows of this
    rank's experts, grouped by local expert then source rank, and their [E/P] counts."""
    import torch.distributed as dist

    size, rank = dist.get_world_size(group), dist.get_rank(group)
    local = tokens_per_expert.numel() // size
    every_rank = [torch.empty_like(tokens_per_expert) for _ in range(size)]
    dist.all_gather(every_rank, tokens_per_expert, group=group)
    recv = torch.stack(every_rank)[:, rank * local : (rank + 1) * local]  # [source, expert]
    received = rows.new_empty(int(recv.sum()), rows.shape[1])
    dist.all_to_all_single(
        received,
        rows.contiguous(),
        recv.sum(1).tolist(),
        tokens_per_expert.view(size, local).sum(1).tolist(),
        group=group,
    )
    return transpose_segments(received, recv), recv.sum(0)


def ep_combine(expert_rows: Tensor, tokens_per_expert: Tensor, num_rows: int, group=None) -> Tensor:
    """The inverse of ``ep_dispatch`` on ``all_to_all_single``: ``tokens_per_expert`` [E] are
    this rank's counts of the dispatch, ``num_rows`` its number of rows."""
    import torch.distributed as dist

    size, rank = dist.get_world_size(group), dist.get_rank(group)
    local = tokens_per_expert.numel() // size
    every_rank = [torch.empty_like(tokens_per_expert) for _ in range(size)]
    dist.all_gather(every_rank, tokens_per_expert, group=group)
    recv = torch.stack(every_rank)[:, rank * local : (rank + 1) * local]
    rows = expert_rows.new_empty(num_rows, expert_rows.shape[1])
    dist.all_to_all_single(
        rows,
        transpose_segments(expert_rows, recv.t()),
        tokens_per_expert.view(size, local).sum(1).tolist(),
        recv.sum(1).tolist(),
        group=group,
    )
    return rows
