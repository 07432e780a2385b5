"""Text for training a small language model, and its validation split.

Sources of text, none downloaded at run time (``load_corpus``):

- ``"stdlib"``: the English docstrings and comments of the running interpreter's standard
  library, about 3 MB; needs nothing installed (``stdlib_text``).
- ``"kjv"``: the King James Bible of Debian's ``bible-kjv`` packages, about 4.1 MB.
- a path: a UTF-8 text file, or a folder of them.

The validation split is held out by document, so no validation text is ever trained on.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .documents import Document, default_cache_dir, short_sha256, top_folder
from .errors import BadData, MissingData
from .stdlib_text import stdlib_documents

DEFAULT_VAL_FRACTION = 0.05


# --------------------------------------------------------------------------------------------
# Corpus and its validation split


@dataclass(frozen=True)
class Corpus:
    """Documents of text split into training and held-out validation documents.

    ``fingerprint`` (16 hex digits) changes with the text and with the split rule; it keys
    what is derived from the corpus in the cache (tokenizers, token ids). ``train_domains``
    and ``val_domains`` name the domain of each document (``Document.domain``).
    """

    name: str
    train: list[str] = field(repr=False)
    val: list[str] = field(repr=False)
    train_domains: list[str] = field(repr=False)
    val_domains: list[str] = field(repr=False)
    fingerprint: str


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
        documents = stdlib_documents(default_cache_dir() if cache_dir is None else cache_dir)
    elif source == "kjv":
        documents = _kjv_documents()
    else:
        documents = _path_documents(Path(source))
    return _split(source, documents, val_fraction)


def _split(name: str, documents: list[Document], val_fraction: float) -> Corpus:
    if len(documents) < 2:
        raise BadData(
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
    fingerprint = short_sha256(
        split_rule, *(part for doc in documents for part in (doc.name, doc.text))
    )
    return Corpus(
        name=name,
        train=[doc.text for doc, held_out in zip(documents, in_val, strict=True) if not held_out],
        val=[doc.text for doc, held_out in zip(documents, in_val, strict=True) if held_out],
        train_domains=[
            doc.domain for doc, held_out in zip(documents, in_val, strict=True) if not held_out
        ],
        val_domains=[
            doc.domain for doc, held_out in zip(documents, in_val, strict=True) if held_out
        ],
        fingerprint=fingerprint,
    )


def _hash_position(name: str) -> float:
    """Where ``name`` falls in [0, 1): the same in every process, unlike ``hash()``."""
    digest = hashlib.sha256(name.encode("utf-8", errors="surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


# --------------------------------------------------------------------------------------------
# The King James Bible

_KJV_DATA = Path("/usr/lib/bible.data")
_KJV_VERSE = re.compile(r"^(?P<chapter>(?P<book>\d?[A-Za-z]+)\d+):\d+ (?P<text>.*)$")  # Ge1:1


def _kjv_documents() -> list[Document]:
    """One document per chapter (1189 of them), a verse a line.

    Chapters, not books: holding out 5% of 66 books by hash leaves a validation split of
    anything from one short epistle to several long books, 5% of the chapters is steady.
    The book is the chapter's domain.
    ``bible-kjv-text`` holds the text compressed in a format of its own; ``bible`` (of
    ``bible-kjv``) decompresses it.
    """
    program = shutil.which("bible")
    if program is None or not _KJV_DATA.is_file():
        raise MissingData(
            "the 'kjv' corpus needs Debian's King James Bible: `apt-get install bible-kjv` "
            f"(it installs the text, bible-kjv-text, at {_KJV_DATA}, and the `bible` program "
            "that decompresses it)"
        )
    # -f turns pretty-printing off: one "Ge1:1 In the beginning..." line per verse.
    command = [program, "-f", "-p", str(_KJV_DATA.parent), "Gen1:1-Rev22:21"]
    dump = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if dump.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed: {dump.stderr.strip()}")
    chapters: dict[tuple[str, str], list[str]] = {}
    for line in dump.stdout.splitlines():
        match = _KJV_VERSE.match(line)
        if match is None:
            raise ValueError(f"unexpected line in the output of `bible`: {line!r}")
        chapters.setdefault((match["chapter"], match["book"]), []).append(match["text"])
    return [
        Document(chapter, "\n".join(verses), book) for (chapter, book), verses in chapters.items()
    ]


# --------------------------------------------------------------------------------------------
# Text files

# A single file is cut into chunks of whole paragraphs this long, so it can be split.
_CHUNK_CHARS = 2000


def _path_documents(path: Path) -> list[Document]:
    if path.is_dir():
        documents = _folder_documents(path)
        if not documents:
            raise BadData(f"{path} holds no UTF-8 text files")
        return documents
    if path.is_file():
        text = _read_text(path)
        if text is None:
            raise BadData(f"{path} is not a UTF-8 text file")
        chunks = _paragraph_chunks(text)
        return [
            Document(f"{path.name}#{index}", chunk, path.stem) for index, chunk in enumerate(chunks)
        ]
    if path.exists():
        raise BadData(f"{path} is neither a file nor a folder")
    raise MissingData(
        f"corpus source {str(path)!r} is not 'stdlib', 'kjv', or an existing file or folder"
    )


def _folder_documents(folder: Path) -> list[Document]:
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
            documents.append(Document(relative.as_posix(), text, top_folder(relative.as_posix())))
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
