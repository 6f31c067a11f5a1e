"""Memory: sample the kernel's RSS and hold each step to its memory budget.

A ``MemoryMonitor`` samples the resident memory of this process and its child
processes on a daemon thread and names the steps and chunks running at each
sample. ``monitor.guard(step, budget)`` watches one step: when RSS rises more
than ``budget`` above the RSS at the guard's creation, the guard trips and
raises ``MemoryBudgetExceeded`` inside every worker thread that is running one
of the step's wrapped chunk functions (``guard.wrap(fn, chunk=i)``).

What the in-process guard promises, and what it cannot:

- An exception raised into a thread lands only between Python bytecodes. A
  loop of pandas calls, a growing ``pd.concat`` or a list of copies stops
  within about one sampling interval of crossing the budget. One long C-level
  call (a single giant ``np.ones``, ``read_csv`` of a huge file) finishes
  first; the step still fails right after it returns, but its peak is
  whatever that call allocated. Only a separate process bounds that: a Dask
  worker with ``memory_limit`` (its nanny kills at 95%) or a subprocess with
  ``RLIMIT_AS``.
- RSS is per process, so steps running at the same time share one figure:
  each guard compares the whole process against its own baseline.
- Memory freed by the failed step is not returned to the OS by itself; call
  ``release_memory()`` once the exception (and its traceback) is handled.
"""
from __future__ import annotations

import ctypes
import functools
import gc
import logging
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import psutil

from nbflow.errors import MemoryBudgetExceeded
from nbflow.units import format_size

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
# cgroup v1 writes "no limit" as LONG_MAX rounded down to a page
_UNLIMITED = 1 << 60
MIN_CHUNK, MAX_CHUNK = 1_000, 1_000_000

# Our own prototypes rather than ctypes.pythonapi's shared function object, so
# we never change argtypes under another library. PYFUNCTYPE keeps the GIL,
# which SetAsyncExc requires. Passing None through the c_void_p prototype
# gives NULL, which clears a pending exception.
_set_async_exc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.py_object)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi))
_clear_async_exc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi))


class _BudgetInterrupt(BaseException):
    """Raised asynchronously into a worker thread when its step trips.

    SetAsyncExc can only raise a class, so the wrapper turns this into the
    guard's populated MemoryBudgetExceeded. It derives from BaseException so
    a user's ``except Exception`` or ``except MemoryError`` cannot swallow it.
    """


@dataclass(frozen=True)
class MemorySample:
    time: float  # epoch seconds
    rss: int  # bytes: this process plus its child processes
    steps: tuple[str, ...] = ()  # steps watched at that moment
    chunks: tuple[tuple[str, int | None], ...] = ()  # (step, chunk) running


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


@dataclass(frozen=True)
class Released:
    """RSS of this process before and after ``release_memory()``."""

    before: int
    after: int

    @property
    def freed(self) -> int:
        return self.before - self.after


class _ProcessTree:
    """RSS of this process and its children (workers, subprocesses).

    Walking the tree costs ~2 ms, reading one process's RSS ~30 us, so the
    children are found once and then only every ``refresh`` seconds.
    """

    def __init__(self, refresh: float = 2.0):
        self.refresh = refresh
        self._proc = psutil.Process()
        self._children: list[psutil.Process] = []
        self._found_at = float("-inf")

    def rss(self) -> int:
        now = time.monotonic()
        if now - self._found_at >= self.refresh:
            self._found_at = now
            try:
                self._children = self._proc.children(recursive=True)
            except psutil.Error:
                self._children = []
        total = self._proc.memory_info().rss
        for child in self._children:
            try:
                total += child.memory_info().rss
            except psutil.Error:  # exited since we last looked
                pass
        return total


class MemoryMonitor:
    """Samples RSS every ``interval`` seconds and enforces the guards it hands out."""

    def __init__(self, interval: float = 0.1,
                 on_sample: Callable[[MemorySample], Any] | None = None,
                 *, children_refresh: float = 2.0):
        if interval <= 0:
            raise ValueError(f"interval must be positive, not {interval!r}")
        self.interval = interval
        self.on_sample = on_sample
        self.samples: list[MemorySample] = []
        self._tree = _ProcessTree(children_refresh)
        self._guards: list[StepGuard] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._callback_failed = False

    def rss(self) -> int:
        return self._tree.rss()

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
        """Stop sampling and join the thread; guards keep working without it."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> MemoryMonitor:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def guard(self, step: str, budget: int | None = None) -> StepGuard:
        """Watch ``step`` from now on; ``budget`` is bytes above the current RSS (None: watch only)."""
        guard = StepGuard(self, step, budget, baseline=self.rss())
        with self._lock:
            self._guards.append(guard)
        return guard

    def release(self, guard: StepGuard) -> StepMemory:
        """Stop watching the guard's step and return its figures."""
        with self._lock:
            if guard in self._guards:
                self._guards.remove(guard)
        with guard._cond:
            guard._released = True
        return guard.stats()

    def _loop(self) -> None:
        next_at = time.monotonic()
        while True:
            next_at += self.interval
            now = time.monotonic()
            if now > next_at + self.interval:
                # we fell behind (C code held the GIL): sample now, don't burst to catch up
                next_at = now
            if self._stopping.wait(max(0.0, next_at - now)):
                return
            self._sample()

    def _sample(self) -> None:
        try:
            rss = self._tree.rss()
            with self._lock:
                guards = list(self._guards)
            chunks = tuple(item for g in guards for item in g._running())
            sample = MemorySample(time.time(), rss, tuple(g.step for g in guards), chunks)
            self.samples.append(sample)
            for g in guards:  # before the callback, so a slow view never delays a trip
                g._observe(rss, sampled=True)
        except Exception:  # the sampler must outlive any surprise; the guards' entry checks remain
            log.exception("memory sampling failed")
            return
        if self.on_sample is not None:
            try:
                self.on_sample(sample)
            except Exception:
                # log the first failure in full, not ten a second
                (log.debug if self._callback_failed else log.exception)(
                    "on_sample callback failed", exc_info=True)
                self._callback_failed = True


