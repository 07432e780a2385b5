"""The training loop: loss falls, resume continues exactly, the CLI writes its outputs."""

import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy
import pytest
import torch

from moe_kernels import memory
from moe_kernels.layer import moe_layers
from moe_kernels.train import cli, loop
from moe_kernels.train.checkpoint import load_checkpoint, load_export
from moe_kernels.train.config import ModelConfig, TrainConfig
from moe_kernels.train.model import MoETransformer

# A model small enough that a step takes milliseconds: bytes of the stdlib's prose.
MICRO = TrainConfig(
    model=ModelConfig(
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_experts=8,
        topk=2,
        expert_ffn_hidden_size=32,
        max_seq_len=32,
    ),
    tokenizer="bytes",
    seq_len=32,
    micro_batch_size=8,
    grad_accumulation=2,
    steps=40,
    lr=1e-2,
    warmup_steps=5,
    eval_every=20,
    eval_tokens=2048,
    checkpoint_every=20,
    rate=1e-2,
)


def run(tmp_path, name, config=MICRO, **kwargs):
    return loop.train(
        config, tmp_path / name, progress=False, cache_dir=tmp_path / "cache", **kwargs
    )


def history(out_dir):
    return [json.loads(line) for line in (out_dir / "history.jsonl").read_text().splitlines()]


def test_loss_falls_and_the_outputs_are_written(tmp_path):
    summary = run(tmp_path, "run")
    rows = history(tmp_path / "run")
    assert [row["step"] for row in rows] == list(range(1, 41))
    first, last = rows[0]["train_loss"], summary["train_loss"]
    assert first == pytest.approx(math.log(257), rel=0.05)  # uniform over the byte vocabulary
    assert last < first - 1.0
    assert summary["val_loss"] < first - 1.0
    assert 0 <= summary["maxvio_global"] < 8 and len(summary["maxvio_global_per_layer"]) == 2
    for name in ("summary.json", "checkpoint.pt", "loss.png", "maxvio.png"):
        assert (tmp_path / "run" / name).stat().st_size > 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary
    assert not list((tmp_path / "run").glob(".*tmp")), "no temporary file is left behind"


def test_eval_forwards_and_checkpointed_state_hold_the_balancer(tmp_path):
    run(tmp_path, "run")
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    bias = state["model"]["blocks.0.ffn.balancer.bias"]
    assert bias.dtype == torch.float32 and bias.abs().max() > 0
    assert int(state["model"]["blocks.0.ffn.balancer.updates"]) == 40
    # Counts of the last step: two micro-batches of 8 x 32 tokens, top-2.
    step_counts = state["model"]["blocks.0.ffn.balancer.step_tokens_per_expert"]
    assert int(step_counts.sum()) == 2 * 8 * 32 * 2


class Crash(Exception):
    pass


def test_resume_after_a_crash_continues_exactly(tmp_path, monkeypatch):
    config = dataclasses.replace(MICRO, steps=30, eval_every=10, checkpoint_every=10)
    run(tmp_path, "whole", config)
    step = loop.train_step
    calls = []

    def crash_at_step_15(*args, **kwargs):
        calls.append(1)
        if len(calls) == 15:
            raise Crash
        return step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", crash_at_step_15)
    with pytest.raises(Crash):
        run(tmp_path, "resumed", config)
    monkeypatch.setattr(loop, "train_step", step)
    assert len(history(tmp_path / "resumed")) == 10  # the last checkpoint, at step 10
    run(tmp_path, "resumed", config, resume=True)

    whole, resumed = history(tmp_path / "whole"), history(tmp_path / "resumed")
    keys = ("train_loss", "aux_loss", "grad_norm", "maxvio_batch", "val_loss", "maxvio_global")
    for a, b in zip(whole, resumed, strict=True):
        assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}, a["step"]
    final = [
        load_checkpoint(tmp_path / name / "checkpoint.pt")["model"] for name in ("whole", "resumed")
    ]
    for key in final[0]:
        assert torch.equal(final[0][key], final[1][key]), key


