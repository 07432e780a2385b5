"""MaxVio per computation batch measured on real expert parallelism, to check the one-process
emulation (``measures.consecutive_batch_maxvio``) at small sizes.

Each trained arm runs on ``ranks`` processes (torchrun, Gloo on CPUs), its experts sharded over
all of them, every rank routing ``micro_batch`` training windows per forward. The rows each
rank's experts receive from the all-to-all, gathered over the group, are the load of one
computation batch of ``micro_batch x ranks`` sequences: in one process, the same sequences
grouped consecutively.

``python -m torch.distributed.run --standalone --nproc-per-node R -m
moe_kernels.study.expert_parallel WINDOWS OUT RUN_DIR...`` (``run_expert_parallel`` launches it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ..balance import max_violation
from ..layer import moe_layers
from ..parallel import ParallelLayout, init_expert_parallel, local_state_dict
from ..train.atomic import atomic_write_text
from ..train.checkpoint import EXPORT_NAME, load_export
from ..train.model import MoETransformer

# Sequences per rank in one forward: computation batches of ranks and 2 x ranks sequences.
MICRO_BATCHES = (1, 2)


@torch.no_grad()
def maxvio_on_ranks(
    model: MoETransformer, windows: torch.Tensor, micro_batch: int, layout: ParallelLayout
) -> float:
    """The mean over computation batches and layers of MaxVio of the rows every rank's experts
    received (collective over the expert-parallel group, which spans every rank here)."""
    model.eval()
    received: list[torch.Tensor] = []

    def count(experts, args) -> None:
        received.append(args[1].clone())  # rows per local expert: what this rank computes

    handles = [layer.experts.register_forward_pre_hook(count) for layer in moe_layers(model)]
    size = micro_batch * layout.world_size
    maxvio = []
    try:
        for first in range(0, windows.shape[0] - size + 1, size):
            start = first + layout.rank * micro_batch
            model(windows[start : start + micro_batch])
            local = torch.stack(received)  # [L, E / P]
            received.clear()
            shards = [torch.empty_like(local) for _ in range(layout.world_size)]
            dist.all_gather(shards, local, group=layout.ep_group)
            maxvio.append(max_violation(torch.cat(shards, dim=1)).mean())
    finally:
        for handle in handles:
            handle.remove()
    return float(torch.stack(maxvio).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("windows", type=Path, help="a .pt file of [N, S] token ids")
    parser.add_argument("out", type=Path, help="the JSON file rank 0 writes")
    parser.add_argument(
        "runs", type=Path, nargs="+", help="run folders <arm>/<seed> (with model.pt)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo")
    try:
        layout = init_expert_parallel(dist.get_world_size())
        windows = torch.load(args.windows, weights_only=True)
        results = {}
        for run in args.runs:
            config, state = load_export(run / EXPORT_NAME)
            model = MoETransformer(dataclasses.replace(config, ep_size=layout.ep_size), layout)
            model.load_state_dict(local_state_dict(state, model))
            results[run.parent.name] = {
                str(micro_batch * layout.world_size): maxvio_on_ranks(
                    model, windows, micro_batch, layout
                )
                for micro_batch in MICRO_BATCHES
            }
        if layout.rank == 0:
            atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
    finally:
        dist.destroy_process_group()
    return 0


def run_expert_parallel(
    runs: list[Path], windows: torch.Tensor, ranks: int, out_dir: Path
) -> dict[str, dict[str, float]]:
    """{arm: {computation batch size: MaxVio}} of ``runs`` (one run folder ``<arm>/<seed>`` per
    arm) on ``ranks`` processes, cached in ``out_dir/expert_parallel-<ranks>.json`` (rerun
    only when an arm is missing)."""
    out = out_dir / f"expert_parallel-{ranks}.json"
    if out.exists():
        cached = json.loads(out.read_text())
        if set(cached) == {run.parent.name for run in runs}:
            return cached
    windows_path = out_dir / "windows.pt"
    torch.save(windows, windows_path)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={ranks}", "-m", __name__, str(windows_path), str(out),
        *map(str, runs),
    ]  # fmt: skip
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.read_text())


if __name__ == "__main__":
    sys.exit(main())