class StepGuard:
    """The memory budget of one step, enforced inside the step's wrapped calls."""

    def __init__(self, monitor: MemoryMonitor, step: str, budget: int | None, baseline: int):
        self.step = step
        self.budget = budget
        self.baseline = baseline
        #: the populated exception once the step tripped
        self.error: MemoryBudgetExceeded | None = None
        self._monitor = monitor
        # one condition guards everything below; its RLock lets a trip happen
        # from inside an entry check that already holds it
        self._cond = threading.Condition()
        self._active: dict[int, int | None] = {}  # thread ident -> chunk it runs
        self._interrupted: set[int] = set()  # threads we raised into
        self._peak = baseline
        self._samples = 0
        self._at_failure: int | None = None
        self._records = 0
        self._released = False

    @property
    def tripped(self) -> MemoryBudgetExceeded | None:
        return self.error

    @property
    def records_done(self) -> int:
        return self._records

    @records_done.setter
    def records_done(self, value: int) -> None:
        with self._cond:
            self._records = value

    def add_records(self, n: int) -> None:
        """Count ``n`` more records done (thread-safe, unlike ``records_done += n``)."""
        with self._cond:
            self._records += n

    def stats(self) -> StepMemory:
        with self._cond:
            return StepMemory(self.step, self.budget, self.baseline, self._peak,
                              self._peak - self.baseline, self._at_failure, self._samples,
                              self.error is not None)

    def wrap(self, fn: Callable, chunk: int | None = None) -> Callable:
        """``fn`` guarded by this step's budget; ``chunk`` names it in samples and errors."""
        return GuardedCall(self, fn, chunk)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no thread is inside a wrapped call (Dask raises the first
        failure while other chunks may still be unwinding); True if idle."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._active, timeout)

    def _running(self) -> list[tuple[str, int | None]]:
        with self._cond:
            return [(self.step, chunk) for chunk in self._active.values()]

    def _observe(self, rss: int, sampled: bool = False) -> None:
        with self._cond:
            if self._released:
                return
            self._samples += sampled
            self._peak = max(self._peak, rss)
            if (self.error is None and self.budget is not None
                    and rss - self.baseline > self.budget):
                self._trip(rss)

    def _trip(self, rss: int) -> None:
        # caller holds self._cond, so no thread can enter or leave meanwhile
        chunks = sorted(c for c in self._active.values() if c is not None)
        self._at_failure = rss
        self.error = MemoryBudgetExceeded(self.step, self.budget, self._peak - self.baseline,
                                          rss - self.baseline, self._records,
                                          chunks[0] if chunks else None)
        for ident in self._active:
            # only threads inside our wrapped calls: an idle pool thread
            # would die of it and Dask would wait for it forever
            _set_async_exc(ident, _BudgetInterrupt)
            self._interrupted.add(ident)
        log.debug("step %r tripped at %s above baseline", self.step, format_size(rss - self.baseline))

    def _error_for(self, chunk: int | None) -> MemoryBudgetExceeded:
        # a fresh instance per raise: one instance raised in several threads
        # would share (and overwrite) one __traceback__
        e = self.error
        assert e is not None
        return MemoryBudgetExceeded(e.step, e.budget, e.peak, e.at_failure, e.records_done,
                                    e.chunk if chunk is None else chunk)

    def _enter(self, ident: int, chunk: int | None) -> None:
        # check before registering, so a trip from here never targets this thread
        if self.error is None and not self._released:
            self._observe(self._monitor.rss())
        with self._cond:
            if self.error is not None:
                raise self._error_for(None)  # no new chunk starts once tripped
            self._active[ident] = chunk

    def _leave(self, ident: int) -> None:
        # Under the lock the sampler cannot target us, and once we are out of
        # _active it never will: clearing here means a pending exception can't
        # fire later in unrelated code of this (pool) thread.
        with self._cond:
            if ident in self._interrupted:
                _clear_async_exc(ident, None)
                self._interrupted.discard(ident)
            self._active.pop(ident, None)
            if not self._active:
                self._cond.notify_all()

    def _record_failure(self) -> None:
        rss = self._monitor.rss()
        with self._cond:
            self._peak = max(self._peak, rss)
            if self._at_failure is None:
                self._at_failure = rss

    def _call(self, fn: Callable, chunk: int | None, args: tuple, kwargs: dict) -> Any:
        ident = threading.get_ident()
        if ident in self._active:  # nested in our own wrapped call: the outer call guards it
            return fn(*args, **kwargs)
        try:
            result = self._run(fn, chunk, ident, args, kwargs)
        except _BudgetInterrupt as interrupt:
            self._leave(ident)  # the interrupt may have landed before _run's own cleanup
            tb = interrupt.__traceback__
            # free the interrupted code's locals (the memory that tripped us)
            # but keep the traceback, so the error points at the user's line
            _clear_frames(tb)
            raise self._error_for(chunk).with_traceback(tb.tb_next) from None
        if self.error is not None:
            # the chunk ran while the step tripped (or swallowed the
            # interrupt): a tripped step never hands out a result
            raise self._error_for(chunk)
        return result

    def _run(self, fn: Callable, chunk: int | None, ident: int, args: tuple, kwargs: dict) -> Any:
        self._enter(ident, chunk)
        try:
            return fn(*args, **kwargs)
        except MemoryError as err:
            if not isinstance(err, MemoryBudgetExceeded):
                self._record_failure()  # a real allocation failure: record it, let it propagate
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

    def __dask_tokenize__(self):
        # without this, dask would try to pickle the guard (locks, the monitor's samples)
        return ("nbflow-guarded", id(self.guard), self.guard.step, self.chunk, id(self.fn))

    def __reduce__(self):
        raise TypeError("a memory guard watches threads of the process that created it and "
                        "cannot be sent to another process; on a cluster, bound memory with "
                        "the workers' memory_limit instead")

    def __repr__(self) -> str:
        return f"<guarded {getattr(self.fn, '__qualname__', self.fn)!r} step={self.guard.step!r} chunk={self.chunk}>"


