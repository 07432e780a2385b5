"""The training history as TensorBoard scalars (``moe-train --tensorboard DIR``): each row's
numbers at its step, under the names ``history.jsonl`` gives them."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

from .errors import BadArgument


def summary_writer_class() -> type:
    """torch's SummaryWriter, which needs the tensorboard package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise BadArgument(
            "--tensorboard needs the tensorboard package: pip install tensorboard"
        ) from None
    return SummaryWriter


class ScalarLog:
    """Writes history rows to the TensorBoard event files of ``log_dir``."""

    def __init__(self, log_dir: Path) -> None:
        self._writer = summary_writer_class()(log_dir=str(log_dir))

    def write(self, row: dict[str, object]) -> None:
        step = int(row["step"])
        for key, value in row.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, step)

    def __enter__(self) -> ScalarLog:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._writer.close()
