"""The study's measurements: MaxVio by computation batch size, per-sequence routing counts, and
future-token leakage (expert choice against token choice)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_train import MICRO

from moe_kernels.layer import moe_layers
from moe_kernels.study.measures import (
    counts_per_sequence,
    future_token_leakage,
    maxvio_by_computation_batch,
)
from moe_kernels.train.config import TrainConfig
from moe_kernels.train.model import MoETransformer

# test_train's micro model, its vocabulary cut to the ids these tests draw.
MODEL = dataclasses.replace(MICRO.model, vocab_size=64)


def model_with(balancing: str) -> MoETransformer:
    torch.manual_seed(0)
    model = MoETransformer(TrainConfig(model=MODEL, balancing=balancing))
    with torch.no_grad():  # weights large enough for the experts to move the logits
        for parameter in model.parameters():
            parameter.mul_(20)
    return model


def tokens(batch=4, seq=16, seed=1):
    return torch.randint(
        0, MODEL.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed)
    )


def test_maxvio_by_computation_batch_sums_consecutive_sequences():
    # Two experts; sequences alternate between all-on-expert-0 and all-on-expert-1.
    counts = torch.tensor([[[2, 0]], [[0, 2]], [[2, 0]], [[0, 2]]])
    result = maxvio_by_computation_batch(counts, [1, 2, 3, 4])
    # Alone, each sequence puts twice the mean on one expert; pairs balance exactly; the first
    # three sequences give loads 4 and 2 around a mean of 3.
    assert result == {1: 1.0, 2: 0.0, 3: pytest.approx(1 / 3), 4: 0.0}
    for bad in (0, 5):
        with pytest.raises(ValueError, match="sizes"):
            maxvio_by_computation_batch(counts, [bad])


def test_counts_per_sequence_add_up_to_the_batch_under_token_choice():
    model = model_with("loss_free")
    batch = tokens()
    per_sequence = counts_per_sequence(model, batch)
    assert per_sequence.shape == (4, 2, MODEL.num_experts)
    assert (per_sequence.sum(dim=2) == 16 * MODEL.topk).all()
    model(batch)  # token choice: a token's experts do not depend on its batch
    whole = torch.stack([layer.tokens_per_expert for layer in moe_layers(model)])
    assert torch.equal(per_sequence.sum(dim=0), whole)


def test_expert_choice_leaks_future_tokens_and_token_choice_does_not():
    batch = tokens(batch=4, seq=16)
    token_choice = future_token_leakage(model_with("loss_free"), batch, position=8)
    expert_choice = future_token_leakage(model_with("expert_choice"), batch, position=8)
    assert token_choice <= 1e-6  # float precision, relative to the largest logit
    assert expert_choice > 1e-2


def test_future_token_leakage_checks_the_position():
    with pytest.raises(ValueError, match="position"):
        future_token_leakage(model_with("none"), tokens(), position=16)
