"""Expert-parallel training on 2 and 4 Gloo ranks: one step gives the loss, gradients and bias
of one process on the same global batch; the torchrun entry point trains, checkpoints per rank,
resumes exactly and exports weights that load into the unsharded model; a rank that fails stops
the others with an error in bounded time."""

import dataclasses
import json
import sys
import time

import pytest
import torch
from ranks import launch, run_on_ranks

from moe_kernels import parallel
from moe_kernels.train import cli, loop
from moe_kernels.train.checkpoint import load_export
from moe_kernels.train.config import ModelConfig, TrainConfig
from moe_kernels.train.model import MoETransformer

SMALL = TrainConfig(
    model=ModelConfig(
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_experts=8,
        topk=2,
        expert_ffn_hidden_size=16,
        max_seq_len=16,
    ),
    tokenizer="bytes",
    seq_len=16,
    micro_batch_size=2,
    grad_accumulation=2,
    lr=1.0,
    warmup_steps=1,
    rate=1e-2,
)


class GlobalBatches:
    """The sampler's interface over fixed global batches of random tokens."""

    def __init__(self, batch_size: int, config: TrainConfig) -> None:
        g = torch.Generator().manual_seed(7)
        self.windows = [
            torch.randint(config.model.vocab_size, (batch_size, config.seq_len + 1), generator=g)
            for _ in range(config.grad_accumulation)
        ]
        self.drawn = 0

    def next_batch(self):
        window = self.windows[self.drawn % len(self.windows)]
        self.drawn += 1
        return window[:, :-1], window[:, 1:]


def one_step(config: TrainConfig, layout: parallel.ParallelLayout):
    """One training step with SGD (lr 1: the update is the clipped gradient) from the seed's
    initial weights; returns the step's metrics and the consolidated weights after it."""
    torch.manual_seed(config.seed)
    model = MoETransformer(config, layout)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    schedule = loop.make_schedule(optimizer, config)
    batches = GlobalBatches(config.micro_batch_size * layout.world_size, config)
    row = loop.train_step(model, optimizer, schedule, batches, config, torch.device("cpu"), layout)
    return row, parallel.consolidated_state_dict(model, layout)


def _ep_steps(rank, world_size, config):
    layout = parallel.init_expert_parallel(config.ep_size)
    return {b: one_step(dataclasses.replace(config, balancing=b), layout) for b in BALANCING}


BALANCING = ("loss_free", "none")


@pytest.mark.slow
@pytest.mark.parametrize("world_size,ep_size", [(2, 2), (4, 4), (4, 2)])
def test_a_step_equals_one_process_on_the_global_batch(tmp_path, world_size, ep_size):
    """W ranks with experts sharded over groups of ep_size (W / ep_size groups holding the same
    experts) against one process with a W times larger micro-batch: the same loss, gradient
    norm, updated weights (SGD with lr 1 adds the clipped gradient) and bias."""
    ranks = run_on_ranks(
        _ep_steps, world_size, tmp_path, dataclasses.replace(SMALL, ep_size=ep_size)
    )
    for balancing in BALANCING:
        config = dataclasses.replace(SMALL, balancing=balancing)
        want_row, want_state = one_step(
            dataclasses.replace(config, micro_batch_size=config.micro_batch_size * world_size),
            parallel.ParallelLayout(),
        )
        first_row = ranks[0][balancing][0]
        for rank in ranks:
            row, state = rank[balancing]
            assert row["train_loss"] == pytest.approx(want_row["train_loss"], rel=1e-6)
            assert row["grad_norm"] == pytest.approx(want_row["grad_norm"], rel=1e-5)
            assert row["maxvio_batch"] == want_row["maxvio_batch"]  # exact integer counts
            # The computation batch is micro_batch x ep_size sequences: the one process's
            # micro-batch when ep_size is W; the mean over the W / ep_size groups is the same on
            # every rank.
            if ep_size == world_size:
                assert row["maxvio_computation_batch"] == want_row["maxvio_computation_batch"]
            assert row["maxvio_computation_batch"] == first_row["maxvio_computation_batch"]
            assert state.keys() == want_state.keys()
            for name, want in want_state.items():
                torch.testing.assert_close(state[name], want, rtol=1e-5, atol=1e-6, msg=name)
            if balancing == "loss_free":
                assert state["blocks.0.ffn.balancer.bias"].abs().sum() > 0  # it moved