class Payload:
    """What a checkpoint from elsewhere may hold: unpickling it runs a call it names (here,
    creating a file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused_unread(tmp_path, capsys):
    out, marker = tmp_path / "runs", tmp_path / "ran"
    (out / "loss_free").mkdir(parents=True)
    torch.save({"model": {}, "rng": Payload(marker)}, out / "loss_free" / "checkpoint.pt")
    with pytest.raises(ValueError, match="refused unread"):
        load_checkpoint(out / "loss_free" / "checkpoint.pt")
    args = [*CLI_MICRO, "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--resume"]
    assert cli.main(args) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("moe-train: error: ") and "objects other than tensors" in line
    assert not marker.exists()  # the payload never ran
    torch.load(out / "loss_free" / "checkpoint.pt", weights_only=False)  # what it would do
    assert marker.exists()


def test_resume_refuses_another_configuration(tmp_path):
    config = dataclasses.replace(MICRO, steps=2, eval_every=2, checkpoint_every=1)
    run(tmp_path, "run", config)
    with pytest.raises(ValueError, match="another configuration"):
        run(tmp_path, "run", dataclasses.replace(config, lr=0.5), resume=True)


@pytest.mark.parametrize(
    "balancing",
    ["aux_loss", "seq_aux_loss", "global_aux_loss", "expert_choice", "none",
     "loss_free+seq_aux_loss"],
)  # fmt: skip
def test_every_strategy_trains(tmp_path, balancing):
    config = dataclasses.replace(MICRO, steps=6, eval_every=3, balancing=balancing)
    summary = run(tmp_path, balancing, config)
    assert summary["val_loss"] < math.log(257)
    aux = [row["aux_loss"] for row in history(tmp_path / balancing)]
    assert all(a > 0 for a in aux) == balancing.endswith("aux_loss")
    _, weights = load_export(tmp_path / balancing / "model.pt")
    biases = [name for name in weights if name.endswith("balancer.bias")]
    assert len(biases) == (MICRO.model.num_layers if balancing.startswith("loss_free") else 0)


def test_the_bias_warm_up_rate_holds_for_its_steps_then_the_rate(tmp_path):
    """Every update moves each bias entry by exactly the rate of its step under the sign rule
    (counts are never all equal here), so the largest move of step n is that step's rate."""
    config = dataclasses.replace(
        MICRO, steps=6, eval_every=6, rate=1e-3, bias_warmup_rate=0.25, bias_warmup_steps=2
    )
    model = loop.MoETransformer(config)
    layer = next(moe_layers(model))
    moves = []
    for _ in range(config.steps):
        before = layer.balancer.bias.clone()
        model(torch.randint(0, config.model.vocab_size, (4, 16)))
        layer.update_balance()
        moves.append(float((layer.balancer.bias - before).abs().max()))
    assert moves == pytest.approx([0.25, 0.25, 1e-3, 1e-3, 1e-3, 1e-3], rel=1e-5)  # fp32 bias
    assert dataclasses.replace(MICRO, rate=1e-3).rate == 1e-3  # no warm-up by default
    summary = run(tmp_path, "warm", config)
    assert summary["config"]["bias_warmup_steps"] == 2


def test_bf16_autocast_trains(tmp_path):
    config = dataclasses.replace(MICRO, steps=20, eval_every=20, dtype="bf16")
    summary = run(tmp_path, "bf16", config)
    assert summary["val_loss"] < math.log(257) - 1.0


def test_the_model_has_one_moe_layer_per_block_after_the_dense_ones():
    config = dataclasses.replace(
        MICRO, model=dataclasses.replace(MICRO.model, num_layers=3, dense_layers=1)
    )
    model = loop.MoETransformer(config)
    assert len(list(moe_layers(model))) == 2
    logits = model(torch.randint(0, config.model.vocab_size, (2, 16)))
    assert logits.shape == (2, 16, config.model.vocab_size)


