"""The findings' verdicts follow the numbers, both ways."""

from __future__ import annotations

from moe_kernels.study.findings import findings, seed_noise


def study(agree: bool) -> dict:
    """Hand-made results on which every finding holds (``agree``) or none does."""

    def arm(ppl, maxvio, by_size=(1.0, 1.0), leak=0.0, specialisation=0.1, topk_sum=0.5):
        sizes = {"1": by_size[0], "2": by_size[0], "4": by_size[0], "8": by_size[1]}
        sizes.update({"16": by_size[1], "32": by_size[1], "64": by_size[1]})
        return {
            "summary": {"val_perplexity": ppl, "maxvio_global": maxvio},
            "measures": {
                "maxvio_by_computation_batch": sizes,
                "future_token_leakage": leak,
                "domain_specialisation": specialisation,
                "topk_score_sum": [topk_sum, topk_sum],
            },
        }

    lf_maxvio, lf_ppl = (0.2, 105.0) if agree else (0.9, 115.0)
    lf_by_size, aux_by_size = ((1.0, 0.5), (1.0, 0.95)) if agree else ((1.0, 0.95), (1.0, 0.5))
    better = -1.0 if agree else 1.0  # the global arms' perplexity against the micro ones'
    specialises = 0.05 if agree else -0.05
    return {
        "preset": "hand-made",
        "domains": ["asyncio", "email"],
        "arms": {
            "aux_loss_1e-2": arm(110.0, 0.5, aux_by_size),
            "aux_loss_1e-3": arm(105.0, 1.0),
            "aux_loss_1e-4": arm(100.0 if agree else 120.0, 2.0),
            "aux_loss_1e-3_x2": arm(104.0, 1.0),
            "global_aux_loss_1e-3_x2": arm(
                104.0 + better, 1.0, specialisation=0.1 + specialises, topk_sum=0.5 + specialises
            ),
            "aux_loss_1e-3_x4": arm(106.0, 1.0),
            "global_aux_loss_1e-3_x4": arm(
                106.0 + better, 1.0, specialisation=0.1 + specialises, topk_sum=0.5 + specialises
            ),
            "loss_free_1e-2": arm(lf_ppl, lf_maxvio, lf_by_size),
            "loss_free_1e-3": arm(99.0, 1.5),
            "expert_choice": arm(120.0, 0.0, leak=0.5 if agree else 1e-7),
        },
        "expert_parallel": {
            "2": {"loss_free_1e-2": {"2": 1.0, "4": 1.0}},
            "4": {"loss_free_1e-2": {"4": 1.0, "8": 0.75}},
        },
    }


def test_verdicts_agree_when_the_numbers_do():
    lines = findings(study(agree=True))
    assert len(lines) == 4
    assert all("does not agree" not in line for line in lines)
    assert sum(line.count(": agrees") for line in lines) == 7  # 1 has two parts, 4 three
    assert "dilemma" in lines[0] and "Figure 2): agrees" in lines[0]
    # Each alpha's arm against the best-balanced loss-free arm that beats it on both counts.
    assert (
        "aux_loss_1e-4 (MaxVio_global 2, perplexity 100): beaten by loss_free_1e-3 "
        "(MaxVio_global 1.5, perplexity 99); aux_loss_1e-3 (MaxVio_global 1, perplexity 105): "
        "beaten by loss_free_1e-2 (MaxVio_global 0.2, perplexity 105)"
    ) in lines[0]
    assert "1 -> 0.5 (50% lower)" in lines[1]
    # The expert-parallel check: 4 runs, at most 0.25 from the grouping (8 sequences: 0.5).
    assert "batches of 2, 4, 8 sequences, 4 runs" in lines[1] and "at most 0.25" in lines[1]
    assert "perplexity 104 (aux_loss_1e-3_x2) against 103 (global_aux_loss_1e-3_x2)" in lines[3]
    assert "(higher top-k score sum): agrees: 0.5 against 0.55; 0.5 against 0.55." in lines[3]
    assert "2 domains): agrees: domain specialisation 0.1 against 0.15;" in lines[3]


def test_verdicts_disagree_when_the_numbers_do():
    lines = findings(study(agree=False))
    assert sum(line.count("does not agree") for line in lines) == 7
    assert all(": agrees" not in line for line in lines)
    assert "aux_loss_1e-2 (MaxVio_global 0.5, perplexity 110): no loss-free arm" in lines[0]


def test_without_domains_specialisation_by_domain_is_not_judged():
    results = study(agree=True)
    results["domains"] = []
    fourth = findings(results)[3]
    assert "by domain" not in fourth and "top-k score sum" in fourth


def test_seed_noise_compares_the_same_arm_from_two_seeds():
    results = study(agree=True)
    results["arms"]["aux_loss_1e-3_seed1"] = {
        "summary": {"val_perplexity": 107.5, "maxvio_global": 1.25}
    }
    line = seed_noise(results)
    assert "perplexity 105 and 107.5, MaxVio_global 1 and 1.25" in line
