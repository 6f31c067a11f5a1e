"""How a step's progress and failure are reported: shared by steps run alone and in a pass."""
from __future__ import annotations

import json
import logging
import threading
import time

from nbflow import diagnose
from nbflow import events as ev
from nbflow.errors import MemoryBudgetExceeded, StepError
from nbflow.tracebacks import format_exception, user_frame

log = logging.getLogger(__name__)


class StepFailed(Exception):
    """Internal: a step failed for good (its events are already emitted)."""


class Progress:
    """A step's chunks and records done so far (chunks land from several threads)."""

    def __init__(self):
        self.done = 0
        self.total = 0
        self.records = 0
        self._lock = threading.Lock()

    def add(self, records: int) -> None:
        with self._lock:
            self.done += 1
            self.records += records


def explained(planned, exc: BaseException, workdir) -> BaseException:
    """``exc`` as the step's action explains it (its clearer error, caused by ``exc``), else itself."""
    explain = planned.action.explain
    try:
        better = explain(exc, planned.params, workdir) if explain is not None else None
    except Exception:  # noqa: BLE001 — an explanation is a nicety; the error stands as raised
        log.debug("could not explain %r", exc, exc_info=True)
        better = None
    if better is None:
        return exc
    better.__cause__ = exc
    return better


def failure_event(run_id: str, step: str, exc: BaseException, started: float, attempt: int,
                   will_retry: bool, records_done: int, memory: dict) -> ev.StepFailed:
    frame = user_frame(exc)
    details = dict(getattr(exc, "details", {}) or {}) if isinstance(exc, StepError) else {}
    if isinstance(exc, MemoryBudgetExceeded):
        details.update({"budget": exc.budget, "peak": exc.peak, "at_failure": exc.at_failure,
                        "records_done": exc.records_done, "chunk": exc.chunk})
        records_done = max(records_done, exc.records_done)
    if memory:
        details["memory"] = memory
    try:
        # only the live exception has the frames' locals: the diagnosis reads this later
        details["evidence"] = diagnose.evidence(exc)
    except Exception:  # noqa: BLE001 — evidence is a nicety; the failure is reported regardless
        log.debug("could not take evidence from %r", exc, exc_info=True)
    return ev.StepFailed(
        run_id=run_id, step=step, error_type=type(exc).__name__, message=str(exc),
        location=frame.where if frame else None, source_line=frame.source if frame else None,
        traceback=format_exception(exc), duration=time.time() - started, attempt=attempt,
        will_retry=will_retry, records_done=records_done, details=jsonable(details))


def jsonable(data: dict) -> dict:

    return json.loads(json.dumps(data, default=str))


__all__ = ["Progress", "StepFailed", "explained", "failure_event", "jsonable"]
