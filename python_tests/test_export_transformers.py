"""A moe-train model exported as a transformers model (GLM-4-MoE's layout): loaded back by
``from_pretrained``, alone and patched, it gives the trained model's logits."""

import dataclasses

import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM

from moe_kernels.integrations.transformers import patch
from moe_kernels.train import export_transformers as export
from moe_kernels.train import loop
from moe_kernels.train.checkpoint import load_export, save_export
from moe_kernels.train.config import ModelConfig, TrainConfig
from moe_kernels.train.model import MoETransformer

CONFIG = TrainConfig(
    model=ModelConfig(vocab_size=100, hidden_size=32, num_layers=3, num_heads=4, dense_layers=1,
                      dense_ffn_hidden_size=48, num_experts=8, topk=2, expert_ffn_hidden_size=16,
                      num_shared_experts=1, n_groups=4, topk_groups=2, route_scale=2.5,
                      max_seq_len=32),
)  # fmt: skip


def perturbed_model(config: TrainConfig) -> MoETransformer:
    """A model off its initialisation (as a trained one is), with a loss-free bias that moves
    choices."""
    torch.manual_seed(0)
    model = MoETransformer(config).eval()
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("balancer.bias"):
                buffer.normal_(0, 0.05)
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


def assert_same_logits(ours, theirs, tokens):
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "model",
    [
        {},
        dict(dense_layers=0, num_shared_experts=0, n_groups=1, topk_groups=1, route_scale=1.0),
    ],
    ids=["dense-first-groups-shared", "plain"],
)
def test_the_exported_model_gives_the_models_logits_alone_and_patched(tmp_path, model):
    config = dataclasses.replace(CONFIG, model=dataclasses.replace(CONFIG.model, **model))
    ours = perturbed_model(config)
    save_export(tmp_path / "model.pt", ours.state_dict(), config)
    assert export.main([str(tmp_path), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").stat().st_size > 0
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == "Glm4MoeForCausalLM"
    tokens = torch.randint(0, 100, (3, 24), generator=torch.Generator().manual_seed(1))
    assert_same_logits(ours, theirs, tokens)
    biases = [b for n, b in theirs.named_buffers() if n.endswith("e_score_correction_bias")]
    assert len(biases) == config.model.num_layers - config.model.dense_layers
    assert all(b.abs().sum() > 0 for b in biases)  # the trained bias, carried over
    patch(theirs)  # this package's ops run the exported model too
    assert_same_logits(ours, theirs, tokens)


def test_a_trained_run_exports_from_its_folder(tmp_path):
    config = TrainConfig(
        model=dataclasses.replace(CONFIG.model, vocab_size=257), tokenizer="bytes", seq_len=32,
        micro_batch_size=4, steps=6, eval_every=6, eval_tokens=512, checkpoint_every=6,
        rate=1e-2,
    )  # fmt: skip
    loop.train(config, tmp_path / "run", progress=False, cache_dir=tmp_path / "cache")
    trained_config, state = load_export(tmp_path / "run" / "model.pt")
    ours = MoETransformer(trained_config).eval()
    ours.load_state_dict(state)
    export.export_transformers(tmp_path / "run", tmp_path / "hf")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(2))
    assert_same_logits(ours, theirs, tokens)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(model=dict(score_fn="softmax")), "score_fn='softmax' has no transformers layout"),
        (dict(balancing="expert_choice"), "an expert_choice model has no transformers layout"),
    ],
)
def test_a_model_the_layout_cannot_express_is_refused(tmp_path, capsys, change, message):
    model = dataclasses.replace(CONFIG.model, **change.pop("model", {}))
    config = dataclasses.replace(CONFIG, model=model, **change)
    save_export(tmp_path / "model.pt", MoETransformer(config).state_dict(), config)
    assert export.main([str(tmp_path / "model.pt"), str(tmp_path / "hf")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("export_transformers: error: ") and message in line
    assert not (tmp_path / "hf").exists()
