"""Token ids for training: a corpus encoded by its tokenizer (cached), or a pre-tokenized
``.npy`` / ``.bin`` file (its validation split a contiguous tail), and deterministic batches
resumable from a checkpoint."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .atomic import atomic_write
from .corpus import DEFAULT_VAL_FRACTION, Corpus
from .documents import default_cache_dir
from .errors import BadData, MissingData

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

# --------------------------------------------------------------------------------------------
# Token ids


def load_token_file(
    path: str | os.PathLike[str], *, val_fraction: float = DEFAULT_VAL_FRACTION
) -> tuple[np.ndarray, np.ndarray]:
    """Memory-mapped (train, val) token ids of a pre-tokenized file, 1-D integer arrays.

    ``.npy``: a 1-D integer array. ``.bin``: raw little-endian uint16 ids (nanoGPT's files).
    The last ``val_fraction`` of the tokens, a contiguous tail, is the validation split. Both
    are views of one memory map: nothing is read until used.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingData(f"token file {str(path)!r} does not exist")
    if path.suffix == ".npy":
        tokens = np.load(path, mmap_mode="r")
    elif path.suffix == ".bin":
        tokens = np.memmap(path, dtype="<u2", mode="r")
    else:
        raise BadData(f"{path}: a token file is .npy or .bin (raw uint16), not {path.suffix!r}")
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise BadData(f"{path}: expected a 1-D integer array, got {tokens.dtype} {tokens.shape}")
    if len(tokens) < 2:
        raise BadData(f"{path}: {len(tokens)} token(s) cannot make a train and a val split")
    num_val = min(max(1, round(len(tokens) * val_fraction)), len(tokens) - 1)
    return tokens[:-num_val], tokens[-num_val:]


def tokenize_corpus(
    corpus: Corpus, tokenizer: Tokenizer, cache_dir: Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) token ids of ``corpus``, 1-D int64 tensors.

    Each document is encoded and followed by ``tokenizer.eot_id``; the documents follow one
    another. The ids are cached under ``cache_dir`` (default ``default_cache_dir()``) keyed by
    the corpus and tokenizer fingerprints, so a later run does not encode again.
    """
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    key = f"tokens-{corpus.fingerprint}-{tokenizer.fingerprint}"
    paths = [cache_dir / f"{key}-{split}.npy" for split in ("train", "val")]
    if not all(path.is_file() for path in paths):
        for path, documents in zip(paths, (corpus.train, corpus.val), strict=True):
            ids = _encode_documents(documents, tokenizer)
            atomic_write(path, lambda file, ids=ids: np.save(file, ids))
    train, val = (torch.from_numpy(np.load(path).astype(np.int64)) for path in paths)
    return train, val


def _encode_documents(documents: list[str], tokenizer: Tokenizer) -> np.ndarray:
    """The ids of ``documents``, each followed by the end-of-text id, in the smallest unsigned
    dtype that holds the vocabulary (the cache files are then a half or a quarter the size)."""
    ids: list[int] = []
    for document in documents:
        ids.extend(tokenizer.encode(document))
        ids.append(tokenizer.eot_id)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    return np.asarray(ids, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Batches

TokenIds = torch.Tensor | np.ndarray


class BatchSampler:
    """Random windows of a token sequence: ``next_batch()`` gives (inputs, targets), both
    [batch_size, seq_len] int64, targets the inputs shifted left by one token.

    Window starts are drawn from the sampler's own generator seeded by ``seed``;
    ``state_dict()`` holds that generator's state, so a sampler restored from it draws the
    batches an uninterrupted one would. ``tokens`` (1-D, integer) may be a tensor or a numpy
    array, memory-mapped included: only the windows are read.
    """

    def __init__(self, tokens: TokenIds, batch_size: int, seq_len: int, seed: int) -> None:
        _check_window_fits(tokens, seq_len)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.batches_drawn = 0
        self._generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each [batch_size, seq_len] int64."""
        num_starts = len(self.tokens) - self.seq_len  # a window holds seq_len + 1 tokens
        starts = torch.randint(num_starts, (self.batch_size,), generator=self._generator)
        self.batches_drawn += 1
        return _windows(self.tokens, starts, self.seq_len)

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self._generator.get_state(),
            "batches_drawn": self.batches_drawn,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shape = (state["batch_size"], state["seq_len"])
        if shape != (self.batch_size, self.seq_len):
            raise ValueError(
                f"the state is of a sampler of batch_size, seq_len = {shape}, "
                f"this one's are {(self.batch_size, self.seq_len)}"
            )
        self._generator.set_state(state["generator"])
        self.batches_drawn = state["batches_drawn"]


def eval_batches(
    tokens: TokenIds, batch_size: int, seq_len: int, max_tokens: int, multiple_of: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive non-overlapping windows from the start of ``tokens``, in batches.

    (inputs, targets) pairs, each [batch, seq_len] int64 with batch <= batch_size (only the
    last batch can be smaller). The windows hold at most ``max_tokens`` inputs in all, but
    there is always one; their number is a multiple of ``multiple_of`` (with ``batch_size``
    one too, every batch splits evenly over that many ranks). The same on every call.
    """
    _check_window_fits(tokens, seq_len)
    num_windows = min((len(tokens) - 1) // seq_len, max(1, max_tokens // seq_len))
    num_windows = max(multiple_of, num_windows // multiple_of * multiple_of)
    if num_windows * seq_len + 1 > len(tokens):
        raise ValueError(
            f"{len(tokens)} tokens are too few for {multiple_of} windows of seq_len={seq_len}"
        )
    starts = torch.arange(num_windows) * seq_len
    return [
        _windows(tokens, starts[first : first + batch_size], seq_len)
        for first in range(0, num_windows, batch_size)
    ]


def _check_window_fits(tokens: TokenIds, seq_len: int) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if len(tokens) < seq_len + 1:
        raise BadData(
            f"{len(tokens)} tokens are too few for a window of seq_len={seq_len} "
            f"(inputs and targets need seq_len + 1 = {seq_len + 1})"
        )


def _windows(
    tokens: TokenIds, starts: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) [len(starts), seq_len] int64 of the windows starting at ``starts``."""
    positions = starts[:, None] + torch.arange(seq_len + 1)
    if isinstance(tokens, np.ndarray):
        windows = torch.from_numpy(tokens[positions.numpy()].astype(np.int64))
    else:
        windows = tokens[positions].to(torch.int64)
    return windows[:, :-1], windows[:, 1:]
