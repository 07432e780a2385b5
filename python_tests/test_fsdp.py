"""FSDP2 over the data x expert-parallel layout (``moe_kernels.fsdp``) on 1, 2 and 4 Gloo
ranks: one training step gives the loss, gradient norm, updated weights and bias of one
process on the same global batch, as the expert-parallel tests hold the package's own
gradient averaging to; ``moe-train --fsdp`` checkpoints resume on another layout."""

import dataclasses
import math
import pickle
import shutil

import pytest
import torch
from ranks import launch, run_on_ranks
from test_expert_parallel import SMALL, GlobalBatches, _cli, cli_args, one_step, read_history
from test_train import Payload

from moe_kernels import fsdp, parallel
from moe_kernels.train import cli, loop
from moe_kernels.train.checkpoint import load_export
from moe_kernels.train.model import MoETransformer

BALANCING = ("loss_free", "none")
torch.manual_seed(SMALL.seed)
SMALL_INIT = MoETransformer(SMALL).state_dict()  # the weights every step starts from


def fsdp_step(config, layout, param_dtype=None):
    """``one_step`` with the model sharded by FSDP2 on the layout's mesh."""
    torch.manual_seed(config.seed)
    model = MoETransformer(config, layout)
    mesh = fsdp.fsdp_mesh(layout, "cpu")
    fsdp.shard_model(model, mesh, model.blocks, param_dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    schedule = loop.make_schedule(optimizer, config)
    batches = GlobalBatches(config.micro_batch_size * layout.world_size, config)
    row = loop.train_step(model, optimizer, schedule, batches, config, torch.device("cpu"), layout)
    return row, fsdp.full_state_dict(model)


def _fsdp_steps(rank, world_size, config):
    layout = parallel.init_expert_parallel(config.ep_size)
    return {b: fsdp_step(dataclasses.replace(config, balancing=b), layout) for b in BALANCING}


def assert_equal_to_one_process(ranks, world_size):
    """Each rank's step against one process's on the global batch, without FSDP."""
    for balancing in BALANCING:
        config = dataclasses.replace(SMALL, balancing=balancing)
        want_row, want_state = one_step(
            dataclasses.replace(config, micro_batch_size=config.micro_batch_size * world_size),
            parallel.ParallelLayout(),
        )
        for rank in ranks:
            row, state = rank[balancing]
            assert row["train_loss"] == pytest.approx(want_row["train_loss"], rel=1e-6)
            assert row["grad_norm"] == pytest.approx(want_row["grad_norm"], rel=1e-5)
            assert row["maxvio_batch"] == want_row["maxvio_batch"]  # exact integer counts
            assert state.keys() == want_state.keys()
            for name, want in want_state.items():
                torch.testing.assert_close(state[name], want, rtol=1e-5, atol=1e-6, msg=name)
            if balancing == "loss_free":
                assert state["blocks.0.ffn.balancer.bias"].abs().sum() > 0  # it moved


@pytest.mark.slow
@pytest.mark.parametrize("world_size,ep_size", [(2, 2), (4, 2), (4, 4)])
def test_an_fsdp_step_equals_one_process_on_the_global_batch(tmp_path, world_size, ep_size):
    config = dataclasses.replace(SMALL, ep_size=ep_size)
    assert_equal_to_one_process(run_on_ranks(_fsdp_steps, world_size, tmp_path, config), world_size)


@pytest.mark.slow
def test_activation_checkpointing_keeps_the_step_and_exact_counts(tmp_path):
    # Each block recomputed in the backward: its dispatch and routing run again, uncounted.
    config = dataclasses.replace(SMALL, ep_size=2, activation_checkpointing=True)
    assert_equal_to_one_process(run_on_ranks(_fsdp_steps, 2, tmp_path, config), 2)


def _sharding(rank, world_size, config):
    layout = parallel.init_expert_parallel(config.ep_size)
    model = MoETransformer(config, layout)
    fsdp.shard_model(model, fsdp.fsdp_mesh(layout, "cpu"), model.blocks, torch.bfloat16)
    experts, router = model.blocks[0].ffn.experts, model.blocks[0].ffn.router
    seen = {}

    def dtype_of(name, weight):
        def hook(module, args):
            seen.setdefault(name, getattr(module, weight).dtype)

        return hook

    router.register_forward_pre_hook(dtype_of("router", "weight"))
    experts.register_forward_pre_hook(dtype_of("experts", "gate_up_proj"))
    model(torch.randint(config.model.vocab_size, (2, config.seq_len)))
    weight = experts.gate_up_proj
    return {
        "experts": (tuple(weight.shape), tuple(weight.to_local().shape), str(weight.placements)),
        "attention": tuple(model.blocks[0].attention.qkv.weight.to_local().shape),
        "dtypes": seen,
    }


@pytest.mark.slow
def test_experts_are_sharded_over_both_dimensions_and_routers_stay_fp32(tmp_path):
    config = dataclasses.replace(SMALL, ep_size=2)
    ranks = run_on_ranks(_sharding, 4, tmp_path, config)
    model = config.model
    for rank in ranks:
        whole, local, placements = rank["experts"]
        # [E, 2F, H] whole; E / 2 experts per expert-parallel rank, halved again over the
        # two ranks holding the same experts.
        assert whole == (model.num_experts, 2 * model.expert_ffn_hidden_size, model.hidden_size)
        assert local == (model.num_experts // 4, *whole[1:])
        assert "Shard(dim=0)" in placements
        assert rank["attention"] == (3 * model.hidden_size // 4, model.hidden_size)
        assert rank["dtypes"] == {"router": torch.float32, "experts": torch.bfloat16}


def _bf16_step(rank, world_size, config):
    layout = parallel.init_expert_parallel(config.ep_size)
    return fsdp_step(config, layout, torch.bfloat16)


@pytest.mark.slow
def test_bf16_parameters_train_within_bf16_error_of_fp32(tmp_path):
    config = dataclasses.replace(SMALL, ep_size=2)
    ranks = run_on_ranks(_bf16_step, 2, tmp_path, config)
    want_row, want_state = one_step(
        dataclasses.replace(SMALL, micro_batch_size=SMALL.micro_batch_size * 2),
        parallel.ParallelLayout(),
    )
    for row, state in ranks:
        assert row["train_loss"] == pytest.approx(want_row["train_loss"], rel=1e-2)
        assert row["grad_norm"] == pytest.approx(want_row["grad_norm"], rel=5e-2)
        # fp32 master weights (FSDP2 keeps the sharded parameters in their dtype), moved by
        # gradients reduced in fp32.
        assert all(t.dtype == want_state[name].dtype for name, t in state.items())
        update = (
            state["blocks.1.ffn.experts.down_proj"] - SMALL_INIT["blocks.1.ffn.experts.down_proj"]
        )
        want_update = (
            want_state["blocks.1.ffn.experts.down_proj"]
            - SMALL_INIT["blocks.1.ffn.experts.down_proj"]
        )
        assert (
            torch.nn.functional.cosine_similarity(update.flatten(), want_update.flatten(), dim=0)
            > 0.99
        )


def losses(run_dir):
    return [row["train_loss"] for row in read_history(run_dir / "loss_free")]


@pytest.mark.slow
def test_sharded_checkpoints_resume_on_another_layout(tmp_path):
    """moe-train --fsdp on 4 ranks (ep 2) stopped after its step-3 checkpoint, resumed on 2
    ranks (ep 2) and on one process with the same global batch: each continues as the
    uninterrupted run does, to the rounding of another reduction order; the checkpoint is one
    folder of DCP shards, and the export loads into the unsharded model."""
    sharded = ("--fsdp", "--ep-size", "2")
    whole = cli_args(tmp_path, tmp_path / "whole", *sharded, "--micro-batch-size", "1")
    outcomes = launch(_cli, 4, tmp_path, whole)
    assert [o.exitcode for o in outcomes] == [0] * 4, [o.error for o in outcomes]
    run_dir = tmp_path / "whole" / "loss_free"
    assert (run_dir / "checkpoint" / "state.json").exists()
    assert not list(run_dir.glob("checkpoint*.pt"))

    stopped = cli_args(tmp_path, tmp_path / "stopped", *sharded, "--micro-batch-size", "1")
    outcomes = launch(_cli, 4, tmp_path, stopped, 4, (0, 1, 2, 3))  # fails starting step 4
    assert all("injected failure" in o.error for o in outcomes)
    checkpoint = tmp_path / "stopped" / "loss_free"
    for name, ranks, micro in (("two", 2, "2"), ("one", 1, "4")):
        shutil.copytree(checkpoint, tmp_path / name / "loss_free")
        args = [*cli_args(tmp_path, tmp_path / name, "--fsdp", "--micro-batch-size", micro,
                          "--ep-size", str(min(ranks, 2))), "--resume"]  # fmt: skip
        if ranks == 1:  # FSDP2 on a process group of one rank, which moe-train makes
            assert cli.main(args) == 0
            assert not torch.distributed.is_initialized()  # and ends with the run
        else:
            outcomes = launch(_cli, ranks, tmp_path, args)
            assert [o.exitcode for o in outcomes] == [0] * ranks, [o.error for o in outcomes]
        resumed, want = losses(tmp_path / name), losses(tmp_path / "whole")
        assert resumed[:3] == want[:3]  # the history it resumed from
        assert resumed[3:] == pytest.approx(want[3:], rel=1e-5), name

    config, weights = load_export(run_dir / "model.pt")
    model = MoETransformer(config)
    model.load_state_dict(weights)
    assert model.blocks[0].ffn.experts.gate_up_proj.shape[0] == 8  # every expert


def test_activation_checkpointing_recomputes_each_block_once():
    config = dataclasses.replace(SMALL, activation_checkpointing=True)
    torch.manual_seed(0)
    model = MoETransformer(config)
    calls = []
    model.blocks[1].attention.register_forward_hook(lambda *args: calls.append(1))
    tokens = torch.randint(config.model.vocab_size, (2, config.seq_len))
    model(tokens).sum().backward()
    assert len(calls) == 2  # the forward, and its recompute in the backward
    with torch.no_grad():
        model(tokens)
    assert len(calls) == 3  # nothing to recompute without gradients


def test_a_sharded_checkpoint_whose_metadata_would_run_code_is_refused(tmp_path, capsys):
    args = [*cli_args(tmp_path, tmp_path / "run", "--fsdp", "--steps", "2"), "--resume"]
    assert cli.main(args) == 0
    checkpoint = tmp_path / "run" / "loss_free" / "checkpoint"
    assert cli.main(args) == 0  # a genuine checkpoint resumes (nothing left to train)
    marker = tmp_path / "ran"
    (checkpoint / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    assert cli.main(args) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert line.startswith("moe-train: error: ") and "names pathlib.Path.touch" in line
    assert "refused unread" in line and not marker.exists()  # the payload never ran


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_an_fsdp_training_step_on_a_gpu_in_one_process(tmp_path):
    # FSDP2 on a one-rank NCCL group, bf16 parameters, experts and routing on the CUDA kernels.
    args = cli_args(tmp_path, tmp_path / "run", "--fsdp", "--device", "cuda", "--dtype", "bf16",
                    "--steps", "2", "--eval-every", "2", "--checkpoint-every", "2")  # fmt: skip
    assert cli.main(args) == 0
    rows = read_history(tmp_path / "run" / "loss_free")
    assert len(rows) == 2 and all(math.isfinite(row["train_loss"]) for row in rows)
    assert (tmp_path / "run" / "loss_free" / "checkpoint" / "state.json").exists()
