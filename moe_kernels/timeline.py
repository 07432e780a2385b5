"""Per-stage wall times of a layer's forward and backward on this thread: the CPU's view of
what Nsight shows on a GPU from the NVTX ranges of the same stages (``moe_kernels._nvtx``).

    with timeline.record() as stages:
        loss = model(x).sum()
        loss.backward()
    for stage in stages: print(stage.name, stage.begin, stage.end)

Every ``nvtx_range`` of the package is a stage (router, dispatch.start, dispatch.wait, experts,
shared_experts.up, ...), and so are the backward passes marked with ``backward_stage``. Under
expert parallelism the timeline shows the overlap: a stage that runs between an exchange's
``.start`` and its ``.wait`` ran while the rows travelled."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage: its name and its ``time.perf_counter()`` seconds at begin and end."""

    name: str
    begin: float
    end: float


class Timeline(list[Stage]):
    """The stages recorded, in the order they ended."""

    def __init__(self) -> None:
        super().__init__()
        self.opened: dict[str, float] = {}

    def named(self, name: str) -> list[Stage]:
        return [stage for stage in self if stage.name == name]


_active: Timeline | None = None


@contextlib.contextmanager
def record() -> Iterator[Timeline]:
    """Records the stages run inside the block, forward and backward."""
    global _active
    outer, _active = _active, Timeline()
    try:
        yield _active
    finally:
        _active = outer


def recording() -> bool:
    return _active is not None


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Records the block as a stage when a timeline is being recorded."""
    if _active is None:
        yield
        return
    timeline, begin = _active, time.perf_counter()
    try:
        yield
    finally:
        timeline.append(Stage(name, begin, time.perf_counter()))


def open_stage(name: str) -> None:
    if _active is not None:
        _active.opened[name] = time.perf_counter()


def close_stage(name: str) -> None:
    if _active is not None and name in _active.opened:
        _active.append(Stage(name, _active.opened.pop(name), time.perf_counter()))
