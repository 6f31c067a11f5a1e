"""A step's memory budget, enforced inside the step's own chunk calls.

``MemoryMonitor.guard`` (memory.py) hands out a ``StepGuard`` per step and feeds it
RSS readings; the executor runs each chunk function through ``guard.wrap``. When
RSS rises more than the budget above the guard's baseline, the guard raises
``MemoryBudgetExceeded`` into every thread inside one of its wrapped calls (with
``PyThreadState_SetAsyncExc``: it lands between bytecodes, so one long C call
finishes first), no new chunk of the step starts, and the error carries the
peak, the records done and the chunk that was running.
"""
from __future__ import annotations

import ctypes
import functools
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from nbflow.engine.allocator import trim_heap
from nbflow.errors import MemoryBudgetExceeded

if TYPE_CHECKING:
    from nbflow.engine.memory import MemoryMonitor


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
