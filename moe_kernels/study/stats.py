"""The statistics the study's verdicts rest on: t-intervals over paired seeds, the three-way
verdict rule, MaxVio over random computation batches, and a permutation null for domain
specialisation. Pure functions of their inputs, so each is tested against hand-made data."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from ..balance import max_violation

CONFIDENCE = 0.95
AGREES, DOES_NOT_AGREE, INCONCLUSIVE = "agrees", "does not agree", "inconclusive"


def t_quantile(probability: float, df: int) -> float:
    """The ``probability`` quantile of Student's t with ``df`` degrees of freedom, for
    probability in [0.5, 1): its CDF, integrated from the density by Simpson's rule, inverted
    by bisection (accurate to about 1e-9 for any df >= 1; the study needs no scipy)."""
    if not 0.5 <= probability < 1.0:
        raise ValueError(f"probability must lie in [0.5, 1), got {probability}")
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float) -> float:
        grid = np.linspace(0.0, x, 4097)
        density = np.exp(log_norm - (df + 1) / 2 * np.log1p(grid * grid / df))
        step = x / 4096
        simpson = density[0] + density[-1] + 4 * density[1:-1:2].sum() + 2 * density[2:-1:2].sum()
        return 0.5 + simpson * step / 3

    low, high = 0.0, 1.0
    while cdf(high) < probability:
        low, high = high, 2 * high
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) < probability else (low, middle)
    return (low + high) / 2


@dataclass(frozen=True)
class Interval:
    """A mean over seeds and its two-sided t-interval; infinite with fewer than 2 values."""

    mean: float
    low: float
    high: float
    sd: float
    n: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def mean_interval(values: list[float], confidence: float = CONFIDENCE) -> Interval:
    """The mean of ``values`` (one per seed) with its t-interval at ``confidence``."""
    if not values:
        raise ValueError("mean_interval needs at least one value")
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return Interval(mean, -math.inf, math.inf, math.nan, n)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, sd, n)


def paired_difference(
    a: list[float], b: list[float], relative: bool = False, confidence: float = CONFIDENCE
) -> Interval:
    """The interval of ``a - b`` over paired seeds (``a[i]`` and ``b[i]`` from seed i); with
    ``relative``, of ``(a - b) / b``. Pairing removes what a seed does to both arms alike (its
    initialisation and data order)."""
    if len(a) != len(b):
        raise ValueError(f"paired values must match one to one, got {len(a)} and {len(b)}")
    return mean_interval(
        [(x - y) / y if relative else x - y for x, y in zip(a, b, strict=True)], confidence
    )


def verdict(interval: Interval, paper_effect: float = 0.0) -> str:
    """The three-way verdict on a quantity oriented so that the paper's claim is positive:
    "agrees" when the whole interval is above 0 (on the paper's side); "does not agree" when
    it lies wholly below ``paper_effect`` (>= 0, the size the paper reports), so it excludes
    that effect; "inconclusive" otherwise."""
    if paper_effect < 0:
        raise ValueError(f"paper_effect must be >= 0, got {paper_effect}")
    if interval.low > 0:
        return AGREES
    if interval.high < paper_effect:
        return DOES_NOT_AGREE
    return INCONCLUSIVE


def combined(verdicts: list[str]) -> str:
    """A claim made of several parts: agrees when every part does, does not agree when any
    part does not, inconclusive otherwise."""
    if DOES_NOT_AGREE in verdicts:
        return DOES_NOT_AGREE
    return AGREES if all(v == AGREES for v in verdicts) else INCONCLUSIVE


def computation_batch_curve(
    counts: Tensor, sizes: list[int], groups: int, seed: int = 0
) -> dict[int, dict[str, float]]:
    """MaxVio of random computation batches (arXiv 2408.15664, Figure 5): for each size n,
    ``groups`` random sets of n windows (without replacement within a set) have their counts
    summed per layer; MaxVio averaged over layers gives one value per set. Returns {n: {"mean",
    "low", "high"}}, low and high the 2.5 and 97.5 percentiles over the sets (all three equal
    when n is every window).

    Args:
        counts: [N, L, E] per-window counts.
        sizes: computation batch sizes in windows, each in [1, N].
        groups: random sets per size.
        seed: of the sets' generator.
    """
    num_windows = counts.shape[0]
    generator = torch.Generator().manual_seed(seed)
    curve = {}
    for size in sizes:
        if not 1 <= size <= num_windows:
            raise ValueError(f"sizes must lie in [1, {num_windows}], got {size}")
        if size == num_windows:
            value = float(max_violation(counts.sum(dim=0)).mean())
            curve[size] = {"mean": value, "low": value, "high": value}
            continue
        chosen = torch.rand(groups, num_windows, generator=generator).argsort(dim=1)[:, :size]
        batches = torch.stack([counts[rows].sum(dim=0) for rows in chosen])  # [groups, L, E]
        per_group = max_violation(batches).mean(dim=-1)
        low, high = torch.quantile(per_group, torch.tensor([0.025, 0.975], dtype=torch.float64))
        curve[size] = {"mean": float(per_group.mean()), "low": float(low), "high": float(high)}
    return curve


def balanced_router_counts(
    num_windows: int, tokens: int, num_layers: int, num_experts: int, topk: int, seed: int = 0
) -> Tensor:
    """[N, L, E] counts of a perfectly balanced router: every token picks ``topk`` distinct
    experts uniformly at random, independently of every other token. Its MaxVio is pure
    sampling noise, the floor any router's MaxVio on n windows is read against."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.rand(num_windows * num_layers, tokens, num_experts, generator=generator)
    chosen = picks.argsort(dim=-1)[..., :topk].reshape(num_windows * num_layers, -1)
    counts = torch.zeros(num_windows * num_layers, num_experts, dtype=torch.int64)
    counts.scatter_add_(1, chosen, torch.ones_like(chosen))
    return counts.view(num_windows, num_layers, num_experts)


def domain_frequencies(counts: Tensor, labels: Tensor, num_domains: int) -> Tensor:
    """[N, L, E] per-window counts and [N] domain labels in [0, D) -> [D, L, E] fp64: each
    domain's share of a layer's routed tokens per expert."""
    one_hot = torch.nn.functional.one_hot(labels, num_domains).double()  # [N, D]
    totals = (one_hot.t() @ counts.flatten(1).double()).view(num_domains, *counts.shape[1:])
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


def specialisation_against_null(
    counts: Tensor, labels: Tensor, permutations: int, seed: int = 0
) -> dict[str, float]:
    """Domain specialisation of windows labelled by domain, against a permutation null: the
    same windows with their labels shuffled ``permutations`` times, which keeps every domain's
    window count and every window's routing but breaks any tie between them. Finite samples
    make the raw value positive even for a router blind to domains; ``corrected`` (observed
    minus the null's mean) is what routing by domain adds.

    Returns {"observed", "null_mean", "null_high" (its 97.5 percentile), "corrected"}.
    """
    num_domains = int(labels.max()) + 1
    observed = domain_specialisation(domain_frequencies(counts, labels, num_domains))
    generator = torch.Generator().manual_seed(seed)
    null = torch.tensor(
        [
            domain_specialisation(
                domain_frequencies(
                    counts, labels[torch.randperm(len(labels), generator=generator)], num_domains
                )
            )
            for _ in range(permutations)
        ],
        dtype=torch.float64,
    )
    null_mean = float(null.mean())
    return {
        "observed": observed,
        "null_mean": null_mean,
        "null_high": float(torch.quantile(null, 0.975)),
        "corrected": observed - null_mean,
    }
