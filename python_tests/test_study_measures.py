"""The study's measurements: MaxVio by computation batch size, per-sequence routing counts,
future-token leakage (expert choice against token choice), the top-k score sum, and expert
frequencies per domain with their specialisation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_train import MICRO

from moe_kernels.layer import moe_layers
from moe_kernels.study.measures import (
    counts_per_sequence,
    domain_specialisation,
    expert_frequency,
    future_token_leakage,
    maxvio_by_computation_batch,
    topk_score_sum,
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


@pytest.mark.parametrize("score_fn", ["sigmoid", "softmax"])
def test_topk_score_sum_of_each_layer_is_its_routers_largest_probabilities(score_fn):
    torch.manual_seed(0)
    config = TrainConfig(model=dataclasses.replace(MODEL, score_fn=score_fn), balancing="loss_free")
    model = MoETransformer(config)
    layers = list(moe_layers(model))
    for layer in layers:  # a bias that changes the choice must not change the measure
        layer.balancer.bias.normal_(std=10.0)
    inputs = {}
    for layer in layers:
        layer.register_forward_pre_hook(lambda m, args: inputs.__setitem__(m, args[0]))
    sums = topk_score_sum(model, tokens())
    assert len(sums) == len(layers)
    for layer, got in zip(layers, sums, strict=True):
        logits = inputs[layer].reshape(-1, MODEL.hidden_size) @ layer.router.weight.detach().T
        scores = logits.softmax(-1) if score_fn == "softmax" else logits.sigmoid()
        scores = scores / scores.sum(-1, keepdim=True)
        expected = scores.sort(-1, descending=True).values[:, : MODEL.topk].sum(-1).mean()
        assert got == pytest.approx(float(expected), rel=1e-5)
        assert MODEL.topk / MODEL.num_experts < got < 1


def test_expert_frequency_and_domain_specialisation_by_hand():
    # 2 sequences, 1 layer, 4 experts: the shares of all routed tokens.
    counts = torch.tensor([[[3, 1, 0, 0]], [[1, 1, 2, 0]]])
    assert expert_frequency(counts).tolist() == [[0.5, 0.25, 0.25, 0.0]]
    # Two domains on disjoint experts are as far apart as can be from their mean, 0.5 each;
    # identical domains not at all; the distance is averaged over layers.
    apart = torch.tensor([[[0.5, 0.5, 0.0, 0.0]], [[0.0, 0.0, 0.5, 0.5]]])
    assert domain_specialisation(apart) == 0.5
    alike = torch.full((3, 1, 4), 0.25)
    assert domain_specialisation(alike) == 0.0
    two_layers = torch.cat([apart, torch.full((2, 1, 4), 0.25)], dim=1)
    assert domain_specialisation(two_layers) == 0.25
    with pytest.raises(ValueError, match="at least 2 domains"):
        domain_specialisation(alike[:1])
