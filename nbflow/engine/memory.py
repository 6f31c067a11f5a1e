"""Memory: sample the kernel's RSS and hold each step to its memory budget.

``MemoryMonitor`` samples the RSS of this process and its children on a daemon
thread, naming the steps and chunks running at each sample. A step's guard
(``StepGuard``, guard.py) trips when RSS rises more than its budget above the RSS at the guard's
creation, and raises ``MemoryBudgetExceeded`` in every thread running one of
the step's wrapped chunk functions. What that promises, and what it cannot:

- An exception raised into a thread lands only between bytecodes. A loop of
  pandas calls, a growing ``pd.concat`` or a list of copies stops within about
  one sampling interval of crossing the budget; between samples the monitor
  glances at RSS every ``FINE`` seconds while a step has a budget, and once a
  step is past half of it, checks it then: a fast allocator overshoots by ~10 ms
  of its allocations rather than ~100 ms. One long C call (a giant
  ``np.ones``, ``read_csv`` of a huge file) runs to its end first: the step
  still fails as it returns, with the peak that call made. Only a separate
  process bounds that: a Dask worker with ``memory_limit`` or ``RLIMIT_AS``.
- RSS belongs to the process: steps running at once share one figure. On a
  dask.distributed cluster the figure also holds the workers outside this
  process tree (``remote``: the scheduler's view, ~0.5 s old); a step's budget
  there stops new chunks and fails the step, but cannot interrupt a task
  already running on a worker: the worker's ``memory_limit`` bounds that.
- Freed memory stays mapped until ``release_memory()``. glibc's malloc also
  keeps large freed blocks in its heaps once it has seen a few (its mmap
  threshold grows up to 32 MB), so RSS ratchets up over a step that allocates
  and frees big arrays chunk after chunk. Like Dask's nanny for its workers
  (``MALLOC_TRIM_THRESHOLD_=65536``), the monitor sets that trim threshold with
  ``mallopt`` once a step passes 80% of its budget (``TUNE_AT``; from then on
  every array over 128 kB is mapped and unmapped: 5-9% of the demo pipeline's
  wall time at 1M rows, ~30% at 10M, not worth paying while no budget is near),
  unless the environment already set one or ``NBFLOW_TUNE_MALLOC=0``; and before
  a guard trips it trims once and looks again, so memory that is free but still
  mapped never fails a step.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import psutil

from nbflow.engine.allocator import tune_allocator
from nbflow.engine.guard import StepGuard, StepMemory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemorySample:
    time: float  # epoch seconds
    rss: int  # bytes: this process plus its child processes
    steps: tuple[str, ...] = ()  # steps watched at that moment
    chunks: tuple[tuple[str, int | None], ...] = ()  # (step, chunk) running
    remote: int = 0  # bytes of it on cluster workers outside this process tree


#: seconds between the glances at RSS between two samples (not recorded as samples)
FINE = 0.01
#: the share of a step's budget past which the monitor tunes the allocator (``tune_allocator``)
TUNE_AT = 0.8


class MemoryMonitor:
    """Samples RSS every ``interval`` seconds and enforces the guards it hands out."""

    def __init__(self, interval: float = 0.1,
                 on_sample: Callable[[MemorySample], Any] | None = None,
                 *, children_refresh: float = 2.0,
                 remote: Callable[[], Mapping[str, int]] | None = None, remote_interval: float = 0.5):
        if interval <= 0:
            raise ValueError(f"interval must be positive, not {interval!r}")
        self.interval = interval
        self.on_sample = on_sample
        # Cluster workers on other machines (or outside our process tree): their memory
        # as the backend reports it (the scheduler's view, refreshed by each worker's
        # heartbeat), asked at most every ``remote_interval`` seconds.
        self._remote = remote
        self._remote_interval = remote_interval
        self._remote_at = float("-inf")
        self._remote_last: dict[str, int] = {}
        self._remote_lock = threading.Lock()
        self.samples: list[MemorySample] = []
        # Walking the process tree costs ~2 ms, one process's RSS ~30 us: find
        # the children (workers, subprocesses) once, then every few seconds.
        self._proc = psutil.Process()
        self._children: list[psutil.Process] = []
        self._children_refresh = children_refresh
        self._children_found = float("-inf")
        self._guards: list[StepGuard] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._callback_failed = False

    def rss(self) -> int:
        """Bytes resident in this process, its child processes and remote workers."""
        return self.local_rss() + sum(self.remote_rss().values())

    def remote_rss(self) -> dict[str, int]:
        """Bytes resident in each remote worker (empty without a cluster)."""
        if self._remote is None:
            return {}
        with self._remote_lock:
            now = time.monotonic()
            if now - self._remote_at >= self._remote_interval:
                self._remote_at = now
                try:
                    self._remote_last = dict(self._remote())
                except Exception:  # noqa: BLE001 — a scheduler hiccup: keep the last figures
                    log.debug("remote memory unavailable", exc_info=True)
            return dict(self._remote_last)

    def local_rss(self) -> int:
        """Bytes resident in this process and its child processes."""
        now = time.monotonic()
        if now - self._children_found >= self._children_refresh:
            self._children_found = now
            try:
                self._children = self._proc.children(recursive=True)
            except psutil.Error:
                self._children = []
        total = self._proc.memory_info().rss
        for child in self._children:
            with contextlib.suppress(psutil.Error):  # it exited since we last looked
                total += child.memory_info().rss
        return total

    def start(self) -> MemoryMonitor:
        """Take the first sample now, then keep sampling on a daemon thread."""
        if self._thread is not None:
            raise RuntimeError("this MemoryMonitor is already running")
        self._stopping.clear()
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="nbflow-memory-monitor",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling and join the thread (guards keep their entry checks)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> MemoryMonitor:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def guard(self, step: str, budget: int | None = None) -> StepGuard:
        """Watch ``step`` from now on; ``budget``: bytes allowed above the RSS now (None: only watch)."""
        guard = StepGuard(self, step, budget, baseline=self.rss())
        with self._lock:
            self._guards.append(guard)
        return guard

    def release(self, guard: StepGuard) -> StepMemory:
        """Stop watching the guard's step and return its figures."""
        with self._lock:
            if guard in self._guards:
                self._guards.remove(guard)
        with guard._lock:
            guard._released = True
        return guard.stats()

    def _loop(self) -> None:
        next_at = time.monotonic()
        while True:
            next_at += self.interval
            now = time.monotonic()
            if now > next_at + self.interval:  # C code held the GIL: don't burst to catch up
                next_at = now
            # between samples, a glance at RSS every FINE s (~30 us) while a step has a
            # budget; past half of one, the guards look too (nothing is recorded)
            while (left := next_at - time.monotonic()) > FINE:
                level = self._watch_level()  # a guard may come at any time
                if self._stopping.wait(FINE if level is not None else min(left, 5 * FINE)):
                    return
                if level is not None:
                    self._check(level)
            if self._stopping.wait(max(0.0, next_at - time.monotonic())):
                return
            self._sample()

    def _watch_level(self, share: float = 0.5) -> int | None:
        """The RSS past which some guard is over ``share`` of its budget; None: no budget to watch."""
        with self._lock:
            levels = [g.baseline + int(g.budget * share) for g in self._guards
                      if g.budget is not None and g.tripped is None and not g._released]
        return min(levels) if levels else None

    def _tune_near_budget(self, rss: int) -> None:
        """Tune the allocator (once per process) when a step is near its budget: from there
        memory that is freed but still mapped could trip it."""
        level = self._watch_level(TUNE_AT)
        if level is not None and rss >= level:
            tune_allocator()

    def _check(self, level: int) -> None:
        try:
            rss = self.local_rss() + sum(self._remote_last.values())  # the remote figure as last asked
            if rss >= level:
                self._tune_near_budget(rss)
                self._hold(self._watched(), rss, sample=False)
        except Exception:  # noqa: BLE001 — the next sample logs what is wrong
            log.debug("memory check failed", exc_info=True)

    def _watched(self) -> list[StepGuard]:
        with self._lock:
            return list(self._guards)

    @staticmethod
    def _hold(guards: list[StepGuard], rss: int, sample: bool) -> None:
        """Hold each guard to its budget at ``rss`` (re-measured once after a trim before a
        trip); ``sample``: count it as one of the step's samples."""
        for g in guards:
            g._observe(rss, confirm=True, count=sample)

    def _sample(self) -> None:
        try:
            remote = sum(self.remote_rss().values())
            rss = self.local_rss() + remote
            guards = self._watched()
            # list() of a dict is one C call under the GIL: a consistent snapshot
            chunks = tuple((g.step, c) for g in guards for c in list(g._active.values()))
            sample = MemorySample(time.time(), rss, tuple(g.step for g in guards), chunks, remote)
            self.samples.append(sample)
            self._tune_near_budget(rss)
            self._hold(guards, rss, sample=True)  # before the callback: a slow view never delays a trip
        except Exception:  # the sampler must outlive surprises; entry checks still guard
            log.exception("memory sampling failed")
            return
        if self.on_sample is not None:
            try:
                self.on_sample(sample)
            except Exception:  # in full the first time, not ten times a second
                (log.debug if self._callback_failed else log.exception)(
                    "on_sample callback failed", exc_info=True)
                self._callback_failed = True
