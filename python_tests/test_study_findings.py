"""The findings' verdicts follow the numbers, both ways."""

from __future__ import annotations

from moe_kernels.study.findings import findings


def results(lf_maxvio, lf_ppl, lf_by_size, aux_by_size, ec_leak, micro_ppl, global_ppl):
    def arm(ppl, maxvio, by_size=(1.0, 1.0), leak=0.0):
        sizes = {"1": by_size[0], "2": by_size[0], "4": by_size[0], "8": by_size[1]}
        sizes.update({"16": by_size[1], "32": by_size[1], "64": by_size[1]})
        return {
            "summary": {"val_perplexity": ppl, "maxvio_global": maxvio},
            "measures": {"maxvio_by_computation_batch": sizes, "future_token_leakage": leak},
        }

    return {
        "aux_loss_1e-2": arm(110.0, 0.5, aux_by_size),
        "aux_loss_1e-3": arm(micro_ppl, 1.0),
        "aux_loss_1e-4": arm(100.0, 2.0),
        "global_aux_loss_1e-3_x2": arm(global_ppl, 1.0),
        "loss_free_1e-2": arm(lf_ppl, lf_maxvio, lf_by_size),
        "expert_choice": arm(120.0, 0.0, leak=ec_leak),
    }


def test_verdicts_agree_when_the_numbers_do():
    lines = findings(results(0.2, 105.0, (1.0, 0.5), (1.0, 0.95), 0.5, 104.0, 103.0))
    assert len(lines) == 4
    assert all(": agrees." in line for line in lines)
    assert "dilemma" in lines[0] and "Figure 2): agrees" in lines[0]
    assert "loss_free_1e-2: MaxVio_global 0.2, perplexity 105" in lines[0]
    assert "1 -> 0.5 (50% lower)" in lines[1]


def test_verdicts_disagree_when_the_numbers_do():
    lines = findings(results(0.9, 115.0, (1.0, 0.95), (1.0, 0.5), 1e-7, 103.0, 104.0))
    assert sum("does not agree" in line for line in lines) == 4