def _shard_and_gather(rank, world_size, config, state):
    layout = parallel.init_expert_parallel(config.ep_size)
    model = MoETransformer(config, layout)
    model.load_state_dict(parallel.local_state_dict(state, model))
    return parallel.consolidated_state_dict(model, layout)


def _transports(rank, world_size, config):
    layout = parallel.init_expert_parallel(config.ep_size)
    chosen = {}
    for asked in ("auto", "process_group", "nccl"):
        for loop_made_nccl in (False, True):
            model = MoETransformer(
                dataclasses.replace(config, ep_transport=asked),
                dataclasses.replace(
                    layout, ep_transport="nccl" if loop_made_nccl else "process_group"
                ),
            )
            [transport] = {block.ffn.dispatcher.transport for block in model.blocks}
            chosen[asked, loop_made_nccl] = transport
    return chosen


def test_the_direct_nccl_transport_is_an_opt_in(tmp_path):
    """Two NCCL communicators used concurrently on one GPU can deadlock, so a model's layers
    take the direct NCCL transport only when asked for it, or when the training loop, which
    orders every collective of its step, made it (the layout's ep_transport); "auto" is
    otherwise the group's own collective."""
    config = dataclasses.replace(SMALL, ep_size=2)
    for chosen in run_on_ranks(_transports, 2, tmp_path, config):
        assert chosen == {
            ("auto", False): "process_group",
            ("auto", True): "nccl",
            ("process_group", False): "process_group",
            ("process_group", True): "process_group",
            ("nccl", False): "nccl",
            ("nccl", True): "nccl",
        }


@pytest.mark.slow
def test_local_state_dict_is_the_inverse_of_consolidating(tmp_path):
    """Unsharded weights cut to each rank's experts load into the sharded model and gather
    back to themselves."""
    torch.manual_seed(3)
    state = {
        name: torch.randn_like(t) if t.is_floating_point() else t
        for name, t in MoETransformer(SMALL).state_dict().items()
    }
    config = dataclasses.replace(SMALL, ep_size=2)
    for gathered in run_on_ranks(_shard_and_gather, 2, tmp_path, config, state):
        assert gathered.keys() == state.keys()
        for name, want in state.items():
            assert torch.equal(gathered[name], want), name


CLI_MODEL = [
    "--tokenizer", "bytes", "--hidden-size", "32", "--num-layers", "2", "--num-heads", "2",
    "--num-experts", "8", "--topk", "2", "--expert-ffn-hidden-size", "16", "--seq-len", "16",
    "--grad-accumulation", "2", "--warmup-steps", "2", "--steps", "6", "--eval-every", "3",
    "--eval-tokens", "512", "--checkpoint-every", "3", "--no-progress",
]  # fmt: skip


def cli_args(tmp_path, out, *extra):
    corpus = tmp_path / "corpus"  # a folder: one document per file
    if not corpus.exists():
        corpus.mkdir()
        for doc in range(40):
            words = (f"word{(doc * 31 + i) % 97} of line {i}." for i in range(150))
            (corpus / f"{doc}.txt").write_text(" ".join(words))
    return ["--data", str(corpus), "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
            *CLI_MODEL, *extra]  # fmt: skip


def _cli(rank, world_size, args, fail_at_step=None, failing_ranks=(0, 1), stall=0.0):
    """cli.main under torchrun's environment; optionally ``failing_ranks`` fail when they start
    step ``fail_at_step``: they raise, after ``stall`` seconds of silence."""
    if fail_at_step is not None and rank in failing_ranks:
        real_step = loop.train_step

        def failing_step(*step_args, **kwargs):
            failing_step.calls += 1
            if failing_step.calls == fail_at_step:
                time.sleep(stall)
                raise RuntimeError(f"injected failure of rank {rank}")
            return real_step(*step_args, **kwargs)

        failing_step.calls = 0
        loop.train_step = failing_step
    status = cli.main(args)
    if status:  # a bad option or data source: reported in one line, exit status 2
        sys.exit(status)


