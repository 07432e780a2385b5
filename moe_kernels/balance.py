"""Load-balance losses and metrics: plain differentiable functions (SPEC.md sections 6 and 7).

Users can put them in their own models; ``MoELayer``'s strategies call them. Counts are exact
integers (int64); losses are computed in fp32 from fp32 scores, and their gradient flows
through ``scores`` only (the counts are constants of the step).

Precision: the routing probabilities are normalised per token in fp32 before any sum; the
sums over tokens accumulate in fp32 (fp64 for fp64 scores).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def scores_of(logits: Tensor, score_fn: str) -> Tensor:
    """The router's scores of [..., E] logits (what ``ops.biased_topk`` computes in its kernels):
    "sigmoid", "softmax" over the experts, or "sqrtsoftplus" (``sqrt(softplus(logits))``)."""
    if score_fn == "sigmoid":
        return logits.sigmoid()
    if score_fn == "softmax":
        return logits.softmax(dim=-1)
    if score_fn == "sqrtsoftplus":
        return F.softplus(logits).sqrt()
    raise ValueError(
        f"score_fn must be one of ('sigmoid', 'softmax', 'sqrtsoftplus'), got {score_fn!r}"
    )


def routing_probabilities(logits: Tensor, score_fn: str) -> Tensor:
    """The per-token routing distribution an aux loss balances: softmax over the experts, or the
    sigmoid (sqrtsoftplus) scores divided by their per-token sum (DeepSeek-V3's normalisation).

    Args:
        logits: [..., E] router logits; computed in fp32 (fp64 stays fp64).
        score_fn: "softmax", "sigmoid" or "sqrtsoftplus".

    Returns:
        [..., E] probabilities summing to 1 per token, differentiable w.r.t. ``logits``.
    """
    logits = logits if logits.dtype == torch.float64 else logits.float()
    scores = scores_of(logits, score_fn)
    if score_fn == "softmax":
        return scores
    return scores / scores.sum(dim=-1, keepdim=True)


def aux_loss(
    scores: Tensor,
    tokens_per_expert: Tensor,
    num_tokens: int | Tensor,
    topk: int,
    coeff: float,
    num_scored_tokens: int | Tensor | None = None,
) -> Tensor:
    """The Switch/GShard balance loss, ``coeff * sum_i f_i * P_i`` (eq. 2 of arXiv 2408.15664).

    ``f_i = E / (topk * num_tokens) * tokens_per_expert[i]`` is expert i's load relative to a
    perfect balance over the ``num_tokens`` tokens the counts were taken from, and
    ``P_i = sum_t scores[t, i] / num_scored_tokens`` its mean routing probability. The
    micro-batch loss counts and scores the same tokens (``num_scored_tokens`` defaults to
    ``num_tokens``): ``coeff * E / (topk * num_tokens^2) * sum_i tokens_per_expert[i] *
    sum_t scores[t, i]``. Qwen's global-batch loss (arXiv 2501.11873) passes the counts of the
    whole balance batch (all micro-batches, all data-parallel ranks) and their token count,
    with ``num_scored_tokens`` the local tokens: its value stays on the micro-batch loss's
    scale, and equals it when the balance batch is the micro-batch.

    Args:
        scores: [T, E] routing probabilities of the local tokens (``routing_probabilities``);
            rows of padding tokens zeroed.
        tokens_per_expert: [E] integer counts of the top-k of the unbiased scores.
        num_tokens: tokens the counts were taken from (an int or a 0-dim tensor), > 0.
        topk: k, experts per token.
        coeff: the loss coefficient alpha.
        num_scored_tokens: tokens summed in ``scores`` (default ``num_tokens``), > 0.

    Returns:
        A 0-dim fp32 (fp64 for fp64 scores) loss.
    """
    num_experts = _check_scores_and_counts(scores, tokens_per_expert, "tokens_per_expert")
    if num_scored_tokens is None:
        num_scored_tokens = num_tokens
    probability = scores.sum(dim=0) / num_scored_tokens
    load = tokens_per_expert.to(probability.dtype) * (num_experts / topk) / num_tokens
    return coeff * (load * probability).sum()


def seq_aux_loss(scores: Tensor, tokens_per_expert: Tensor, topk: int, coeff: float) -> Tensor:
    """The sequence-wise balance loss of DeepSeek-V3: ``aux_loss`` of each sequence's own
    tokens, averaged over the B sequences.

    A sequence's tokens are ``tokens_per_expert[b].sum() / topk``: S, or fewer when padding
    was left out of the counts (its rows of ``scores`` zeroed); a sequence with no token adds
    zero to the average.

    Args:
        scores: [B, S, E] routing probabilities.
        tokens_per_expert: [B, E] integer counts per sequence (``counts_per_sequence``).
        topk, coeff: as ``aux_loss``.

    Returns:
        A 0-dim loss.
    """
    if scores.dim() != 3:
        raise ValueError(f"scores must be [B, S, E], got shape {tuple(scores.shape)}")
    if tokens_per_expert.shape != (scores.shape[0], scores.shape[2]):
        raise ValueError(
            f"tokens_per_expert must be [B, E] = {[scores.shape[0], scores.shape[2]]}, "
            f"got shape {tuple(tokens_per_expert.shape)}"
        )
    batch, _, num_experts = scores.shape
    load = tokens_per_expert.to(scores.dtype)
    tokens = (load.sum(dim=1, keepdim=True) / topk).clamp_min(1)
    per_sequence = (load * scores.sum(dim=1) / tokens.square()).sum(dim=1)
    return coeff * num_experts / topk * per_sequence.sum() / batch


def router_z_loss(logits: Tensor, coeff: float, keep: Tensor | None = None) -> Tensor:
    """The router z-loss of ST-MoE (arXiv 2202.08906, eq. 5), ``coeff * mean_t
    logsumexp(logits[t])^2``: it keeps the logits small, where the router's softmax or sigmoid
    is not saturated and rounding in bf16 costs little. It depends on the logits alone, so it
    adds to any balancing strategy.

    Args:
        logits: [T, E] router logits; computed in fp32 (fp64 stays fp64).
        coeff: its weight (ST-MoE: 1e-3).
        keep: [T] bool, True at the tokens that count (padding excluded from the mean), or None.

    Returns:
        A scalar, differentiable w.r.t. ``logits``; 0 when no token counts.
    """
    logits = logits if logits.dtype == torch.float64 else logits.float()
    squares = logits.logsumexp(dim=-1).square()
    if keep is None:
        return coeff * squares.mean()
    return coeff * (squares * keep).sum() / keep.sum().clamp_min(1)


def counts_per_sequence(topk_ids: Tensor, num_experts: int, keep: Tensor | None = None) -> Tensor:
    """Exact per-sequence histograms: ``[B, S, k]`` ids -> ``[B, E]`` int64 counts, counting only
    the tokens where ``keep`` ([B, S] bool) is true (padding is routed but never counted). One
    index_add, no host synchronisation."""
    batch = topk_ids.shape[0]
    ones = torch.ones_like(topk_ids, dtype=torch.int64)
    if keep is not None:
        ones = ones * keep.unsqueeze(-1)
    offsets = torch.arange(batch, device=topk_ids.device).view(batch, 1, 1) * num_experts
    counts = torch.zeros(batch * num_experts, dtype=torch.int64, device=topk_ids.device)
    counts.index_add_(0, (topk_ids + offsets).flatten(), ones.flatten())
    return counts.view(batch, num_experts)


def max_violation(tokens_per_expert: Tensor) -> Tensor:
    """MaxVio = (max_i load_i - mean load) / mean load (arXiv 2408.15664 section 4.1), over the
    last dimension, for any leading batch dimensions.

    Args:
        tokens_per_expert: [..., E] counts (integer or floating).

    Returns:
        [...] fp64; 0 for a perfect balance, E - 1 when one expert takes everything; NaN when
        nothing was counted.
    """
    load = tokens_per_expert.double()
    mean = load.mean(dim=-1)
    return (load.amax(dim=-1) - mean) / mean


def load_stats(
    tokens_per_expert: Tensor,
    bias: Tensor | None = None,
    dropped_per_expert: Tensor | None = None,
) -> dict[str, float]:
    """The balance of one layer over a window (a step, or counts summed over several), from its
    [E] counts: what the MoE frameworks' users ask to log.

    Returns:
        ``maxvio`` (``max_violation``); ``cv``, the coefficient of variation (population std
        over mean); ``dead_experts``, the fraction of experts with no token in the window;
        ``min_load`` and ``max_load``, the least and most loaded expert's count over the mean
        (1 at a perfect balance); with a bias, ``bias_min`` and ``bias_max``; with the pairs
        dropped over capacity ([E], of the same window), ``drop_rate``, the fraction of the
        routed pairs dropped. Ratios are NaN when nothing was counted.
    """
    load = tokens_per_expert.detach().double().cpu()
    mean = load.mean()
    stats = {
        "maxvio": float(max_violation(load)),
        "cv": float(load.std(correction=0) / mean),
        "dead_experts": float((load == 0).double().mean()),
        "min_load": float(load.min() / mean),
        "max_load": float(load.max() / mean),
    }
    if bias is not None:
        stats |= {"bias_min": float(bias.min()), "bias_max": float(bias.max())}
    if dropped_per_expert is not None:
        stats["drop_rate"] = float(dropped_per_expert.detach().double().sum().cpu() / load.sum())
    return stats


def balance_telemetry(
    tokens_per_expert: dict[str, Tensor],
    biases: dict[str, Tensor | None] | None = None,
    dropped_per_expert: dict[str, Tensor] | None = None,
) -> dict[str, float]:
    """``load_stats`` of every layer (``"<stat>/<layer>"``) and over the model (``"<stat>"``):
    the mean over layers of maxvio, cv, min_load and max_load, the fraction of all experts
    that are dead, the range of all biases, and the fraction of the pairs of the layers with
    a capacity that were dropped. For any training loop: pass each layer's counts of the
    window (and its loss-free bias, its dropped pairs, if any), log what it returns.

    Args:
        tokens_per_expert: {layer name: [E] counts of the window}.
        biases: {layer name: [E] bias or None}.
        dropped_per_expert: {layer name: [E] pairs dropped over capacity in the window}, for
            the layers with a capacity.
    """
    biases = biases or {}
    dropped = dropped_per_expert or {}
    per_layer = {
        name: load_stats(counts, biases.get(name), dropped.get(name))
        for name, counts in tokens_per_expert.items()
    }
    if not per_layer:
        return {}
    telemetry = {f"{stat}/{name}": v for name, s in per_layer.items() for stat, v in s.items()}
    for stat in ("maxvio", "cv", "min_load", "max_load"):
        telemetry[stat] = sum(s[stat] for s in per_layer.values()) / len(per_layer)
    experts = sum(counts.numel() for counts in tokens_per_expert.values())
    dead = sum(s["dead_experts"] * tokens_per_expert[n].numel() for n, s in per_layer.items())
    telemetry["dead_experts"] = dead / experts
    with_bias = [s for s in per_layer.values() if "bias_min" in s]
    if with_bias:
        telemetry["bias_min"] = min(s["bias_min"] for s in with_bias)
        telemetry["bias_max"] = max(s["bias_max"] for s in with_bias)
    if dropped:
        routed = sum(float(tokens_per_expert[name].double().sum()) for name in dropped)
        lost = sum(float(counts.double().sum()) for counts in dropped.values())
        telemetry["drop_rate"] = lost / routed if routed else math.nan
    return telemetry


def _check_scores_and_counts(scores: Tensor, counts: Tensor, name: str) -> int:
    if scores.dim() != 2:
        raise ValueError(f"scores must be [T, E], got shape {tuple(scores.shape)}")
    if counts.shape != (scores.shape[1],):
        raise ValueError(
            f"{name} must be [E] = [{scores.shape[1]}], got shape {tuple(counts.shape)}"
        )
    return scores.shape[1]


class LoadMeter:
    """Sums each MoE layer's counts over many forwards (an evaluation set for MaxVio_global, a
    group of micro-batches for MaxVio per computation batch). Layers may differ in E."""

    def __init__(self) -> None:
        self.tokens_per_expert: list[Tensor] = []

    def add(self, tokens_per_expert: list[Tensor]) -> None:
        """Adds one forward's counts, one [E_l] tensor per layer."""
        if not self.tokens_per_expert:
            self.tokens_per_expert = [c.detach().to("cpu", torch.int64) for c in tokens_per_expert]
            return
        if len(tokens_per_expert) != len(self.tokens_per_expert):
            raise ValueError(
                f"expected counts of {len(self.tokens_per_expert)} layers, "
                f"got {len(tokens_per_expert)}"
            )
        for total, counts in zip(self.tokens_per_expert, tokens_per_expert, strict=True):
            total += counts.detach().to("cpu", torch.int64)

    def max_violation(self) -> list[float]:
        """MaxVio of each layer's summed counts."""
        return [float(max_violation(counts)) for counts in self.tokens_per_expert]
