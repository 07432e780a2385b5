"""What the study measures on a trained model: each window's routing counts (for balance per
computation batch and by domain), whether routing leaks future tokens, and how decided its
router is."""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from ..balance import counts_per_sequence, max_violation, routing_probabilities
from ..layer import moe_layers


@torch.no_grad()
def window_counts(model: nn.Module, windows: Tensor, batch_size: int = 64) -> Tensor:
    """[N, S] token ids -> [N, L, E] int64: each MoE layer's expert counts of each window.
    Token choice routes every token on its own, so windows can share a forward; expert
    choice, whose experts pick among the batch's tokens, is refused."""
    layers = list(moe_layers(model))
    if any(layer.balancing == "expert_choice" for layer in layers):
        raise ValueError("window_counts needs token choice: expert choice routes by the batch")
    model.eval()
    captured: list[Tensor] = []

    def keep_ids(router, args, output) -> None:
        captured.append(output[1])  # [B * S, k] expert ids

    handles = [layer.router.register_forward_hook(keep_ids) for layer in layers]
    per_batch = []
    try:
        for first in range(0, windows.shape[0], batch_size):
            batch = windows[first : first + batch_size]
            model(batch)
            per_batch.append(
                torch.stack(
                    [
                        counts_per_sequence(
                            ids.view(batch.shape[0], -1, layer.topk), layer.num_experts
                        ).cpu()
                        for ids, layer in zip(captured, layers, strict=True)
                    ],
                    dim=1,
                )
            )
            captured.clear()
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(per_batch)


def consecutive_batch_maxvio(counts: Tensor, sizes: list[int]) -> dict[int, float]:
    """MaxVio of consecutive computation batches, what expert-parallel ranks that each route
    their share of ``size`` consecutive windows see (``expert_parallel`` checks it): windows
    grouped ``size`` at a time, each group's counts summed per layer, MaxVio of each group and
    layer averaged. Windows past the last whole group are left out.

    Args:
        counts: [N, L, E] per-window counts (``window_counts``).
        sizes: computation batch sizes in sequences, each in [1, N].

    Returns:
        {size: mean MaxVio}.
    """
    num_sequences = counts.shape[0]
    result = {}
    for size in sizes:
        if not 1 <= size <= num_sequences:
            raise ValueError(f"sizes must lie in [1, {num_sequences}], got {size}")
        groups = num_sequences // size
        batched = counts[: groups * size].reshape(groups, size, *counts.shape[1:]).sum(dim=1)
        result[size] = float(max_violation(batched).mean())
    return result


@torch.no_grad()
def future_token_leakage(model: nn.Module, tokens: Tensor, position: int, seed: int = 0) -> float:
    """How much the outputs at positions before ``position`` move when every token from
    ``position`` on, in every sequence of the batch, is replaced by a random one: the largest
    change of a logit, relative to the largest logit. A causal model whose routing is per token (token choice, any
    bias) gives zero to float precision (about 1e-7); expert choice, whose experts pick among all tokens of
    the batch, lets the later tokens decide which earlier ones an expert takes.

    Args:
        model: a causal language model, [B, S] ids -> [B, S, V] logits.
        tokens: [B, S] ids.
        position: the first replaced position, in [1, S).
    """
    if not 1 <= position < tokens.shape[1]:
        raise ValueError(f"position must lie in [1, {tokens.shape[1]}), got {position}")
    model.eval()
    g = torch.Generator().manual_seed(seed)
    vocab = int(tokens.max()) + 1
    changed = tokens.clone()
    changed[:, position:] = torch.randint(0, vocab, changed[:, position:].shape, generator=g)
    before = model(tokens)[:, :position].float()
    after = model(changed)[:, :position].float()
    return float((after - before).abs().max() / before.abs().max())


@torch.no_grad()
def topk_score_sum(model: nn.Module, tokens: Tensor, batch_size: int = 64) -> list[float]:
    """Per MoE layer, the mean over tokens of the sum of the k largest routing probabilities
    (``balance.routing_probabilities``; arXiv 2501.11873's measure of specialisation): 1 when
    the router puts everything on k experts, k/E when it cannot tell them apart. The bias of
    loss-free balancing does not enter: it chooses, it does not score. ``tokens`` [N, S] go
    through the model ``batch_size`` sequences at a time."""
    model.eval()
    layers = list(moe_layers(model))
    sums = torch.zeros(len(layers), dtype=torch.float64)

    def measure(index: int, layer, args) -> None:
        tokens_in = args[0].reshape(-1, layer.hidden_size)
        scores = routing_probabilities(layer.router.logits(tokens_in), layer.router.score_fn)
        sums[index] += scores.topk(layer.topk, dim=-1).values.sum(dim=-1).double().sum().cpu()

    handles = [
        layer.register_forward_pre_hook(partial(measure, index))
        for index, layer in enumerate(layers)
    ]
    try:
        for first in range(0, tokens.shape[0], batch_size):
            model(tokens[first : first + batch_size])
    finally:
        for handle in handles:
            handle.remove()
    return (sums / tokens.numel()).tolist()