def read_history(run_dir):
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_torchrun_training_checkpoints_resumes_and_exports(capsys, tmp_path):
    """2 ranks, ep_size 2, through the CLI as torchrun runs it: the same history as one
    process with a twice larger micro-batch; per-rank checkpoints; a run stopped after its
    step-3 checkpoint and resumed ends exactly like the uninterrupted one; the consolidated
    export loads into the unsharded model and evaluates to the run's validation loss."""
    args = cli_args(tmp_path, tmp_path / "ep", "--ep-size", "2", "--micro-batch-size", "2")
    outcomes = launch(_cli, 2, tmp_path, args)
    assert [o.exitcode for o in outcomes] == [0, 0], [o.error for o in outcomes]
    run_dir = tmp_path / "ep" / "loss_free"
    names = {path.name for path in run_dir.iterdir()}
    assert {"checkpoint-rank0-of-2.pt", "checkpoint-rank1-of-2.pt", "model.pt"} <= names
    assert "checkpoint.pt" not in names

    assert cli.main(cli_args(tmp_path, tmp_path / "one", "--micro-batch-size", "4")) == 0
    ep, one = read_history(run_dir), read_history(tmp_path / "one" / "loss_free")
    for got, want in zip(ep, one, strict=True):
        for key in ("train_loss", "grad_norm", "val_loss", "maxvio_global"):
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-5), (got["step"], key)
        for key in ("maxvio_batch", "maxvio_computation_batch"):
            assert got[key] == want[key]

    interrupted = cli_args(
        tmp_path, tmp_path / "resumed", "--ep-size", "2", "--micro-batch-size", "2"
    )
    outcomes = launch(_cli, 2, tmp_path, interrupted, 5)
    assert all("injected failure" in o.error for o in outcomes)
    outcomes = launch(_cli, 2, tmp_path, [*interrupted, "--resume"])
    assert [o.exitcode for o in outcomes] == [0, 0], [o.error for o in outcomes]
    resumed = read_history(tmp_path / "resumed" / "loss_free")
    assert [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in resumed] == [
        {k: v for k, v in r.items() if k != "tokens_per_s"} for r in ep
    ]

    # One process resuming the two ranks' run: refused in one line, exit status 2.
    assert cli.main(cli_args(tmp_path, tmp_path / "resumed", "--resume")) == 2
    assert "written by another number of ranks than 1" in capsys.readouterr().err

    config, weights = load_export(run_dir / "model.pt")
    model = MoETransformer(config)
    model.load_state_dict(weights)
    assert model.blocks[0].ffn.experts.gate_up_proj.shape[0] == 8  # every expert
    eval_set = loop.text_data.eval_batches(
        loop.prepare_data(config, tmp_path / "cache").val,
        config.micro_batch_size * 2, config.seq_len, config.eval_tokens, multiple_of=2,
    )  # fmt: skip
    result = loop.evaluate(model, eval_set, config, torch.device("cpu"), parallel.ParallelLayout())
    assert result["val_loss"] == pytest.approx(ep[-1]["val_loss"], rel=1e-5)
    assert result["maxvio_global"] == pytest.approx(ep[-1]["maxvio_global"], rel=1e-9)


TIMEOUT = 8


@pytest.mark.slow
@pytest.mark.parametrize("stall", [0, 3 * TIMEOUT], ids=["raises", "stalls"])
def test_a_failing_rank_stops_the_others_with_an_error(tmp_path, stall):
    """Rank 1 fails at its third step: it raises (its process exits), or first stays alive and
    silent for 3 x --timeout. Rank 0 must not hang: it stops with an error naming the
    collective that failed, as soon as the peer's connections close, or after --timeout while
    the peer is still silent."""
    args = cli_args(tmp_path, tmp_path / "run", "--ep-size", "2", "--micro-batch-size", "2",
                    "--timeout", str(TIMEOUT))  # fmt: skip
    rank0, rank1 = launch(_cli, 2, tmp_path, args, 3, (1,), stall, deadline=stall + 60)
    assert "injected failure of rank 1" in rank1.error
    assert rank0.exitcode not in (0, None), "rank 0 hung or succeeded"
    assert "expert-parallel all-to-all failed on rank 0" in rank0.error, rank0.error
    if stall:
        assert "Timed out" in rank0.error
        assert rank0.seconds < rank1.seconds - TIMEOUT  # while rank 1 was silent
    else:
        assert rank0.seconds < rank1.seconds + 10
