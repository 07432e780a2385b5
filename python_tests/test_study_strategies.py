"""The study's arms: every strategy the issue names, on one token budget."""

from __future__ import annotations

import dataclasses

import pytest

from moe_kernels.layer import BALANCING
from moe_kernels.study.strategies import strategies
from moe_kernels.train.config import PRESETS


def test_every_arm_differs_from_the_base_only_in_balancing():
    base = PRESETS["tiny"]
    arms = strategies(base)
    assert {config.balancing for config in arms.values()} == set(BALANCING)
    balancing_fields = {
        "balancing", "rate", "rule", "aux_coeff", "global_counts", "capacity_factor",
        "micro_batch_size", "grad_accumulation",
    }  # fmt: skip
    seed_arm = arms.pop("aux_loss_1e-3_seed1")
    assert seed_arm == dataclasses.replace(arms["aux_loss_1e-3"], seed=base.seed + 1)
    for name, config in arms.items():
        assert config.tokens_per_step == base.tokens_per_step, name
        for field in dataclasses.fields(base):
            if field.name not in balancing_fields:
                assert getattr(config, field.name) == getattr(base, field.name), (name, field)
    assert [arms[f"aux_loss_{a}"].aux_coeff for a in ("1e-2", "1e-3", "1e-4")] == [1e-2, 1e-3, 1e-4]
    assert [arms[f"loss_free_{r}"].rate for r in ("1e-4", "1e-3", "1e-2")] == [1e-4, 1e-3, 1e-2]
    assert arms["loss_free_1e-3_proportional"].rule == "proportional"
    # Micro- and global-batch losses on the same micro-batches of each step: the global
    # loss's balance batch spans 2 and 4 of them.
    for n in (2, 4):
        micro, global_ = arms[f"aux_loss_1e-3_x{n}"], arms[f"global_aux_loss_1e-3_x{n}"]
        assert micro.grad_accumulation == global_.grad_accumulation == n
        assert (micro.balancing, global_.balancing) == ("aux_loss", "global_aux_loss")


def test_a_base_that_does_not_split_is_refused():
    with pytest.raises(ValueError, match="micro-batches"):
        strategies(dataclasses.replace(PRESETS["tiny"], micro_batch_size=3))
