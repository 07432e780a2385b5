"""Expert-parallel dispatch + combine against the reference on all_to_all_single, and the MoE
layer's forward+backward under expert parallelism with and without overlap, same run.

    python benchmarks/bench_dispatch.py [--ranks 2 4] [--device cpu|cuda] [--dtype fp32 bf16]
        [--tokens 4096] [--layer-tokens 2048] [--transport process_group nccl]

Spawns each group size's ranks (Gloo between CPU processes; NCCL, one GPU per rank, on CUDA).
Every rank routes ``--tokens`` tokens of a DeepSeek-V3-style layer (hidden 1024, 64 experts,
top-6), permutes them, then times a dispatch followed by its combine: ours
(``ExpertParallelDispatcher``: one counts exchange, then in the "transpose" layout one
all-to-all-v each way and the rows ordered by local expert on the device, in the "grouped"
layout one point-to-point segment per (peer, local expert) straight into place) against
``moe_kernels.reference.ep_dispatch/ep_combine`` (an
all_gather of the counts, all_to_all_single, splits and a concatenation in Python), after
checking both move the same rows. Loads: "uniform" (random experts) and "zipf" (expert e
chosen with weight 1 / (e + 1): the first rank's experts take most rows).

A repeat starts with a barrier and ends when the slowest rank is done (the times are the
maximum over ranks, medians over repeats). "rows_per_s" counts the rows each rank sends out
and gets back (2 x its T x k rows), "GBps" their bytes, per rank. Writes
results/bench_dispatch_<device>.json and .md.

The step-level effect: every rank runs ``--layer-tokens`` tokens through an ``MoELayer`` of the
same shape with one shared expert (DeepSeek-V3's proportions: F = 256 per expert, the shared
one as large as a routed one, loss-free balancing), forward and backward, in both layouts with
``ep_overlap`` off (the shared expert after the combine) and on (its halves while the rows
travel, both ways), timed in turns; then records one step of each overlap in the layout "auto"
picks with ``moe_kernels.timeline`` on rank 0: the stages' begin and end in ms from the
forward's start
(results/bench_dispatch_<device>_layer.md and _timeline.md).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moe_kernels as mk
from moe_kernels import reference as ref
from moe_kernels import timeline
from moe_kernels.dispatch import ExpertParallelDispatcher, init_nccl
from timer import RESULTS, save

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HIDDEN, NUM_EXPERTS, TOPK = 1024, 64, 6
EXPERT_FFN = 256


def routing(load: str, num_tokens: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(rank)
    if load == "uniform":
        scores = torch.rand(num_tokens, NUM_EXPERTS, generator=g)
    else:
        weights = 1.0 / torch.arange(1, NUM_EXPERTS + 1, dtype=torch.float64)
        scores = torch.rand(num_tokens, NUM_EXPERTS, generator=g, dtype=torch.float64) ** (
            1.0 / weights
        )  # the top-k of u^(1/w) samples without replacement with weights w
    return scores.topk(TOPK, dim=1).indices


def timed(fn, device: torch.device, repeats: int, warmup: bool = True) -> float:
    """Median over repeats of the slowest rank's milliseconds."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        begin = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = torch.tensor([time.perf_counter() - begin], dtype=torch.float64, device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(float(elapsed) * 1e3)
    return statistics.median(times)


def worker(rank: int, world_size: int, args: argparse.Namespace, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(minutes=5),
    )
    transports = args.transport if device.type == "cuda" else ["process_group"]
    if "nccl" in transports:
        init_nccl(device=device)
    rows_out = []
    for dtype_name in args.dtype:
        for load in ("uniform", "zipf"):
            ids = routing(load, args.tokens, rank).to(device)
            x = torch.randn(args.tokens, HIDDEN, device=device).to(DTYPES[dtype_name])
            rows, _, counts = mk.permute(x, ids, NUM_EXPERTS)

            def reference(rows=rows, counts=counts):
                moved, _ = ref.ep_dispatch(rows, counts)
                return ref.ep_combine(moved, counts, rows.shape[0])

            reference_ms = timed(reference, device, args.repeats)
            for transport, layout in itertools.product(transports, ("transpose", "grouped")):
                dispatcher = ExpertParallelDispatcher(
                    NUM_EXPERTS, transport=transport, layout=layout
                )

                def ours(dispatcher=dispatcher, rows=rows, counts=counts):
                    moved, plan = dispatcher.dispatch(rows, counts)
                    return dispatcher.combine(moved, plan)

                assert torch.equal(ours(), rows) and torch.equal(reference(), rows)
                assert torch.equal(
                    dispatcher.dispatch(rows, counts)[0], ref.ep_dispatch(rows, counts)[0]
                )
                ours_ms = timed(ours, device, args.repeats)
                moved_rows = 2 * rows.shape[0]
                rows_out.append(
                    {
                        "ranks": world_size,
                        "dtype": dtype_name,
                        "load": load,
                        "transport": transport,
                        "layout": layout,
                        "rows_per_rank": rows.shape[0],
                        "ours_ms": ours_ms,
                        "reference_ms": reference_ms,
                        "speedup": reference_ms / ours_ms,
                        "rows_per_s": moved_rows / ours_ms * 1e3,
                        "GBps": moved_rows * HIDDEN * rows.element_size() / ours_ms / 1e6,
                        "reference_GBps": moved_rows
                        * HIDDEN
                        * rows.element_size()
                        / reference_ms
                        / 1e6,
                    }
                )
    layer_rows, stages = [], []
    for dtype_name in args.dtype:
        for transport in transports:
            tag = {"ranks": world_size, "dtype": dtype_name, "transport": transport}
            timings, recorded = time_layer(args, device, DTYPES[dtype_name], transport)
            layer_rows += [tag | row for row in timings]
            stages += [tag | stage for stage in recorded]
    if rank == 0:
        torch.save((rows_out, layer_rows, stages), out)
    dist.destroy_process_group()


