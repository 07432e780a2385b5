"""The study's arms: every question's strategies on one token budget, from paired seeds."""

from __future__ import annotations

import dataclasses

import pytest

from moe_kernels.study.strategies import (
    BALANCE_GROUPS,
    FRONTIER_ALPHAS,
    PAPER_ALPHA,
    QWEN_ALPHA,
    TABLE_PAIR,
    Seeds,
    aux_arm,
    group_arm,
    strategies,
)
from moe_kernels.train.config import PRESETS

BASE = PRESETS["tiny"]
SEEDS = Seeds(table=5, frontier=2, balance_batch=3)


def test_every_arm_differs_from_the_base_only_in_balancing():
    arms = strategies(BASE, SEEDS, bias_warmup_steps=60)
    balancing_fields = {
        "balancing", "rate", "bias_warmup_rate", "bias_warmup_steps", "rule", "aux_coeff",
        "aux_group_size", "capacity_factor",
    }  # fmt: skip
    for name, arm in arms.items():
        assert arm.seeds[0] == BASE.seed and arm.config.seed == BASE.seed
        assert arm.run_config(7) == dataclasses.replace(arm.config, seed=7)
        for field in dataclasses.fields(BASE):
            if field.name not in balancing_fields:
                assert getattr(arm.config, field.name) == getattr(BASE, field.name), (name, field)
    aux, loss_free = (arms[name] for name in TABLE_PAIR)
    assert (aux.config.balancing, aux.config.aux_coeff) == ("aux_loss", float(PAPER_ALPHA))
    assert (loss_free.config.balancing, loss_free.config.rate) == ("loss_free", 1e-2)
    assert loss_free.config.bias_warmup_steps == 0 and loss_free.config.rule == "sign"
    assert len(aux.seeds) == len(loss_free.seeds) == SEEDS.table
    warm = arms["loss_free_warm"].config  # 1e-2 for the warm-up, then the paper's 1e-3
    assert (warm.bias_warmup_rate, warm.bias_warmup_steps, warm.rate) == (1e-2, 60, 1e-3)
    for alpha in FRONTIER_ALPHAS:
        arm = arms[aux_arm(alpha)]
        assert arm.config.aux_coeff == float(alpha)
        expected = SEEDS.balance_batch if alpha == QWEN_ALPHA else SEEDS.frontier
        assert len(arm.seeds) == expected
    # The balance-batch sweep: groups of 1 and 4 sequences, then the whole micro-batch, all
    # at one alpha, and the same seeds.
    for group in BALANCE_GROUPS:
        arm = arms[group_arm(group)]
        assert (arm.config.balancing, arm.config.aux_group_size) == ("seq_aux_loss", group)
        assert arm.config.aux_coeff == float(QWEN_ALPHA)
        assert arm.seeds == arms[aux_arm(QWEN_ALPHA)].seeds
    assert arms["expert_choice"].config.balancing == "expert_choice"
    assert len(arms["expert_choice"].seeds) == len(arms["loss_free_warm"].seeds) == 1


def test_a_base_the_sweep_cannot_use_is_refused():
    with pytest.raises(ValueError, match="balance groups"):
        strategies(dataclasses.replace(BASE, micro_batch_size=6), SEEDS, 10)
    with pytest.raises(ValueError, match="balance groups"):
        strategies(dataclasses.replace(BASE, micro_batch_size=4), SEEDS, 10)
    with pytest.raises(ValueError, match="grad_accumulation"):
        strategies(dataclasses.replace(BASE, grad_accumulation=2), SEEDS, 10)
