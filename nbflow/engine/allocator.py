"""Handing freed memory back to the OS, so RSS follows what is alive.

glibc keeps freed heap pages mapped until asked (``malloc_trim``) and, once it has
seen large blocks freed, keeps those too (its mmap threshold grows up to 32 MB);
pandas 3 keeps strings in Arrow's own pool. A step's budget is measured in RSS, so
the monitor tunes the allocator once a step passes 80% of its budget
(``tune_allocator``, like Dask's nanny does for its workers) and trims before it
trips a step or after one failed.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import os
import sys
from dataclasses import dataclass
from typing import Callable

import psutil


@dataclass(frozen=True)
class Released:
    before: int  # RSS of this process before release_memory(), and after
    after: int

    @property
    def freed(self) -> int:
        return self.before - self.after


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: musl, macOS, Windows
        return None


def release_memory() -> Released:
    """Return freed memory to the OS after a failed step (after ``guard.wait_idle()``:
    objects are only freed once nothing holds them)."""
    proc = psutil.Process()
    before = proc.memory_info().rss
    gc.collect()
    trim_heap()
    return Released(before, proc.memory_info().rss)


def trim_heap() -> None:
    """Hand free-but-mapped heap pages back to the OS (glibc's arenas, Arrow's pool)."""
    pyarrow = sys.modules.get("pyarrow")  # pandas 3 keeps strings in Arrow's own pool
    if pyarrow is not None:
        with contextlib.suppress(Exception):
            pyarrow.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)  # glibc keeps freed arena pages mapped until asked


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers


@functools.lru_cache(maxsize=1)
def tune_allocator() -> bool:
    """Once per process: give large freed blocks back to the OS at once (True if set).

    Sets glibc's trim threshold to 64 kB and its mmap threshold to 128 kB, so NumPy
    buffers and Arrow arrays are unmapped when freed, and RSS follows what is alive
    instead of what was ever allocated (each large array then costs an mmap and its
    page faults). Dask's nanny does the same for its workers; the monitor calls this
    once a step passes 80% of its budget. Skipped when ``MALLOC_TRIM_THRESHOLD_`` is
    set (the user chose) or ``NBFLOW_TUNE_MALLOC=0``; a no-op off glibc.
    """
    if os.environ.get("NBFLOW_TUNE_MALLOC", "1").lower() in ("0", "false", "no", "off"):
        return False
    if "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # the mmap threshold is set too: by the time a step nears its budget, glibc may have
    # raised it (up to 32 MB) after big blocks were freed, and setting the trim threshold
    # would freeze it there
    return bool(mallopt(_M_TRIM_THRESHOLD, 64 * 1024)) and bool(mallopt(_M_MMAP_THRESHOLD, 128 * 1024))


__all__ = ["Released", "release_memory", "trim_heap", "tune_allocator"]