def time_layer(args, device: torch.device, dtype: torch.dtype, transport: str):
    """The layer's forward+backward in both layouts, without and with overlap, in turns (the
    slowest rank's ms, medians); and the stages on this rank of a step of each overlap in the
    layout "auto" picks."""
    g = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randn(args.layer_tokens, HIDDEN, generator=g).to(device, dtype)
    grad = torch.randn(x.shape, generator=g).to(device, dtype)
    steps = {}
    for layout, overlap in itertools.product(("auto", "transpose", "grouped"), (False, True)):
        torch.manual_seed(0)
        layer = mk.MoELayer(
            HIDDEN, EXPERT_FFN, NUM_EXPERTS, TOPK, num_shared_experts=1,
            ep_group=dist.group.WORLD, ep_transport=transport, ep_overlap=overlap,
        ).to(device, dtype)  # fmt: skip
        layer.dispatcher.layout = layout

        def step(layer=layer):
            layer.zero_grad(set_to_none=True)
            layer(x.requires_grad_()).backward(grad)

        steps[layout, overlap] = step
    timed_steps = [key for key in steps if key[0] != "auto"]
    times = {key: [] for key in timed_steps}
    for key in timed_steps:
        steps[key]()
    for turn in range(args.repeats):
        for key in timed_steps[turn % len(timed_steps) :] + timed_steps[: turn % len(timed_steps)]:
            times[key].append(timed(steps[key], device, 1, warmup=False))
    stages = []
    for overlap in (False, True):
        if device.type == "cuda":
            torch.cuda.synchronize()
        with timeline.record() as recorded:
            steps["auto", overlap]()
        if device.type == "cuda":
            torch.cuda.synchronize()
        origin = recorded[0].begin if recorded else 0.0
        stages += [
            {
                "overlap": overlap,
                "stage": stage.name,
                "begin_ms": (stage.begin - origin) * 1e3,
                "end_ms": (stage.end - origin) * 1e3,
            }
            for stage in sorted(recorded, key=lambda stage: stage.begin)
        ]
    rows = []
    for layout in ("transpose", "grouped"):
        off, on = (statistics.median(times[layout, overlap]) for overlap in (False, True))
        rows.append({"layout": layout, "tokens_per_rank": args.layer_tokens,
                     "no_overlap_ms": off, "overlap_ms": on, "speedup": off / on})  # fmt: skip
    return rows, stages


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    parser.add_argument("--layer-tokens", type=int, default=2048, help="tokens per rank")
    parser.add_argument("--transport", nargs="+", default=["process_group", "nccl"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON and Markdown go")
    parser.add_argument(
        "--smoke", action="store_true", help="256 tokens, one repeat: proves the script runs"
    )
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.layer_tokens, args.repeats = 256, 256, 1
    results, layers, stages = [], [], []
    for world_size in args.ranks:
        if args.device == "cuda" and world_size > torch.cuda.device_count():
            print(f"skipping {world_size} ranks: {torch.cuda.device_count()} GPU(s)")
            continue
        out = Path(f"/tmp/bench_dispatch_{os.getpid()}_{world_size}.pt")
        mp.spawn(worker, args=(world_size, args, free_port(), out), nprocs=world_size)
        moved, layer, staged = torch.load(out)
        results, layers, stages = results + moved, layers + layer, stages + staged
        out.unlink()
    save(
        f"bench_dispatch_{args.device}",
        results,
        ["ranks", "dtype", "load", "transport", "layout", "rows_per_rank", "ours_ms", "reference_ms",
         "speedup", "rows_per_s", "GBps", "reference_GBps"],
        f"Expert-parallel dispatch + combine, {args.tokens} tokens per rank, hidden {HIDDEN}, "
        f"{NUM_EXPERTS} experts, top-{TOPK} ({args.device})",
        args.out,
    )  # fmt: skip
    shape = (
        f"{args.layer_tokens} tokens per rank, hidden {HIDDEN}, {NUM_EXPERTS} experts of "
        f"F={EXPERT_FFN}, top-{TOPK}, one shared expert ({args.device})"
    )
    save(
        f"bench_dispatch_{args.device}_layer",
        layers,
        ["ranks", "dtype", "transport", "layout", "tokens_per_rank", "no_overlap_ms",
         "overlap_ms", "speedup"],
        f"MoE layer forward+backward under expert parallelism, without and with overlap, {shape}",
        args.out,
    )  # fmt: skip
    save(
        f"bench_dispatch_{args.device}_timeline",
        stages,
        ["ranks", "dtype", "transport", "overlap", "stage", "begin_ms", "end_ms"],
        f"Stages of one layer step on rank 0, ms from the forward's start, {shape}",
        args.out,
    )  # fmt: skip


if __name__ == "__main__":
    main()
