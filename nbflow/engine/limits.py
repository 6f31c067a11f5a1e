"""How much memory a step may use: the default budget (cgroup limit or host RAM) and
``chunk_size: auto``."""
from __future__ import annotations

from pathlib import Path

import psutil

from nbflow.units import format_size

CGROUP_ROOT = Path("/sys/fs/cgroup")
_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as LONG_MAX rounded to a page
MIN_CHUNK, MAX_CHUNK = 1_000, 1_000_000


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (v2) means no limit


def _read_stat(path: Path, key: str) -> int:
    try:
        stat = dict(line.split(" ", 1) for line in path.read_text().splitlines() if " " in line)
    except OSError:
        return 0
    return int(stat[key]) if stat.get(key, "").strip().isdigit() else 0


def _cgroup(root: Path) -> tuple[int, int, str] | None:
    """(limit, usage, version) of our cgroup, or None if it sets no limit.

    Usage leaves out inactive page cache, which the kernel reclaims before
    it OOM-kills (docker stats and the kubelet count it the same way).
    """
    limit = _read_int(root / "memory.max")
    if limit is not None:
        usage = _read_int(root / "memory.current") or 0
        return limit, usage - _read_stat(root / "memory.stat", "inactive_file"), "cgroup v2"
    v1 = root / "memory"
    limit = _read_int(v1 / "memory.limit_in_bytes")
    if limit is not None and limit < _UNLIMITED:
        usage = _read_int(v1 / "memory.usage_in_bytes") or 0
        return limit, usage - _read_stat(v1 / "memory.stat", "total_inactive_file"), "cgroup v1"
    return None


def memory_limit(cgroup_root: Path = CGROUP_ROOT) -> tuple[int, str]:
    """The memory limit in force and its source: "cgroup v2", "cgroup v1" or "host RAM"."""
    host = psutil.virtual_memory().total
    cgroup = _cgroup(cgroup_root)
    if cgroup is not None and cgroup[0] < host:
        return cgroup[0], cgroup[2]
    return host, "host RAM"


def available_memory(cgroup_root: Path = CGROUP_ROOT) -> int:
    """Bytes this process can still take: the smaller of its cgroup's headroom and the host's."""
    available = psutil.virtual_memory().available
    cgroup = _cgroup(cgroup_root)
    if cgroup is not None:
        limit, usage, _ = cgroup
        available = min(available, limit - max(usage, 0))
    return max(available, 0)


def default_budget(fraction: float = 0.5, cgroup_root: Path = CGROUP_ROOT) -> int:
    """A step's budget when it sets no ``max_memory``: ``fraction`` of the available memory."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], not {fraction!r}")
    return int(available_memory(cgroup_root) * fraction)


def describe_default_budget(fraction: float = 0.5, cgroup_root: Path = CGROUP_ROOT) -> str:
    """The log line: "memory budget: 512 MB per step (50% of 1 GB available of the 2 GB cgroup v2 limit)"."""
    budget = default_budget(fraction, cgroup_root)
    limit, source = memory_limit(cgroup_root)
    available = available_memory(cgroup_root)
    of = f"{format_size(limit)} {source}" + (" limit" if source != "host RAM" else "")
    if available < limit:
        of = f"{format_size(available)} available of the {of}"
    return f"memory budget: {format_size(budget)} per step ({fraction:.0%} of {of})"


def auto_chunk_size(budget: int, bytes_per_record: float, parallel: int = 2,
                    target: float = 0.6, overhead: float = 3.0) -> int:
    """Records per chunk so that ``parallel`` chunks in flight stay within ``target`` of the budget.

    Model: parallel x chunk x bytes_per_record x overhead <= target x budget,
    clamped to [1,000, 1,000,000] records.

    ``bytes_per_record`` is the in-memory pandas size of the first chunk's
    *output* (``df.memory_usage(deep=True).sum() / len(df)``): exact, free,
    and the same whatever else runs, whereas RSS growth over one chunk is
    blurred by other chunks and steps in flight, by allocator reuse, and by a
    100 ms sampler that misses a short chunk's peak. ``overhead`` is what a
    transform holds beside its output (its input, temporaries, copies): 3
    suits a clean/derive step; learn it from a run's guard as
    ``peak_above_baseline / (parallel x chunk x bytes_per_record)``.
    ``target`` leaves headroom, like Dask workers' 60% target.

    >>> auto_chunk_size(512_000_000, 470)
    108936
    """
    if budget <= 0 or bytes_per_record <= 0:
        raise ValueError("budget and bytes_per_record must be positive")
    size = int(target * budget / (max(parallel, 1) * bytes_per_record * overhead))
    return min(max(size, MIN_CHUNK), MAX_CHUNK)
