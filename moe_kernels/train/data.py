"""Text for training a small language model, its validation split, and batches of token ids.

Sources of text, none downloaded at run time (``load_corpus``):

- ``"stdlib"``: the English docstrings and comments of the running interpreter's standard
  library, about 3 MB; needs nothing installed.
- ``"kjv"``: the King James Bible of Debian's ``bible-kjv`` packages, about 4.1 MB.
- a path: a UTF-8 text file, or a folder of them.

Pre-tokenized ``.npy`` / ``.bin`` files (``load_token_file``) serve larger runs. The validation
split is held out by document (by a contiguous tail for token files), so no validation text is
ever trained on. Batches (``BatchSampler``) are deterministic and resumable from a checkpoint.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import io
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .atomic import atomic_write

if TYPE_CHECKING:
    from moe_kernels.train.tokenizer import Tokenizer

DEFAULT_VAL_FRACTION = 0.05


# --------------------------------------------------------------------------------------------
# Cache


def default_cache_dir() -> Path:
    """``$MOE_KERNELS_CACHE``, else ``$XDG_CACHE_HOME/moe_kernels``, else
    ``~/.cache/moe_kernels``."""
    if os.environ.get("MOE_KERNELS_CACHE"):
        return Path(os.environ["MOE_KERNELS_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "moe_kernels"
    return Path.home() / ".cache" / "moe_kernels"


def _short_sha256(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8", errors="surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Corpus and its validation split


@dataclass(frozen=True)
class Corpus:
    """Documents of text split into training and held-out validation documents.

    ``fingerprint`` (16 hex digits) changes with the text and with the split rule; it keys
    what is derived from the corpus in the cache (tokenizers, token ids).
    """

    name: str
    train: list[str] = field(repr=False)
    val: list[str] = field(repr=False)
    fingerprint: str


@dataclass(frozen=True)
class _Document:
    name: str  # what the split hashes: a relative path, a book, a chunk index
    text: str


def load_corpus(
    source: str = "stdlib",
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    cache_dir: Path | None = None,
) -> Corpus:
    """The corpus of ``source``: ``"stdlib"``, ``"kjv"``, or the path of a text file or folder.

    About ``val_fraction`` of the documents, chosen by a hash of their names, go to ``val``;
    the choice is the same on every run and machine. ``cache_dir`` (default
    ``default_cache_dir()``) keeps the stdlib's extracted text.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if source == "stdlib":
        documents = _stdlib_documents(default_cache_dir() if cache_dir is None else cache_dir)
    elif source == "kjv":
        documents = _kjv_documents()
    else:
        documents = _path_documents(Path(source))
    return _split(source, documents, val_fraction)


def _split(name: str, documents: list[_Document], val_fraction: float) -> Corpus:
    if len(documents) < 2:
        raise ValueError(
            f"{name!r} gives {len(documents)} document(s); a validation split needs at least 2"
        )
    positions = [_hash_position(document.name) for document in documents]
    threshold = 1.0 - val_fraction
    in_val = [position >= threshold for position in positions]
    # Few documents can leave a split empty: the one nearest the threshold crosses over.
    if not any(in_val):
        in_val[positions.index(max(positions))] = True
    if all(in_val):
        in_val[positions.index(min(positions))] = False
    split_rule = f"sha256(name) >= {threshold!r}"
    fingerprint = _short_sha256(
        split_rule, *(part for doc in documents for part in (doc.name, doc.text))
    )
    return Corpus(
        name=name,
        train=[doc.text for doc, held_out in zip(documents, in_val, strict=True) if not held_out],
        val=[doc.text for doc, held_out in zip(documents, in_val, strict=True) if held_out],
        fingerprint=fingerprint,
    )


