"""Runs a test function on several Gloo ranks, each in its own spawned process.

``run_on_ranks(fn, world_size, tmp_path, *args)`` calls ``fn(rank, world_size, *args)`` in each
process after ``init_process_group("gloo")`` and returns what each returned (anything
``torch.save`` can write), rank by rank. An assertion or error in any rank fails the caller
with that rank's traceback. ``launch`` starts processes as torchrun does (its environment,
nothing initialised) and reports how each ended, failures included.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Collectives of the tests wait at most this long for a missing rank.
TIMEOUT = datetime.timedelta(seconds=60)


def init_rank(rank: int, world_size: int, tmp_path: Path, backend: str) -> None:
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend,
        init_method=f"file://{tmp_path / 'init'}",
        rank=rank,
        world_size=world_size,
        timeout=TIMEOUT,
    )


def _worker(rank: int, world_size: int, tmp_path: Path, backend: str, fn, args) -> None:
    torch.set_num_threads(1)  # 2-4 processes share the machine's cores
    init_rank(rank, world_size, tmp_path, backend)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, tmp_path / f"result-{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn, world_size: int, tmp_path: Path, *args, backend: str = "gloo") -> list:
    """With ``backend="nccl"``, rank r runs on GPU r."""
    mp.spawn(
        _worker,
        args=(world_size, tmp_path, backend, fn, args),
        nprocs=world_size,
        join=True,
    )
    return [
        torch.load(tmp_path / f"result-{rank}.pt", weights_only=False) for rank in range(world_size)
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Outcome:
    """How a launched rank ended: exit code (None if it was still running at the deadline and
    was killed), seconds from the launch to its end, and the error it raised, if any."""

    exitcode: int | None
    seconds: float
    error: str


def _launched(rank: int, world_size: int, port: int, error_path: Path, fn, args) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    try:
        fn(rank, world_size, *args)
    except BaseException:
        error_path.write_text(traceback.format_exc())
        raise


def launch(fn, world_size: int, tmp_path: Path, *args, deadline: float = 120.0) -> list[Outcome]:
    """Runs ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes with the
    environment torchrun gives its workers (nothing initialised), as torchrun would; waits at
    most ``deadline`` seconds for all of them, then kills any still running."""
    context = mp.get_context("spawn")
    port = free_port()
    errors = [tmp_path / f"error-{rank}.txt" for rank in range(world_size)]
    processes = [
        context.Process(target=_launched, args=(rank, world_size, port, errors[rank], fn, args))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    begin = time.monotonic()
    ended = [None] * world_size
    while time.monotonic() - begin < deadline and None in ended:
        for rank, process in enumerate(processes):
            if ended[rank] is None and not process.is_alive():
                ended[rank] = time.monotonic() - begin
        time.sleep(0.05)
    outcomes = []
    for process, error, seconds in zip(processes, errors, ended, strict=True):
        if process.is_alive():
            process.kill()
        process.join()
        text = error.read_text() if error.exists() else ""
        outcomes.append(
            Outcome(process.exitcode if seconds is not None else None, seconds or deadline, text)
        )
    return outcomes
