"""Checkpoints written atomically, holding everything a resumed run needs to continue exactly."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from .atomic import atomic_write

CHECKPOINT_NAME = "checkpoint.pt"


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


def load_checkpoint(path: Path) -> dict[str, object]:
    """Loads a checkpoint written by ``save_checkpoint`` onto the CPU (``load_state_dict``
    moves tensors to the model's device) and restores its RNG states."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    restore_rng_state(state["rng"])
    return state
