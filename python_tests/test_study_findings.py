"""The findings' verdicts follow their stated rules on hand-made results: each finding agrees,
does not agree, and is inconclusive when the seeds disagree; Figure 5 says when the scale
cannot show it."""

from __future__ import annotations

import pytest

from moe_kernels.study.findings import PAPER_PERPLEXITY_GAIN, findings
from moe_kernels.study.stats import (
    AGREES,
    DOES_NOT_AGREE,
    INCONCLUSIVE,
    Interval,
    paired_difference,
    verdict,
)
from moe_kernels.study.strategies import BALANCE_GROUPS, QWEN_ALPHA, group_arm

SEEDS = ("0", "1", "2", "3")
# What seeds do to every arm alike (paired differences remove it), and noise of one arm's own.
SHARED = (0.0, 3.0, -2.0, 1.0)
NOISE = (1.0, -1.0, 1.0, -1.0)


def run(ppl, maxvio, low_batch, high_batch, topk, specialisation, leak=0.0) -> dict:
    return {
        "summary": {"maxvio_batch_final": maxvio},
        "measures": {
            "perplexity": ppl,
            "maxvio_global": maxvio,
            "future_token_leakage": leak,
            "computation_batch": {
                "16": {"mean": low_batch, "low": low_batch, "high": low_batch},
                "128": {"mean": high_batch, "low": high_batch, "high": high_batch},
            },
            "consecutive_batches": {"2": maxvio},
            "topk_score_sum": topk,
            "domain_specialisation": {"corrected": specialisation},
        },
    }


def arm(ppl, maxvio, curve=(1.0, 1.0), topk=0.5, specialisation=0.01, noise=0.0, seeds=SEEDS):
    """An arm's runs: seed i moves perplexity by SHARED[i] and, with ``noise``, every measure by
    ``noise`` * NOISE[i] of its own."""
    runs = {}
    for seed in seeds:
        i = int(seed)
        jitter = noise * NOISE[i]
        runs[seed] = run(
            ppl * (1 + SHARED[i] / 100) + ppl * jitter,
            maxvio * (1 + jitter),
            curve[0] * (1 + jitter),
            curve[1] * (1 - jitter),
            topk + jitter,
            specialisation + jitter,
        )
    return runs


def study(way: str) -> dict:
    """Hand-made results on which every finding agrees, none does, or the seeds disagree."""
    noise = 0.5 if way == INCONCLUSIVE else 0.0
    better = {AGREES: 1, DOES_NOT_AGREE: -1, INCONCLUSIVE: 0}[way]
    lf_maxvio = 0.2 if better >= 0 else 2.0
    runs = {
        "aux_loss_1e-3": arm(100.0, 1.0, curve=(1.02, 1.0)),
        "loss_free_1e-2": arm(
            100.0 - 2 * better,
            lf_maxvio,
            curve=(0.5, 0.5 - 0.3 * better) if better else (0.5, 0.5),
            noise=noise,
        ),
        "aux_loss_3e-3": arm(101.0, 0.6),
        "aux_loss_1e-2": arm(102.0, 0.3),
        "aux_loss_3e-2": arm(
            104.0 - 2 * better, 0.15, topk=0.5 + 0.1 * better, specialisation=0.01 + 0.02 * better,
            noise=noise,
        ),
        "loss_free_warm": arm(103.0, 0.25, seeds=SEEDS[:1]),
        group_arm(BALANCE_GROUPS[0]): arm(104.0, 0.2),
        group_arm(BALANCE_GROUPS[1]): arm(104.0, 0.18),
        "expert_choice": {"0": run(105.0, 0.0, 0.0, 0.0, 0.3, 0.0, leak=0.2 * (way == AGREES))},
    }  # fmt: skip
    return {
        "preset": "hand-made",
        "design": {
            "large_batches": [16, 128],
            "curve_groups": 10,
            "tokens_per_step": 1024,
            "seq_len": 128,
            "windows_per_domain": 8,
            "null_permutations": 10,
        },
        "domains": ["asyncio", "email"],
        "runs": runs,
        # Above loss-free's plateau, so the scale can show Figure 5.
        "balanced_router": {"16": {"mean": 3.0}},
        "expert_parallel": {"2": {"aux_loss_1e-3": {"2": 1.0}, "loss_free_1e-2": {"2": lf_maxvio}}},
    }


