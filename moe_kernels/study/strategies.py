"""The arms of the study: one named training configuration per balancing strategy, each trained
from the same seeds (paired: seed i starts every arm from the same weights and draws the same
batches), on the same model, data and token budget. Only how the load is balanced differs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..train.config import TrainConfig

# arXiv 2408.15664's aux-loss baseline and loss-free rate.
PAPER_ALPHA = "1e-3"
PAPER_RATE = 1e-3
# The loss-free rate of the Table-2 pair, held throughout: the one that keeps the balance in a
# few hundred steps. After a warm-up at 1e-2, the paper's 1e-3 cannot follow the router while
# the learning rate is high: in the tiny preset, MaxVio_global (held out) rose from 0.34 to 1.1
# within 25 steps of the switch at step 150 and was back to 0.32 only at step 300, still
# falling (after a switch at step 100: 2.2, and 1.4 at step 300); at 1e-2 it stays between
# 0.34 and 0.48 from step 150 on.
LOSS_FREE_RATE = 1e-2
# The aux loss's coefficients on the balance-perplexity frontier (Figure 2), beside
# PAPER_ALPHA; the largest must reach loss-free's balance.
FRONTIER_ALPHAS = ("3e-3", "1e-2", "3e-2")
# Micro- against global-batch balance (arXiv 2501.11873) at a coefficient that binds: balance
# groups of 1 and 4 sequences, against the whole micro-batch (the aux-loss arm of QWEN_ALPHA).
QWEN_ALPHA = "3e-2"
BALANCE_GROUPS = (1, 4)

TABLE_PAIR = (f"aux_loss_{PAPER_ALPHA}", "loss_free_1e-2")


def aux_arm(alpha: str) -> str:
    return f"aux_loss_{alpha}"


def group_arm(group: int) -> str:
    """The arm balancing groups of ``group`` sequences at QWEN_ALPHA."""
    return f"seq_aux_loss_g{group}_{QWEN_ALPHA}"


@dataclass(frozen=True)
class Seeds:
    """How many paired seeds each question gets: the Table-2 pair (aux loss at the paper's
    alpha against loss-free), the frontier's other alphas, and the balance-batch sweep."""

    table: int
    frontier: int
    balance_batch: int


@dataclass(frozen=True)
class Arm:
    config: TrainConfig  # the first seed's
    seeds: tuple[int, ...]

    def run_config(self, seed: int) -> TrainConfig:
        return dataclasses.replace(self.config, seed=seed)


def strategies(base: TrainConfig, seeds: Seeds, bias_warmup_steps: int) -> dict[str, Arm]:
    """Every arm the study trains, derived from ``base`` (its model, data, steps, tokens per
    step and first seed):

    - ``aux_loss_1e-3`` and ``loss_free_1e-2`` (sign rule): arXiv 2408.15664's Table 2;
    - ``aux_loss_{3e-3,1e-2,3e-2}``: its Figure 2 frontier; ``loss_free_warm`` (one seed): rate
      1e-2 for ``bias_warmup_steps`` updates, then the paper's 1e-3;
    - ``seq_aux_loss_g{1,4}_3e-2``: the aux loss over groups of 1 and 4 sequences, against
      ``aux_loss_3e-2`` over the whole micro-batch (arXiv 2501.11873's balance batch);
    - ``expert_choice`` (capacity factor 1, one seed): whether routing leaks future tokens.
    """
    if base.grad_accumulation != 1:
        raise ValueError("the study's base trains one micro-batch per step (grad_accumulation=1)")
    batch = base.micro_batch_size
    if any(batch % group or group >= batch for group in BALANCE_GROUPS):
        raise ValueError(
            f"the base's micro-batch of {batch} sequences must split into balance groups of "
            f"{BALANCE_GROUPS} sequences, each smaller than it"
        )

    def first(count: int) -> tuple[int, ...]:
        return tuple(range(base.seed, base.seed + count))

    def arm(count: int, balancing: str, **changes: object) -> Arm:
        return Arm(dataclasses.replace(base, balancing=balancing, **changes), first(count))

    def aux(alpha: str, count: int) -> Arm:
        return arm(count, "aux_loss", aux_coeff=float(alpha))

    arms = {
        aux_arm(PAPER_ALPHA): aux(PAPER_ALPHA, seeds.table),
        TABLE_PAIR[1]: arm(seeds.table, "loss_free", rate=LOSS_FREE_RATE, rule="sign"),
    }
    for alpha in FRONTIER_ALPHAS:
        count = max(seeds.frontier, seeds.balance_batch if alpha == QWEN_ALPHA else 0)
        arms[aux_arm(alpha)] = aux(alpha, count)
    arms["loss_free_warm"] = arm(
        1,
        "loss_free",
        rate=PAPER_RATE,
        bias_warmup_rate=LOSS_FREE_RATE,
        bias_warmup_steps=bias_warmup_steps,
        rule="sign",
    )
    for group in BALANCE_GROUPS:
        arms[group_arm(group)] = arm(
            seeds.balance_batch,
            "seq_aux_loss",
            aux_coeff=float(QWEN_ALPHA),
            aux_group_size=group,
        )
    arms["expert_choice"] = arm(1, "expert_choice", capacity_factor=1.0)
    return arms
