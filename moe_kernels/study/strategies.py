"""The arms of the study: one named training configuration per balancing strategy, all on the
same model, data, seed and token budget (only how the load is balanced differs)."""

from __future__ import annotations

import dataclasses

from ..train.config import TrainConfig

AUX_ALPHAS = ("1e-2", "1e-3", "1e-4")
LOSS_FREE_RATES = ("1e-4", "1e-3", "1e-2")
# Micro-batches a step's sequences are split into, for the micro- and global-batch aux losses.
SPLITS = (2, 4)
SEED_ARM = "aux_loss_1e-3_seed1"


def split_pair(split: int) -> tuple[str, str]:
    """The micro-batch and global-batch aux-loss arms whose steps are split ``split`` ways."""
    return f"aux_loss_1e-3_x{split}", f"global_aux_loss_1e-3_x{split}"


def strategies(base: TrainConfig) -> dict[str, TrainConfig]:
    """Every arm the study trains, derived from ``base`` (its model, data, seed, steps and
    tokens per step):

    - ``none``; ``aux_loss`` at alpha 1e-2, 1e-3, 1e-4 (arXiv 2408.15664's dilemma);
      ``seq_aux_loss`` (DeepSeek-V3, alpha 1e-3);
    - micro-batch against global-batch balance (arXiv 2501.11873, alpha 1e-3): the step's
      sequences split into 2 or 4 micro-batches of gradient accumulation, then
      ``aux_loss_1e-3_x{n}`` balances each micro-batch on its own, while
      ``global_aux_loss_1e-3_x{n}`` counts every micro-batch of the step so far: its balance
      batch is n micro-batches, as n data-parallel ranks would give;
    - ``loss_free`` at rates 1e-4, 1e-3, 1e-2, sign rule, and 1e-3 proportional;
    - ``expert_choice`` (capacity factor 1);
    - ``aux_loss_1e-3_seed1``: ``aux_loss_1e-3`` from another seed, for the scale of the
      differences chance alone makes.
    """
    sequences = base.micro_batch_size * base.grad_accumulation

    def arm(balancing: str, micro_batches: int = 1, **changes: object) -> TrainConfig:
        if sequences % micro_batches:
            raise ValueError(
                f"the base's {sequences} sequences per step do not split into {micro_batches} "
                "micro-batches"
            )
        return dataclasses.replace(
            base,
            balancing=balancing,
            micro_batch_size=sequences // micro_batches,
            grad_accumulation=micro_batches,
            **changes,
        )

    arms = {"none": arm("none")}
    for alpha in AUX_ALPHAS:
        arms[f"aux_loss_{alpha}"] = arm("aux_loss", aux_coeff=float(alpha))
    arms["seq_aux_loss_1e-3"] = arm("seq_aux_loss", aux_coeff=1e-3)
    for split in SPLITS:
        micro, global_ = split_pair(split)
        arms[micro] = arm("aux_loss", split, aux_coeff=1e-3)
        arms[global_] = arm("global_aux_loss", split, aux_coeff=1e-3, global_counts="running")
    for rate in LOSS_FREE_RATES:
        arms[f"loss_free_{rate}"] = arm("loss_free", rate=float(rate), rule="sign")
    arms["loss_free_1e-3_proportional"] = arm("loss_free", rate=1e-3, rule="proportional")
    arms["expert_choice"] = arm("expert_choice", capacity_factor=1.0)
    arms[SEED_ARM] = dataclasses.replace(arms["aux_loss_1e-3"], seed=base.seed + 1)
    return arms
