"""Checkpoints written atomically, holding everything a resumed run needs to continue exactly."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import torch

from ..parallel import ParallelLayout
from .atomic import atomic_write
from .config import TrainConfig
from .errors import BadData

CHECKPOINT_NAME = "checkpoint.pt"
# The consolidated weights: every expert of every layer in one state_dict, whatever the number
# of ranks that trained them; loads into the model built without expert parallelism.
EXPORT_NAME = "model.pt"


def checkpoint_name(layout: ParallelLayout) -> str:
    """One file per rank under torch.distributed (its experts, optimizer state and RNG)."""
    if not layout.distributed:
        return CHECKPOINT_NAME
    return f"checkpoint-rank{layout.rank}-of-{layout.world_size}.pt"


def rng_state() -> dict[str, object]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, object]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, **state: object) -> None:
    """Saves ``state`` (model, optimizer, scheduler, sampler, step, config, history: whatever
    the loop passes) with the RNG states of this process."""
    atomic_write(path, lambda file: torch.save({**state, "rng": rng_state()}, file))


def save_export(path: Path, state_dict: dict[str, torch.Tensor], config: TrainConfig) -> None:
    """Writes the consolidated ``state_dict`` with the configuration that builds its model
    (``load_export``)."""
    atomic_write(
        path, lambda file: torch.save({"model": state_dict, "config": config.to_dict()}, file)
    )


def load_export(path: Path) -> tuple[TrainConfig, dict[str, torch.Tensor]]:
    """The configuration and consolidated weights of ``save_export``: build
    ``MoETransformer(config)`` and load the weights into it."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return TrainConfig.from_dict(state["config"]), state["model"]


def load_checkpoint(path: Path) -> dict[str, object]:
    """Loads a checkpoint written by ``save_checkpoint`` onto the CPU (``load_state_dict``
    moves tensors to the model's device) and restores its RNG states.

    Weights only: a checkpoint holds tensors and plain data (numbers, strings, lists, dicts),
    which is all ``save_checkpoint`` writes. A file that holds anything else, which unpickling
    would construct by running code it names, is refused without running any of it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise BadData(
            f"{path} holds objects other than tensors and plain data: refused unread, as "
            "loading them could run code (a moe-train checkpoint holds none)"
        ) from None
    restore_rng_state(state["rng"])
    return state
