"""The study's measurements: MaxVio of consecutive computation batches, per-window routing
counts, future-token leakage (expert choice against token choice) and the top-k score sum."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_train import MICRO

from moe_kernels.layer import moe_layers
from moe_kernels.study.measures import (
    consecutive_batch_maxvio,
    future_token_leakage,
    topk_score_sum,
    window_counts,
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


def test_consecutive_batch_maxvio_sums_consecutive_windows():
    # Two experts; sequences alternate between all-on-expert-0 and all-on-expert-1.
    counts = torch.tensor([[[2, 0]], [[0, 2]], [[2, 0]], [[0, 2]]])
    result = consecutive_batch_maxvio(counts, [1, 2, 3, 4])
    # Alone, each sequence puts twice the mean on one expert; pairs balance exactly; the first
    # three sequences give loads 4 and 2 around a mean of 3.
    assert result == {1: 1.0, 2: 0.0, 3: pytest.approx(1 / 3), 4: 0.0}
    for bad in (0, 5):
        with pytest.raises(ValueError, match="sizes"):
            consecutive_batch_maxvio(counts, [bad])


def test_window_counts_are_each_windows_own_routing():
    model = model_with("loss_free")
    batch = tokens(batch=5)
    counts = window_counts(model, batch, batch_size=2)  # batches of 2, 2 and 1 windows
    assert counts.shape == (5, 2, MODEL.num_experts) and counts.dtype == torch.int64
    for window, got in zip(batch, counts, strict=True):
        model(window.unsqueeze(0))  # routed alone
        alone = torch.stack([layer.tokens_per_expert for layer in moe_layers(model)])
        assert torch.equal(got, alone)
    with pytest.raises(ValueError, match="token choice"):
        window_counts(model_with("expert_choice"), batch)


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
    # In batches the mean is over the same tokens.
    assert topk_score_sum(model, tokens(), batch_size=3) == pytest.approx(sums, rel=1e-6)