def test_keep_freed_memory_sets_glibc_malloc_options(monkeypatch):
    calls = []

    class FakeLibc:
        def mallopt(self, option, value):
            calls.append((option, value))
            return 1

    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: FakeLibc())
    assert memory.keep_freed_memory()
    assert calls == [(-4, 0), (-1, 2**31 - 1)]  # M_MMAP_MAX = 0, M_TRIM_THRESHOLD = 2 GB


def test_cli_trains_two_strategies_and_plots_them(tmp_path, capsys, monkeypatch):
    kept = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: kept.append(True))
    args = [
        "--balancing", "loss_free", "none",
        "--out", str(tmp_path / "runs"),
        "--cache-dir", str(tmp_path / "cache"),
        "--no-progress",
        "--tokenizer", "bytes",
        "--steps", "4", "--eval-every", "2", "--eval-tokens", "512",
        "--hidden-size", "32", "--num-layers", "1", "--num-heads", "2",
        "--num-experts", "4", "--topk", "2", "--expert-ffn-hidden-size", "16",
        "--seq-len", "16", "--micro-batch-size", "4",
    ]  # fmt: skip
    assert cli.main(args) == 0
    assert kept == [True]  # a CPU run keeps freed memory
    printed = capsys.readouterr().out
    assert "loss_free: val loss" in printed and "none: val loss" in printed
    assert "MaxVio_global" in printed
    for name in ("loss_free/summary.json", "none/summary.json", "loss.png", "maxvio.png"):
        assert (tmp_path / "runs" / name).exists(), name
    summary = json.loads((tmp_path / "runs" / "none" / "summary.json").read_text())
    assert summary["config"]["model"]["num_experts"] == 4 and summary["steps"] == 4


CLI_MICRO = [
    "--no-progress", "--tokenizer", "bytes", "--steps", "2", "--eval-every", "2",
    "--eval-tokens", "256", "--hidden-size", "32", "--num-layers", "1", "--num-heads", "2",
    "--num-experts", "4", "--topk", "2", "--expert-ffn-hidden-size", "16", "--seq-len", "16",
    "--micro-batch-size", "4",
]  # fmt: skip


@pytest.mark.parametrize(
    "option,value,message",
    [
        ("--rate", "nan", "rate must be a finite number >= 0, got nan"),
        ("--rate", "inf", "rate must be a finite number >= 0, got inf"),
        ("--bias-warmup-rate", "-1", "bias_warmup_rate must be"),
        ("--lr", "0", "lr must be a finite number > 0"),
        ("--capacity-factor", "nan", "capacity_factor must be"),
        ("--aux-coeff", "inf", "aux_coeff must be"),
        ("--steps", "0", "steps must be an integer >= 1"),
        ("--seq-len", "0", "seq_len must be"),
        ("--grad-accumulation", "0", "grad_accumulation must be"),
        ("--n-groups", "3", "n_groups must be >= 1 and divide num_experts=4"),
        ("--topk-groups", "2", "topk_groups must be in"),
        ("--topk", "5", "topk must be in"),
        ("--num-heads", "3", "hidden_size=32 must be divisible by num_heads=3"),
        ("--timeout", "-1", "timeout must be"),
        ("--data", "/missing/corpus", "'/missing/corpus' is not 'stdlib', 'kjv', or an existing"),
        ("--data", "/missing/tokens.npy", "token file '/missing/tokens.npy' does not exist"),
        ("--data", "short.npy", "tokens are too few for a window of seq_len=16"),
        ("--data", "one.txt", "gives 1 document(s); a validation split needs at least 2"),
    ],
)
def test_cli_refuses_bad_input_in_one_line_and_writes_nothing(
    tmp_path, capsys, option, value, message
):
    numpy.save(tmp_path / "short.npy", numpy.arange(100))  # a validation tail of 5 tokens
    (tmp_path / "one.txt").write_text("One paragraph, one document.\n")
    if value in ("short.npy", "one.txt"):
        value = str(tmp_path / value)
    out = tmp_path / "runs"
    args = [*CLI_MICRO, "--out", str(out), "--cache-dir", str(tmp_path / "cache"), option, value]
    assert cli.main(args) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("moe-train: error: ") and message in lines[0]
    assert not out.exists()