def _clear_frames(tb) -> None:
    # frame.clear() refuses frames still executing (ours); the rest are finished
    while tb is not None:
        try:
            tb.tb_frame.clear()
        except RuntimeError:
            pass
        tb = tb.tb_next


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return None


def release_memory() -> Released:
    """Give freed memory back to the OS after a failed step; returns RSS before and after.

    The step's objects are only freed once nothing holds them: drop the
    exception (or ``traceback.clear_frames`` its traceback) first.
    """
    proc = psutil.Process()
    before = proc.memory_info().rss
    gc.collect()
    pyarrow = sys.modules.get("pyarrow")  # pandas 3 keeps strings in Arrow's own pool
    if pyarrow is not None:
        try:
            pyarrow.default_memory_pool().release_unused()
        except Exception:
            pass
    trim = _malloc_trim()
    if trim is not None:
        trim(0)  # glibc keeps freed arena pages mapped; 0 = keep no padding
    return Released(before, proc.memory_info().rss)


# -- how much memory a step may use by default --------------------------------

def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (v2) means no limit


def _read_stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def _cgroup(root: Path) -> tuple[int, int, str] | None:
    """(limit, usage, version) of the cgroup we run in, or None without a limit.

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
    """The memory limit in force and where it comes from: "cgroup v2", "cgroup v1" or "host RAM"."""
    host = psutil.virtual_memory().total
    cgroup = _cgroup(cgroup_root)
    if cgroup is not None and cgroup[0] < host:
        return cgroup[0], cgroup[2]
    return host, "host RAM"


def available_memory(cgroup_root: Path = CGROUP_ROOT) -> int:
    """Bytes this process can still take: the smaller of the cgroup's headroom and the host's."""
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
    """The log line, e.g. "memory budget: 512 MB per step (50% of 1 GB available of the 2 GB cgroup v2 limit)"."""
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

    Model: parallel x chunk x bytes_per_record x overhead <= target x budget.

    ``bytes_per_record`` is the in-memory pandas size of the first chunk's
    *output* (``df.memory_usage(deep=True).sum() / len(df)``): it is exact,
    free, and the same whatever else runs, whereas RSS growth over one chunk
    is blurred by other steps and chunks in flight, by allocator reuse and by
    a 100 ms sampler that misses a short chunk's peak. ``overhead`` covers
    what a transform holds beside its output (its input, temporaries, copies):
    3 suits a typical clean/derive step; learn it from a past run as
    ``peak_above_baseline / (parallel x chunk x bytes_per_record)``.
    ``target`` leaves headroom like Dask workers' 60% target.

    >>> auto_chunk_size(512_000_000, 470)
    108936
    """
    if budget <= 0 or bytes_per_record <= 0:
        raise ValueError("budget and bytes_per_record must be positive")
    size = int(target * budget / (max(parallel, 1) * bytes_per_record * overhead))
    return min(max(size, MIN_CHUNK), MAX_CHUNK)
