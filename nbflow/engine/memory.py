"""Memory: sample the kernel's RSS and hold each step to its memory budget.

``MemoryMonitor`` samples the RSS of this process and its children on a daemon
thread, naming the steps and chunks running at each sample. A step's guard
trips when RSS rises more than its budget above the RSS at the guard's
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
import ctypes
import functools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import psutil

from nbflow.engine.allocator import trim_heap, tune_allocator
from nbflow.errors import MemoryBudgetExceeded

log = logging.getLogger(__name__)


# Our own prototypes, not ctypes.pythonapi's shared function object, so we
# never change argtypes under another library. PYFUNCTYPE keeps the GIL, as
# SetAsyncExc requires; None through the c_void_p one passes NULL (= clear).
_set_async_exc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.py_object)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi))
_clear_async_exc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi))


class _BudgetInterrupt(BaseException):
    """Raised asynchronously into a worker thread when its step trips.

    SetAsyncExc raises a class, not our populated instance, so the wrapper
    turns this into the guard's MemoryBudgetExceeded. A BaseException, so a
    user's ``except Exception`` or ``except MemoryError`` cannot swallow it.
    """


@dataclass(frozen=True)
class MemorySample:
    time: float  # epoch seconds
    rss: int  # bytes: this process plus its child processes
    steps: tuple[str, ...] = ()  # steps watched at that moment
    chunks: tuple[tuple[str, int | None], ...] = ()  # (step, chunk) running
    remote: int = 0  # bytes of it on cluster workers outside this process tree


@dataclass(frozen=True)
class StepMemory:
    """What one step did to memory, from its guard's creation to its release."""

    step: str
    budget: int | None
    baseline: int  # RSS when the guard was created
    peak: int  # highest RSS seen while watched
    peak_above_baseline: int
    at_failure: int | None  # RSS when the budget tripped or a MemoryError was raised
    samples: int  # sampler samples taken while watched
    tripped: bool


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


