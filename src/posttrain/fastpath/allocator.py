"""The C allocator on CPU: keep freed memory for reuse instead of returning it to the system at once.

A training or rollout step allocates and frees the same large tensors (logit chunks, merged weights, the KV
cache) again and again. glibc serves blocks above its mmap threshold (at most 32 MB by default) with fresh
``mmap`` pages and unmaps them on free, so every step pays a page fault per 4 KB touched: on the GRPO benchmark
that was 0.7 s of a 3 s rollout. Raising the mmap and trim thresholds (what ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` do, and why Intel's PyTorch CPU guides recommend jemalloc/tcmalloc) lets those
blocks come back from the heap already mapped. Peak memory is unchanged: freed blocks are reused, not kept
in addition.

Only glibc on Linux; off with ``POSTTRAIN_MALLOC_TUNING=0``.

:func:`page_out` hands pages of a file mapping back to the kernel: a model loaded from a safetensors file in its own
dtype is a set of views of one private mapping of the file, and every page read stays resident until the last
view dies.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Iterable
from functools import cache

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MADV_PAGEOUT = 21  # Linux 5.4+
_done = False


@cache
def _libc():
    """The C library (raises OSError where there is none to load)."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def keep_freed_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = (1 << 31) - 1) -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once). Returns whether they were set."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("POSTTRAIN_MALLOC_TUNING", "1") == "0":
        return False
    try:
        mallopt = _libc().mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...): leave it
        return False
    _done = bool(mallopt(M_MMAP_THRESHOLD, int(mmap_threshold))) & bool(mallopt(M_TRIM_THRESHOLD, int(trim_threshold)))
    return _done


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's mappings of files, from /proc/self/maps."""
    spans = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                spans.append((start, end))
    return spans


def page_out(tensors: Iterable) -> int:
    """Ask the kernel to reclaim the resident pages under each tensor's storage that lies in a file mapping
    (``madvise(MADV_PAGEOUT)``): pages read from the file and never written leave the resident set and are read
    from the file again if touched; nothing is lost (a written page is swapped out or stays). Tensors in ordinary
    memory are left alone (no swapping of anonymous memory). ``tensors`` is consumed one at a time, so a generator
    may make each just before it is advised. Returns the bytes advised; 0 where the system cannot (not Linux, a
    kernel before 5.4), after consuming ``tensors`` all the same."""
    try:
        libc = _libc() if sys.platform.startswith("linux") else None
        spans = _file_mappings() if libc is not None else []
    except OSError:
        libc, spans = None, []
    page = os.sysconf("SC_PAGE_SIZE")
    advised = 0
    for t in tensors:
        storage = t.untyped_storage()
        start, size = storage.data_ptr(), storage.nbytes()
        if libc is None or not size or not any(lo <= start and start + size <= hi for lo, hi in spans):
            continue
        lo = start - start % page
        if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(start + size - lo), MADV_PAGEOUT) != 0:
            libc = None  # EINVAL: no MADV_PAGEOUT here
            continue
        advised += size
    return advised


__all__ = ["keep_freed_memory", "page_out"]
