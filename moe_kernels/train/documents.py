"""What every corpus source produces: named documents; the content hash that keys what is
derived from them in the cache, and where that cache lives."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath


@dataclass(frozen=True)
class Document:
    name: str  # what the split hashes: a relative path, a chapter, a chunk index
    text: str
    domain: str  # what it is about: a package, a book, a folder (for routing per domain)


def top_folder(relative_path: str) -> str:
    """The domain of a file in a tree: its first folder, or its own name without its suffix
    at the top (``asyncio/events.py`` and ``asyncio.py`` are both ``asyncio``)."""
    first, _, rest = relative_path.partition("/")
    return first if rest else PurePosixPath(first).stem


def default_cache_dir() -> Path:
    """``$MOE_KERNELS_CACHE``, else ``$XDG_CACHE_HOME/moe_kernels``, else
    ``~/.cache/moe_kernels``."""
    if os.environ.get("MOE_KERNELS_CACHE"):
        return Path(os.environ["MOE_KERNELS_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "moe_kernels"
    return Path.home() / ".cache" / "moe_kernels"


def short_sha256(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8", errors="surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()[:16]