def _hash_position(name: str) -> float:
    """Where ``name`` falls in [0, 1): the same in every process, unlike ``hash()``."""
    digest = hashlib.sha256(name.encode("utf-8", errors="surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


# --------------------------------------------------------------------------------------------
# The standard library's docstrings and comments

# Bumped when what is extracted changes, so cached extractions are not reused.
_STDLIB_EXTRACTION_VERSION = 1
# Tests are mostly code and test data; the rest of the stdlib is documented prose.
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
_PRAGMA = re.compile(r"^!|coding[:=]|\bnoqa\b|^type:|^pragma\b|^pylint:|^fmt:|^mypy:", re.I)
_CODE_START = re.compile(
    r"^(?:import |from \S+ import |def |class |return\b|raise |print\(|elif |else:|try:|"
    r"except\b|finally:|>>>|(?:if|for|while|with) .*:$|[\w.\[\]'\"]+\s*[-+*/|&]?=\s*\S)"
)
_CODE_SYMBOLS = frozenset("()[]{}=<>;*")


def _stdlib_documents(cache_dir: Path) -> list[_Document]:
    """One document per stdlib module: its docstrings and comments in source order.

    Extracting them takes about 5 s, so they are cached, keyed by the interpreter, the
    stdlib's path and its files' sizes and times (an upgrade in place changes those).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    sources = _stdlib_sources(root)
    stats = [path.stat() for path in sources]
    listing = [
        f"{path}:{st.st_size}:{st.st_mtime_ns}" for path, st in zip(sources, stats, strict=True)
    ]
    key = _short_sha256(str(_STDLIB_EXTRACTION_VERSION), sys.version, str(root), *listing)
    cache_path = cache_dir / f"stdlib-{sys.version_info[0]}.{sys.version_info[1]}-{key}.json"
    if cache_path.is_file():
        return [_Document(name, text) for name, text in json.loads(cache_path.read_bytes())]
    documents = _extract_stdlib_documents(root, sources)
    payload = json.dumps([[doc.name, doc.text] for doc in documents]).encode()
    atomic_write(cache_path, lambda file: file.write(payload))
    return documents


def _stdlib_sources(root: Path) -> list[Path]:
    """The stdlib's .py files, tests and installed packages left out, sorted."""
    sources = []
    for folder, subfolders, files in os.walk(root):
        # Pruned in place, so the walk never enters site-packages (often the bulk of it).
        subfolders[:] = [name for name in subfolders if name not in _EXCLUDED_DIRS]
        sources.extend(Path(folder, name) for name in files if name.endswith(".py"))
    return sorted(sources, key=lambda path: path.relative_to(root).as_posix())


def _extract_stdlib_documents(root: Path, sources: list[Path]) -> list[_Document]:
    documents = []
    for path in sources:
        try:
            paragraphs = _python_prose(path.read_bytes())
        except (SyntaxError, tokenize.TokenError, UnicodeDecodeError):
            continue  # not Python this interpreter can read (e.g. a stray Python 2 file)
        if paragraphs:
            documents.append(_Document(path.relative_to(root).as_posix(), "\n\n".join(paragraphs)))
    return documents


def _python_prose(source: bytes) -> list[str]:
    """The docstrings and comment paragraphs of Python ``source``, in order of their lines.

    Tokens, not ``ast``: parsing the whole stdlib into trees takes about 9 s, tokenizing it
    about 2 s, and the docstrings found are those ``ast.get_docstring`` gives (all 8605 of
    Python 3.11's).
    """
    tokens = list(tokenize.tokenize(io.BytesIO(source).readline))
    pieces = _docstrings(tokens) + _comment_paragraphs(tokens)
    return [text for _, text in sorted(pieces)]


def _docstrings(tokens: list[tokenize.TokenInfo]) -> list[tuple[int, str]]:
    """(line, cleaned docstring) of the module and of each class and function."""
    trivia = (tokenize.NL, tokenize.COMMENT, tokenize.ENCODING)
    code = [token for token in tokens if token.type not in trivia]
    body_starts = [0]  # the module's, then the token after each def/class header's colon
    depth, in_header = 0, False
    for index, token in enumerate(code):
        if token.type == tokenize.NAME and token.string in ("def", "class") and depth == 0:
            in_header = True
        elif token.type == tokenize.OP and token.string in "([{":
            depth += 1
        elif token.type == tokenize.OP and token.string in ")]}":
            depth -= 1
        elif token.type == tokenize.OP and token.string == ":" and depth == 0 and in_header:
            in_header = False
            body_starts.append(index + 1)
    found = []
    for index in body_starts:
        while index < len(code) and code[index].type in (tokenize.NEWLINE, tokenize.INDENT):
            index += 1
        docstring = _docstring_at(code, index)
        if docstring:
            found.append((code[index].start[0], docstring))
    return found


def _docstring_at(code: list[tokenize.TokenInfo], index: int) -> str | None:
    """The docstring when the statement at ``index`` is a lone string literal."""
    if index + 1 >= len(code) or code[index].type != tokenize.STRING:
        return None
    if code[index + 1].type not in (tokenize.NEWLINE, tokenize.ENDMARKER):
        return None
    try:
        value = ast.literal_eval(code[index].string)
    except (SyntaxError, ValueError):  # an f-string is no docstring
        return None
    return inspect.cleandoc(value) if isinstance(value, str) else None


def _comment_paragraphs(tokens: list[tokenize.TokenInfo]) -> list[tuple[int, str]]:
    """(first line, text) of each run of prose comments on consecutive lines of their own."""
    paragraphs: list[tuple[int, str]] = []
    lines: list[str] = []
    first = last = -1
    for token in tokens:
        if token.type != tokenize.COMMENT or not token.line.lstrip().startswith("#"):
            continue  # a comment after code annotates that line, it is no prose
        line_number = token.start[0]
        text = token.string.lstrip("#").strip()
        prose = _is_prose(text)
        if lines and (line_number != last + 1 or not prose):
            paragraphs.append((first, "\n".join(lines)))
            lines = []
        if prose:
            if not lines:
                first = line_number
            lines.append(text)
        last = line_number
    if lines:
        paragraphs.append((first, "\n".join(lines)))
    return paragraphs


def _is_prose(comment: str) -> bool:
    """Whether a comment's text reads as prose, not a pragma, a rule line or code."""
    if not any(char.isalpha() for char in comment) or _PRAGMA.search(comment):
        return False
    if _CODE_START.match(comment):
        return False
    return sum(char in _CODE_SYMBOLS for char in comment) <= 0.1 * len(comment)


# --------------------------------------------------------------------------------------------
# The King James Bible

_KJV_DATA = Path("/usr/lib/bible.data")
_KJV_VERSE = re.compile(r"^(?P<chapter>\d?[A-Za-z]+\d+):\d+ (?P<text>.*)$")  # Ge1:1 text


def _kjv_documents() -> list[_Document]:
    """One document per chapter (1189 of them), a verse a line.

    Chapters, not books: holding out 5% of 66 books by hash leaves a validation split of
    anything from one short epistle to several long books, 5% of the chapters is steady.
    ``bible-kjv-text`` holds the text compressed in a format of its own; ``bible`` (of
    ``bible-kjv``) decompresses it.
    """
    program = shutil.which("bible")
    if program is None or not _KJV_DATA.is_file():
        raise FileNotFoundError(
            "the 'kjv' corpus needs Debian's King James Bible: `apt-get install bible-kjv` "
            f"(it installs the text, bible-kjv-text, at {_KJV_DATA}, and the `bible` program "
            "that decompresses it)"
        )
    # -f turns pretty-printing off: one "Ge1:1 In the beginning..." line per verse.
    command = [program, "-f", "-p", str(_KJV_DATA.parent), "Gen1:1-Rev22:21"]
    dump = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if dump.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed: {dump.stderr.strip()}")
    chapters: dict[str, list[str]] = {}
    for line in dump.stdout.splitlines():
        match = _KJV_VERSE.match(line)
        if match is None:
            raise ValueError(f"unexpected line in the output of `bible`: {line!r}")
        chapters.setdefault(match["chapter"], []).append(match["text"])
    return [_Document(chapter, "\n".join(verses)) for chapter, verses in chapters.items()]


# --------------------------------------------------------------------------------------------
# Text files

# A single file is cut into chunks of whole paragraphs this long, so it can be split.
_CHUNK_CHARS = 2000


def _path_documents(path: Path) -> list[_Document]:
    if path.is_dir():
        documents = _folder_documents(path)
        if not documents:
            raise ValueError(f"{path} holds no UTF-8 text files")
        return documents
    if path.is_file():
        text = _read_text(path)
        if text is None:
            raise ValueError(f"{path} is not a UTF-8 text file")
        chunks = _paragraph_chunks(text)
        return [_Document(f"{path.name}#{index}", chunk) for index, chunk in enumerate(chunks)]
    if path.exists():
        raise ValueError(f"{path} is neither a file nor a folder")
    raise FileNotFoundError(
        f"corpus source {str(path)!r} is not 'stdlib', 'kjv', or an existing file or folder"
    )


def _folder_documents(folder: Path) -> list[_Document]:
    """One document per UTF-8 text file under ``folder``, in order of relative path; hidden
    files and folders (``.git``) are skipped."""
    relative_paths = []
    for parent, subfolders, files in os.walk(folder):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        relative_parent = Path(parent).relative_to(folder)
        relative_paths.extend(relative_parent / name for name in files if not name.startswith("."))
    documents = []
    for relative in sorted(relative_paths, key=Path.as_posix):
        text = _read_text(folder / relative)
        if text:
            documents.append(_Document(relative.as_posix(), text))
    return documents


def _read_text(path: Path) -> str | None:
    """The text of a UTF-8 file, None for a binary file (NUL bytes early on, or not UTF-8)."""
    with open(path, "rb") as file:
        head = file.read(8192)
        if b"\0" in head:
            return None  # without reading the rest, which may be gigabytes of weights
        data = head + file.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None


def _paragraph_chunks(text: str) -> list[str]:
    """Consecutive paragraphs (apart by blank lines) packed into chunks of at least
    ``_CHUNK_CHARS`` characters; the last may be shorter."""
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for paragraph in re.split(r"\n[ \t]*\n", text.strip()):
        current.append(paragraph)
        size += len(paragraph)
        if size >= _CHUNK_CHARS:
            chunks.append("\n\n".join(current))
            current, size = [], 0
    if current:
        chunks.append("\n\n".join(current))
    return chunks


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
        raise FileNotFoundError(f"token file {str(path)!r} does not exist")
    if path.suffix == ".npy":
        tokens = np.load(path, mmap_mode="r")
    elif path.suffix == ".bin":
        tokens = np.memmap(path, dtype="<u2", mode="r")
    else:
        raise ValueError(f"{path}: a token file is .npy or .bin (raw uint16), not {path.suffix!r}")
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{path}: expected a 1-D integer array, got {tokens.dtype} {tokens.shape}")
    if len(tokens) < 2:
        raise ValueError(f"{path}: {len(tokens)} token(s) cannot make a train and a val split")
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
    tokens: TokenIds, batch_size: int, seq_len: int, max_tokens: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive non-overlapping windows from the start of ``tokens``, in batches.

    (inputs, targets) pairs, each [batch, seq_len] int64 with batch <= batch_size (only the
    last batch can be smaller). The windows hold at most ``max_tokens`` inputs in all, but
    there is always one. The same on every call.
    """
    _check_window_fits(tokens, seq_len)
    num_windows = min((len(tokens) - 1) // seq_len, max(1, max_tokens // seq_len))
    starts = torch.arange(num_windows) * seq_len
    return [
        _windows(tokens, starts[first : first + batch_size], seq_len)
        for first in range(0, num_windows, batch_size)
    ]


def _check_window_fits(tokens: TokenIds, seq_len: int) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if len(tokens) < seq_len + 1:
        raise ValueError(
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