class StepGuard:
    """The memory budget of one step, enforced inside the step's wrapped calls."""

    def __init__(self, monitor: MemoryMonitor, step: str, budget: int | None, baseline: int):
        self.step = step
        self.budget = budget
        self.baseline = baseline
        self.records_done = 0  # the executor's progress, quoted in the error
        #: the populated exception once the step tripped, else None
        self.tripped: MemoryBudgetExceeded | None = None
        self._monitor = monitor
        # A C-level lock, only ever taken as `with self._lock`: an interrupt
        # pending when a worker takes it can only land inside the block, so
        # the lock is released. (Condition.__enter__ is Python code: landing
        # there would leave the lock held and hang the sampler.)
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._active: dict[int, int | None] = {}  # thread ident -> the chunk it runs
        self._interrupted: set[int] = set()  # threads we raised into
        self._peak = baseline
        self._samples = 0
        self._at_failure: int | None = None
        self._released = False
        self._confirmed = float("-inf")  # when a crossing was last re-checked after a trim

    def add_records(self, n: int) -> None:
        """Count ``n`` more records done; thread-safe, unlike ``records_done += n``."""
        with self._lock:
            self.records_done += n

    def stats(self) -> StepMemory:
        with self._lock:
            return StepMemory(self.step, self.budget, self.baseline, self._peak,
                              self._peak - self.baseline, self._at_failure, self._samples,
                              self.tripped is not None)

    def wrap(self, fn: Callable, chunk: int | None = None) -> GuardedCall:
        """``fn`` run under this step's budget; ``chunk`` names it in samples and errors."""
        return GuardedCall(self, fn, chunk)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no thread is in a wrapped call (Dask raises the first
        failure while other chunks still unwind); True if none is."""
        with self._lock:
            return self._idle.wait_for(lambda: not self._active, timeout)

    def _observe(self, rss: int, *, confirm: bool = False, count: bool = False) -> None:
        """Note ``rss``; trip if it is over the budget (``confirm``: only if still over after
        a heap trim, at most once a second); ``count``: it was one of the monitor's samples."""
        with self._lock:
            if self._released:
                return
            self._samples += count
            self._peak = max(self._peak, rss)
            over = self.budget is not None and rss - self.baseline > self.budget
            if over and self.tripped is None and confirm:
                # free-but-mapped heap pages are not the step's memory: trim, look again
                now = time.monotonic()
                if now - self._confirmed >= 1.0:
                    self._confirmed = now
                    trim_heap()
                    rss = self._monitor.rss()
                    over = rss - self.baseline > self.budget
            if over and self.tripped is None:
                self._trip(rss)

    def _trip(self, rss: int) -> None:
        # the caller holds self._lock: no thread enters or leaves meanwhile
        chunks = sorted(c for c in self._active.values() if c is not None)
        self._at_failure = rss
        self.tripped = MemoryBudgetExceeded(self.step, self.budget, self._peak - self.baseline,
                                            rss - self.baseline, self.records_done,
                                            chunks[0] if chunks else None)
        for ident in self._active:
            # only threads inside our wrapped calls: an idle pool thread
            # would die of it, and Dask would wait for it forever
            _set_async_exc(ident, _BudgetInterrupt)
            self._interrupted.add(ident)

    def _error_for(self, chunk: int | None) -> MemoryBudgetExceeded:
        # a fresh instance per raise: one instance raised in several threads
        # would share, and overwrite, one __traceback__
        e = self.tripped
        assert e is not None
        with self._lock:
            peak = self._peak - self.baseline
        return MemoryBudgetExceeded(e.step, e.budget, peak, e.at_failure, e.records_done,
                                    e.chunk if chunk is None else chunk)

    def _enter(self, ident: int, chunk: int | None) -> None:
        # the entry check runs before registering, so its trip never targets us
        if self.tripped is None and not self._released:
            self._observe(self._monitor.rss())
        with self._lock:
            if self.tripped is not None:
                raise self._error_for(None)  # no new chunk starts once tripped
            self._active[ident] = chunk

    def _leave(self, ident: int) -> None:
        # Under the lock the sampler can't target us, and once out of _active
        # it never will: clearing here keeps a pending interrupt from firing
        # later in unrelated code of this pool thread.
        with self._lock:
            if ident in self._interrupted:
                _clear_async_exc(ident, None)
                self._interrupted.discard(ident)
            self._active.pop(ident, None)
            if not self._active:
                self._idle.notify_all()

    def _call(self, fn: Callable, chunk: int | None, args: tuple, kwargs: dict) -> Any:
        ident = threading.get_ident()
        if ident in self._active:  # nested in our own wrapped call, which guards it
            return fn(*args, **kwargs)
        try:
            result = self._run(fn, chunk, ident, args, kwargs)
        except _BudgetInterrupt as interrupt:
            self._leave(ident)  # it may have landed before _run's own cleanup
            # the memory is still held here: the truest peak, which samples
            # miss when one C call allocated it all since the last one
            self._observe(self._monitor.rss())
            tb = interrupt.__traceback__
            # free the interrupted code's locals (the memory that tripped us)
            # but keep the traceback, so the error points at the user's line
            _clear_frames(tb)
            raise self._error_for(chunk).with_traceback(tb.tb_next) from None
        if self.tripped is not None:
            # it ran while the step tripped, or swallowed the interrupt:
            # a tripped step never hands out a result
            raise self._error_for(chunk)
        return result

    def _run(self, fn: Callable, chunk: int | None, ident: int, args: tuple, kwargs: dict) -> Any:
        self._enter(ident, chunk)
        try:
            return fn(*args, **kwargs)
        except MemoryError as err:
            if not isinstance(err, MemoryBudgetExceeded):  # the allocator said no
                rss = self._monitor.rss()
                self._observe(rss)
                with self._lock:
                    if self._at_failure is None:
                        self._at_failure = rss
                _clear_frames(err.__traceback__)
            raise
        finally:
            self._leave(ident)


class GuardedCall:
    """A chunk function run under a step's guard (what ``StepGuard.wrap`` returns)."""

    def __init__(self, guard: StepGuard, fn: Callable, chunk: int | None = None):
        functools.update_wrapper(self, fn)
        self.guard = guard
        self.fn = fn
        self.chunk = chunk

    def __call__(self, *args, **kwargs):
        return self.guard._call(self.fn, self.chunk, args, kwargs)

    def __dask_tokenize__(self):  # else dask pickles the guard, its locks, all samples
        return ("nbflow-guarded", id(self.guard), self.guard.step, self.chunk, id(self.fn))

    def __reduce__(self):
        raise TypeError("a memory guard watches threads of the process that created it and "
                        "cannot be sent to another process; on a cluster, bound memory with "
                        "the workers' memory_limit instead")


class _Settle(BaseException):
    pass


def reset_async_signal() -> None:
    """Reset the interpreter's "async exception pending" signal after a trip.

    Withdrawing an interrupt that did not land (SetAsyncExc(thread, NULL)) leaves
    that signal set: every thread then takes the slow path at each eval check, and
    on Python 3.11 a trace or profile function (pdb, coverage) loops forever.
    Delivering one exception to this thread, and catching it, clears it.
    """
    try:
        _set_async_exc(threading.get_ident(), _Settle)
        for _ in range(100):  # lands at the first check of the eval breaker
            pass
    except _Settle:
        pass


def _clear_frames(tb) -> None:
    # frame.clear() refuses frames still executing (ours); the rest are done
    while tb is not None:
        try:
            tb.tb_frame.clear()
        except RuntimeError:
            pass
        tb = tb.tb_next
