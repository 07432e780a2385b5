"""What every corpus source produces: named documents; the content hash that keys what is
derived from them in the cache, and where that cache lives."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Document:
    name: str  # what the split hashes: a relative path, a book, a chunk index
    text: str


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
