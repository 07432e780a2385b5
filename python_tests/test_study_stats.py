"""The study's statistics against hand-made inputs with known answers: t quantiles (from printed
tables), intervals, the three-way verdict, random computation batches, the balanced router and
the permutation null of domain specialisation."""

from __future__ import annotations

import math

import pytest
import torch

from moe_kernels.balance import max_violation
from moe_kernels.study.stats import (
    AGREES,
    DOES_NOT_AGREE,
    INCONCLUSIVE,
    Interval,
    balanced_router_counts,
    combined,
    computation_batch_curve,
    domain_frequencies,
    domain_specialisation,
    mean_interval,
    paired_difference,
    specialisation_against_null,
    t_quantile,
    verdict,
)


@pytest.mark.parametrize(
    "probability,df,expected",
    # Student's t table (e.g. Fisher & Yates): two-sided 95% and one-sided 95% points.
    [(0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 4, 2.776), (0.975, 7, 2.365),
     (0.975, 30, 2.042), (0.95, 10, 1.812), (0.5, 3, 0.0)],
)  # fmt: skip
def test_t_quantile_matches_the_printed_table(probability, df, expected):
    assert t_quantile(probability, df) == pytest.approx(expected, abs=1e-3)


def test_t_quantile_refuses_what_it_cannot_give():
    with pytest.raises(ValueError, match="probability"):
        t_quantile(0.3, 4)
    with pytest.raises(ValueError, match="df"):
        t_quantile(0.975, 0)


def test_mean_interval_by_hand():
    # Mean 2, sd 1, n 3: half-width t(0.975, 2) / sqrt(3) = 4.3027 / 1.7321 = 2.4841.
    interval = mean_interval([1.0, 2.0, 3.0])
    assert (interval.mean, interval.sd, interval.n) == (2.0, 1.0, 3)
    assert (interval.low, interval.high) == pytest.approx((2 - 2.4841, 2 + 2.4841), abs=1e-4)
    one = mean_interval([5.0])
    assert (one.mean, one.low, one.high) == (5.0, -math.inf, math.inf)
    with pytest.raises(ValueError, match="at least one"):
        mean_interval([])


def test_paired_difference_removes_what_the_seed_shares():
    # Seeds move both arms alike by a lot; the difference is exactly 1 every time.
    a, b = [11.0, 21.0, 31.0, 41.0], [10.0, 20.0, 30.0, 40.0]
    interval = paired_difference(a, b)
    assert (interval.mean, interval.low, interval.high, interval.sd) == (1.0, 1.0, 1.0, 0.0)
    relative = paired_difference([1.1, 2.2], [1.0, 2.0], relative=True)
    assert relative.mean == pytest.approx(0.1) and relative.sd == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="one to one"):
        paired_difference([1.0], [1.0, 2.0])


def interval(low: float, high: float) -> Interval:
    return Interval((low + high) / 2, low, high, 1.0, 4)


@pytest.mark.parametrize(
    "low,high,effect,expected",
    [
        (0.1, 0.5, 0.0, AGREES),  # wholly on the paper's side
        (0.001, 0.004, 0.006, AGREES),  # its side, smaller than its size: still its direction
        (-0.5, -0.1, 0.0, DOES_NOT_AGREE),  # wholly on the other side
        (-0.002, 0.005, 0.006, DOES_NOT_AGREE),  # excludes the paper's 0.6%
        (-0.1, 0.2, 0.0, INCONCLUSIVE),  # straddles 0
        (-0.002, 0.01, 0.006, INCONCLUSIVE),  # holds 0 and the paper's effect
        (-math.inf, math.inf, 0.0, INCONCLUSIVE),  # one seed
    ],
)
def test_verdict_each_way(low, high, effect, expected):
    assert verdict(interval(low, high), effect) == expected


def test_verdict_refuses_a_negative_effect_and_combines_parts():
    with pytest.raises(ValueError, match="paper_effect"):
        verdict(interval(0.0, 1.0), -0.1)
    assert combined([AGREES, AGREES]) == AGREES
    assert combined([AGREES, INCONCLUSIVE]) == INCONCLUSIVE
    assert combined([AGREES, INCONCLUSIVE, DOES_NOT_AGREE]) == DOES_NOT_AGREE


