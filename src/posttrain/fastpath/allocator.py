"""The C allocator on CPU: keep freed memory for reuse instead of returning it to the system at once.

A training or rollout step allocates and frees the same large tensors (logit chunks, merged weights, the KV
cache) again and again. glibc serves blocks above its mmap threshold (at most 32 MB by default) with fresh
``mmap`` pages and unmaps them on free, so every step pays a page fault per 4 KB touched: on the GRPO benchmark
that was 0.7 s of a 3 s rollout. Raising the mmap and trim thresholds (what ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` do, and why Intel's PyTorch CPU guides recommend jemalloc/tcmalloc) lets those
blocks come back from the heap already mapped. Peak memory is unchanged: freed blocks are reused, not kept
in addition.

Only glibc on Linux; off with ``POSTTRAIN_MALLOC_TUNING=0``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
_done = False


def keep_freed_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = (1 << 31) - 1) -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once). Returns whether they were set."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("POSTTRAIN_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...): leave it
        return False
    _done = bool(mallopt(M_MMAP_THRESHOLD, int(mmap_threshold))) & bool(mallopt(M_TRIM_THRESHOLD, int(trim_threshold)))
    return _done


__all__ = ["keep_freed_memory"]
