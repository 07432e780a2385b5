"""Checkpoints of an FSDP2-sharded run (``moe-train --fsdp``), through
``torch.distributed.checkpoint``: every rank writes its own shards in parallel into one
folder, and any layout reads them back, another number of ranks or expert-parallel size, or
one process.

The folder holds DCP's files (model and optimizer state, by fully qualified name, each weight
with its whole shape: the experts' is [E, ...] whatever the layout) and ``state.json`` (the
schedule, the data position, the configuration, the history and the RNG states: plain data,
written by rank 0). DCP reads its metadata file with pickle, which would construct whatever
the file names by running code: the file is read first with an unpickler that knows only
DCP's metadata types, and a checkpoint naming anything else is refused. (DCP reads tensors as
raw bytes, and other values weights-only.) A save is atomic: the ranks write into
``<folder>.tmp``, and once all have finished rank 0 puts it in place of the previous one.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .errors import BadData

SHARDED_CHECKPOINT_NAME = "checkpoint"
STATE_NAME = "state.json"
METADATA_NAME = ".metadata"  # DCP's
METADATA_MODULE = "torch.distributed.checkpoint.metadata"
# What DCP's metadata may name besides its own dataclasses: each builds a value, runs nothing.
METADATA_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
}


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's metadata, refusing any global but its types, torch dtypes and those of
    ``METADATA_GLOBALS``."""

    def find_class(self, module: str, name: str) -> object:
        found = getattr(sys.modules.get(module), name, None)
        known = (
            # A type defined there, not a name it imports.
            (module == METADATA_MODULE and getattr(found, "__module__", None) == module)
            or (module, name) in METADATA_GLOBALS
            or (module == "torch" and isinstance(found, torch.dtype))
        )
        if not known:
            raise pickle.UnpicklingError(f"{module}.{name}")
        return super().find_class(module, name)


def check_metadata(path: Path) -> None:
    """Raises BadData if DCP's metadata in ``path`` names anything unpickling it would run."""
    try:
        with open(path / METADATA_NAME, "rb") as file:
            MetadataUnpickler(file).load()
    except pickle.UnpicklingError as error:
        raise BadData(
            f"{path} is not a moe-train checkpoint: its {METADATA_NAME} names {error}, not a "
            "checkpoint metadata type; refused unread, as loading it could run code"
        ) from None


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _tensors_apart(state: dict[str, object]) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """The tensors among the values of ``state`` and of its dicts (a sampler's generator
    state), keyed "<key>/<name>", and the plain data left."""
    tensors, plain = {}, {}
    for key, value in state.items():
        if isinstance(value, dict):
            tensors |= {f"{key}/{k}": v for k, v in value.items() if isinstance(v, torch.Tensor)}
            value = {k: v for k, v in value.items() if not isinstance(v, torch.Tensor)}
        plain[key] = value
    return tensors, plain


def save_sharded_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, **state: object
) -> None:
    """Writes the model's and optimizer's shards (every rank, collectively) and ``state``
    (schedule, sampler, config, history: plain data and, in its dicts, tensors) with the RNG
    states. Every rank passes the same ``state``."""
    staging = path.with_name(path.name + ".tmp")
    if _is_main():
        shutil.rmtree(staging, ignore_errors=True)
    _barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    tensors, plain = _tensors_apart({**state, "rng": {"torch": torch.get_rng_state()}})
    dcp.save(
        {"model": model_state, "optimizer": optimizer_state, "state": tensors},
        checkpoint_id=staging,
    )
    if _is_main():
        version, words, gauss = random.getstate()
        plain["rng"]["python"] = [version, list(words), gauss]
        (staging / STATE_NAME).write_text(json.dumps(plain))
    _barrier()  # every rank's shards are written
    if _is_main():
        previous = path.with_name(path.name + ".old")
        if path.exists():
            path.rename(previous)
        staging.rename(path)
        shutil.rmtree(previous, ignore_errors=True)
    _barrier()


def load_sharded_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, like: dict[str, object]
) -> dict[str, object]:
    """Loads the shards this rank's model and optimizer hold now, whatever the layout that
    wrote them, restores the RNG states, and returns the rest of the state; ``like``: a
    ``state`` as saved, whose tensors give the shapes to read (a sampler's state now)."""
    check_metadata(path)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    tensors, _ = _tensors_apart({**like, "rng": {"torch": torch.get_rng_state()}})
    loaded = {"model": model_state, "optimizer": optimizer_state, "state": tensors}
    dcp.load(loaded, checkpoint_id=path)
    set_state_dict(
        model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"]
    )
    state = json.loads((path / STATE_NAME).read_text())
    for name, tensor in loaded["state"].items():
        key, field = name.split("/")
        state[key][field] = tensor
    version, words, gauss = state["rng"].pop("python")
    random.setstate((version, tuple(words), gauss))
    torch.set_rng_state(state.pop("rng")["torch"])
    return state