@pytest.mark.parametrize("way", [AGREES, DOES_NOT_AGREE, INCONCLUSIVE])
def test_every_finding_follows_the_numbers(way):
    results = findings(study(way))
    assert [f["number"] for f in results] == [1, 2, 3, 4]
    table, figure, leak, global_ = results
    assert table["verdict"] == way
    assert global_["verdict"] == way
    assert figure["verdict"] == way
    assert leak["verdict"] == (AGREES if way == AGREES else DOES_NOT_AGREE)  # exact: 2 ways
    for finding in results:
        assert finding["criterion"] and finding["claim"]
        for part in finding["parts"]:  # each part's verdict is the rule applied to its interval
            assert part["verdict"] == verdict(Interval(**part["interval"]), part["paper_effect"])


def test_parts_are_the_paired_differences_of_the_runs():
    hand = study(AGREES)
    table = findings(hand)[0]
    perplexity = {p["name"]: p for p in table["parts"]}["perplexity at the paper's alpha"]
    aux = [hand["runs"]["aux_loss_1e-3"][s]["measures"]["perplexity"] for s in SEEDS]
    loss_free = [hand["runs"]["loss_free_1e-2"][s]["measures"]["perplexity"] for s in SEEDS]
    expected = paired_difference(aux, loss_free, relative=True)
    assert perplexity["interval"] == expected.to_dict()
    # The quantity says what was computed: relative to the second arm.
    assert perplexity["quantity"] == (
        "(perplexity(aux_loss_1e-3) - perplexity(loss_free_1e-2)) / perplexity(loss_free_1e-2)"
    )
    assert perplexity["relative"] and not table["parts"][0]["relative"]
    assert perplexity["paper_effect"] == pytest.approx(0.06 / 9.50) == PAPER_PERPLEXITY_GAIN
    # The frontier part compares the smallest alpha at least as balanced as loss-free (0.2).
    frontier = {p["name"]: p for p in table["parts"]}[
        "perplexity on the frontier, at equal or better balance"
    ]
    assert "aux_loss_3e-2" in frontier["quantity"]


def test_a_perplexity_gain_smaller_than_the_papers_does_not_agree():
    hand = study(AGREES)
    for seed, run in hand["runs"]["loss_free_1e-2"].items():  # 0.2% better on every seed
        aux = hand["runs"]["aux_loss_1e-3"][seed]["measures"]["perplexity"]
        run["measures"]["perplexity"] = aux * (1 - 0.002) + 0.0001 * int(seed)
    parts = {p["name"]: p for p in findings(hand)[0]["parts"]}
    assert parts["perplexity at the paper's alpha"]["verdict"] == AGREES  # its direction
    for seed, run in hand["runs"]["loss_free_1e-2"].items():  # 0.2% worse to 0.1% better
        aux = hand["runs"]["aux_loss_1e-3"][seed]["measures"]["perplexity"]
        run["measures"]["perplexity"] = aux * (1 + 0.001 - 0.001 * int(seed))
    parts = {p["name"]: p for p in findings(hand)[0]["parts"]}
    assert parts["perplexity at the paper's alpha"]["verdict"] == DOES_NOT_AGREE  # below 0.63%


def test_figure_5_says_when_the_scale_cannot_show_it():
    hand = study(AGREES)
    hand["balanced_router"]["16"]["mean"] = 0.1  # loss-free's plateau 0.2 sits above it
    figure = findings(hand)[1]
    assert figure["verdict"] == "cannot show at this scale"
    assert any("Cannot show at this scale" in note for note in figure["notes"])
    assert [p["verdict"] for p in figure["parts"]] == [AGREES, AGREES]  # still reported


def test_without_domains_specialisation_is_left_out():
    hand = study(AGREES)
    hand["domains"] = []
    names = [p["name"] for p in findings(hand)[3]["parts"]]
    assert names == ["perplexity", "top-k score sum"]
    assert QWEN_ALPHA in findings(hand)[3]["criterion"]