def test_cli_says_when_resume_finds_no_checkpoint(tmp_path, capsys):
    out = tmp_path / "runs"
    args = [*CLI_MICRO, "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--resume"]
    assert cli.main(args) == 0
    assert f"--resume: no checkpoint in {out / 'loss_free'}: training from step 0" in (
        capsys.readouterr().err
    )
    # The checkpoint it wrote is found by the next --resume, which says nothing of the kind.
    assert cli.main(args) == 0
    assert "no checkpoint" not in capsys.readouterr().err


def test_cli_center_bias_reaches_the_layers():
    args = cli.build_parser().parse_args(["--center-bias"])
    config = cli.checked_config(args, "loss_free")
    assert config.center_bias
    assert not cli.checked_config(cli.build_parser().parse_args([]), "none").center_bias
    with torch.device("meta"):
        model = MoETransformer(config)
    assert all(layer.balancer.centered for layer in moe_layers(model))


def test_cli_trains_with_token_capacity_and_logs_the_drop_rate(tmp_path):
    out = tmp_path / "runs"
    args = [*CLI_MICRO, "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--steps", "3",
            "--drop-policy", "position", "--capacity-factor", "0.5", "--pad-to-capacity"]  # fmt: skip
    assert cli.main(args) == 0
    config = cli.checked_config(cli.build_parser().parse_args(args), "loss_free")
    assert (config.drop_policy, config.capacity_factor, config.pad_to_capacity) == (
        "position",
        0.5,
        True,
    )
    for row in history(out / "loss_free"):
        # Half the fair share per expert: at least half of the pairs are dropped.
        assert 0.5 <= row["balance/drop_rate"] < 1
        assert 0.5 <= row["balance/drop_rate/blocks.0.ffn"] < 1


def test_cli_refuses_padding_without_a_drop_policy(tmp_path, capsys):
    out = tmp_path / "runs"
    args = [*CLI_MICRO, "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
            "--pad-to-capacity"]  # fmt: skip
    assert cli.main(args) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "moe-train: error: pad_to_capacity pads to the capacity of a drop_policy, got None"
    ]
    assert not out.exists()


def test_cli_writes_the_history_as_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, logs = tmp_path / "runs", tmp_path / "tb"
    args = [*CLI_MICRO, "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
            "--steps", "3", "--z-loss-coeff", "1e-3", "--tensorboard", str(logs)]  # fmt: skip
    assert cli.main(args) == 0
    rows = history(out / "loss_free")
    layer = "blocks.0.ffn"
    for row in rows:  # the telemetry of every step, per layer and over the model
        assert row["balance/maxvio"] == pytest.approx(row["maxvio_batch"])
        assert row[f"balance/maxvio/{layer}"] == pytest.approx(row["maxvio_batch"])
        assert 0 <= row["balance/dead_experts"] <= 1 and row["balance/cv"] >= 0
        assert row["balance/bias_min"] <= row["balance/bias_max"] and row["z_loss"] > 0
    events = EventAccumulator(str(logs / "loss_free"))
    events.Reload()
    for key in ("train_loss", "z_loss", "balance/cv", f"balance/max_load/{layer}", "val_loss"):
        scalars = events.Scalars(key)
        assert [e.step for e in scalars] == [row["step"] for row in rows if key in row], key
        assert [e.value for e in scalars] == pytest.approx([row[key] for row in rows if key in row])


def test_cli_asks_for_tensorboard_when_it_is_missing(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    args = [*CLI_MICRO, "--out", str(tmp_path / "runs"), "--tensorboard", str(tmp_path / "tb")]
    assert cli.main(args) == 2
    assert "--tensorboard needs the tensorboard package" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
