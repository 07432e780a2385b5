"""What the study measures on a trained model, beside validation loss and MaxVio_global:
balance per computation batch as the batch grows, whether routing leaks future tokens, and how
specialised its experts are."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..balance import max_violation, routing_probabilities
from ..layer import moe_layers


@torch.no_grad()
def counts_per_sequence(model: nn.Module, tokens: Tensor) -> Tensor:
    """[N, S] token ids -> [N, L, E] int64: each MoE layer's expert counts of each sequence,
    routed one sequence per forward (the routing of one sequence, never its neighbours': with
    expert choice a token's experts depend on its batch)."""
    model.eval()
    per_sequence = []
    for sequence in tokens:
        model(sequence.unsqueeze(0))
        per_sequence.append(
            torch.stack([layer.tokens_per_expert.cpu() for layer in moe_layers(model)])
        )
    return torch.stack(per_sequence)


def maxvio_by_computation_batch(counts: Tensor, sizes: list[int]) -> dict[int, float]:
    """MaxVio per computation batch as it grows (arXiv 2408.15664, Figure 5): consecutive
    sequences grouped ``size`` at a time, each group's counts summed per layer, MaxVio of each
    group and layer averaged. Sequences past the last whole group are left out.

    Args:
        counts: [N, L, E] per-sequence counts (``counts_per_sequence``).
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
def topk_score_sum(model: nn.Module, tokens: Tensor) -> list[float]:
    """Per MoE layer, the mean over tokens of the sum of the k largest routing probabilities
    (``balance.routing_probabilities``; arXiv 2501.11873's measure of specialisation): 1 when
    the router puts everything on k experts, k/E when it cannot tell them apart. The bias of
    loss-free balancing does not enter: it chooses, it does not score."""
    model.eval()
    layers = moe_layers(model)
    sums: list[float] = []

    def measure(layer, args) -> None:
        tokens_in = args[0].reshape(-1, layer.hidden_size)
        scores = routing_probabilities(layer.router.logits(tokens_in), layer.router.score_fn)
        sums.append(float(scores.topk(layer.topk, dim=-1).values.sum(dim=-1).mean()))

    handles = [layer.register_forward_pre_hook(measure) for layer in layers]
    try:
        model(tokens)
    finally:
        for handle in handles:
            handle.remove()
    return sums


def expert_frequency(counts: Tensor) -> Tensor:
    """[N, L, E] per-sequence counts -> [L, E] fp64: each expert's share of a layer's
    routed tokens over all N sequences."""
    totals = counts.sum(dim=0).double()
    return totals / totals.sum(dim=-1, keepdim=True)


def domain_specialisation(frequencies: Tensor) -> float:
    """How differently a model routes each domain's text: [D, L, E] expert frequencies of D
    domains -> the total-variation distance between a domain's frequencies and their mean
    over the domains, averaged over domains and layers. 0 when every domain is routed alike;
    it grows as experts come to serve some domains and not others."""
    if frequencies.shape[0] < 2:
        raise ValueError(
            f"domain specialisation needs at least 2 domains, got {frequencies.shape[0]}"
        )
    distance = 0.5 * (frequencies - frequencies.mean(dim=0)).abs().sum(dim=-1)
    return float(distance.mean())
