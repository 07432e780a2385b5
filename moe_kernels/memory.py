"""Host memory policy for MoE training on the CPU.

An MoE layer's forward and backward create fresh buffers of 50-400 MB each (permuted rows,
expert activations, per-expert weight gradients). glibc's malloc serves blocks that large with
fresh ``mmap`` pages and unmaps them when they are freed, so every step pays a page fault per
4 KB of each new buffer: measured at about 0.25 ms per MB on this project's 2-core VM, 15-20% of
a DeepSeek-V3-style layer's forward+backward (benchmarks/bench_layer.py, ``--keep-freed-memory``).
Serving them from malloc's heap and never trimming it makes a step reuse the memory the
previous step freed, already mapped.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# From glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Makes glibc's malloc keep freed memory for reuse: no ``mmap`` for large blocks
    (``M_MMAP_MAX = 0``) and no trimming of the heap below 2 GB free (``M_TRIM_THRESHOLD``).

    Process-wide, for CPU training (device memory has its own caching allocator): the process
    then holds its peak host memory until it exits. The same as starting Python with
    ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``. Returns False, changing nothing,
    where the C library has no ``mallopt`` (not glibc).
    """
    name = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
