"""Files written all or nothing: checkpoints, summaries, histories and cache entries."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Creates ``path`` with what ``write(file)`` writes, all or nothing.

    The bytes go to a temporary file in the same folder (named for this process, with the
    umask's permissions), are fsynced, and the file then replaces ``path`` in one rename: a
    reader never sees a torn file, whether a second process writes the same entry, this one is
    interrupted, or the disk fills; the previous file stays whole until the rename.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temp_path = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temp_path, "xb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_path, path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda file: file.write(text.encode()))