def test_computation_batch_curve_draws_random_sets_of_windows():
    # Two experts, one layer; half the windows put both tokens on expert 0, half on expert 1.
    counts = torch.tensor([[[2, 0]], [[0, 2]]] * 2)
    curve = computation_batch_curve(counts, [1, 2, 4], groups=3000, seed=0)
    assert curve[1] == {"mean": 1.0, "low": 1.0, "high": 1.0}  # one window: MaxVio 1 always
    assert curve[4] == {"mean": 0.0, "low": 0.0, "high": 0.0}  # every window: balanced
    # Two of the four windows, drawn without replacement: alike (MaxVio 1) with chance 1/3.
    assert curve[2]["mean"] == pytest.approx(1 / 3, abs=0.03)
    assert (curve[2]["low"], curve[2]["high"]) == (0.0, 1.0)
    assert computation_batch_curve(counts, [2], groups=50, seed=7) == computation_batch_curve(
        counts, [2], groups=50, seed=7
    )
    for bad in (0, 5):
        with pytest.raises(ValueError, match="sizes"):
            computation_batch_curve(counts, [bad], groups=2)


def test_balanced_router_picks_distinct_experts_uniformly():
    counts = balanced_router_counts(500, tokens=32, num_layers=2, num_experts=8, topk=3)
    assert counts.shape == (500, 2, 8)
    assert (counts.sum(dim=-1) == 32 * 3).all()
    assert (counts <= 32).all()  # an expert at most once per token
    # Every expert gets 3/8 of the tokens on average; over all windows MaxVio is near 0.
    assert counts.double().mean(dim=(0, 1)).tolist() == pytest.approx([12.0] * 8, rel=0.02)
    assert float(max_violation(counts.sum(dim=0)).max()) < 0.03
    # One token choosing every expert: perfectly balanced, whatever the draw.
    assert (balanced_router_counts(3, tokens=1, num_layers=1, num_experts=4, topk=4) == 1).all()


def test_domain_frequencies_and_specialisation_by_hand():
    # 3 windows, 1 layer, 4 experts; windows 0 and 2 are domain 0.
    counts = torch.tensor([[[3, 1, 0, 0]], [[0, 0, 2, 2]], [[1, 1, 2, 0]]])
    frequencies = domain_frequencies(counts, torch.tensor([0, 1, 0]), 2)
    assert frequencies.tolist() == [[[0.5, 0.25, 0.25, 0.0]], [[0.0, 0.0, 0.5, 0.5]]]
    # Each domain's total-variation distance from their mean: 0.5 * (0.25 + 0.125 + 0.125
    # + 0.25) = 0.375.
    assert domain_specialisation(frequencies) == pytest.approx(0.375)
    apart = torch.tensor([[[0.5, 0.5, 0.0, 0.0]], [[0.0, 0.0, 0.5, 0.5]]])
    assert domain_specialisation(apart) == 0.5
    two_layers = torch.cat([apart, torch.full((2, 1, 4), 0.25)], dim=1)
    assert domain_specialisation(two_layers) == 0.25
    with pytest.raises(ValueError, match="at least 2 domains"):
        domain_specialisation(apart[:1])


def test_the_permutation_null_removes_what_chance_gives():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(16)  # 4 domains of 16 windows
    # Routing blind to the domain: the raw value is positive, the corrected one near 0.
    blind = torch.randint(0, 6, (64, 2, 8), generator=generator)
    result = specialisation_against_null(blind, labels, permutations=300, seed=1)
    assert result["observed"] > 0.02
    assert abs(result["corrected"]) < 0.02
    assert result["observed"] < result["null_high"]
    # Each domain on its own two experts: far beyond every shuffle.
    routed = torch.zeros(64, 2, 8, dtype=torch.int64)
    routed[torch.arange(64), :, 2 * labels] = 5
    routed[torch.arange(64), :, 2 * labels + 1] = 3
    result = specialisation_against_null(routed, labels, permutations=100, seed=1)
    # A domain's shares 5/8 and 3/8 against means 5/32 and 3/32, and 6 other experts at 1/32
    # x (5 + 3): 0.5 * (15/32 + 9/32 + 24/32) = 0.75.
    assert result["observed"] == pytest.approx(0.75)
    assert result["corrected"] > 0.6 and result["observed"] > result["null_high"]
    # Every window routed alike: no specialisation, observed or null.
    same = torch.ones(64, 2, 8, dtype=torch.int64)
    assert specialisation_against_null(same, labels, permutations=20) == {
        "observed": 0.0, "null_mean": 0.0, "null_high": 0.0, "corrected": 0.0
    }  # fmt: skip
