"""Step and run records, folded from events.

Records are plain data; every view (log, widget, CLI, report) reads them.
``RunState.apply`` is the single place that turns an event into a record
change, so a live run and a run replayed from events.jsonl agree.
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

from nbflow import events as ev


class Status(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"
    REUSED = "reused"

    @property
    def done(self) -> bool:
        """The step produced a usable output (this attempt or an earlier one)."""
        return self in (Status.COMPLETED, Status.REUSED)

    @property
    def final(self) -> bool:
        return self not in (Status.PENDING, Status.RUNNING)


#: the transitions a step may take within one attempt; a new attempt resets to PENDING
TRANSITIONS = {
    Status.PENDING: {Status.RUNNING, Status.SKIPPED, Status.REUSED, Status.CANCELLED},
    # running -> skipped: a step fused into one pass with the step before it started with
    # it, and that step failed (nbflow/engine/fusion.py)
    Status.RUNNING: {Status.RUNNING, Status.COMPLETED, Status.FAILED, Status.CANCELLED, Status.SKIPPED},
    Status.COMPLETED: set(),
    Status.FAILED: set(),
    Status.CANCELLED: set(),
    Status.SKIPPED: set(),
    Status.REUSED: set(),
}


@dataclass(frozen=True)
class StepRecord:
    name: str
    status: Status = Status.PENDING
    started: float | None = None
    ended: float | None = None
    attempt: int = 0
    records_in: int | None = None
    records_out: int | None = None
    records_done: int = 0
    chunks_done: int = 0
    chunks_total: int | None = None
    chunk_size: int | None = None
    max_memory: int | None = None
    streaming: bool | None = None
    bytes_out: int | None = None
    checkpoint: str | None = None
    cache_key: str | None = None
    error: dict | None = None  # error_type, message, location, source_line, traceback, details
    skipped_reason: str | None = None
    because_of: str | None = None
    info: dict = field(default_factory=dict)
    root_cause: dict | None = None  # RootCause.to_dict() of a failed or interrupted step

    @property
    def duration(self) -> float | None:
        if self.started is None or self.ended is None:
            return None
        return self.ended - self.started

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["status"] = self.status.value
        data["duration"] = self.duration
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["status"] = Status(kwargs.get("status", "pending"))
        return cls(**kwargs)


class RunState:
    """The records of one run, kept current by ``apply(event)``."""

    def __init__(self, run_id: str, workflow: str, steps: tuple[str, ...] | list[str]):
        self.run_id = run_id
        self.workflow = workflow
        self.steps: dict[str, StepRecord] = {name: StepRecord(name) for name in steps}
        self.status = "pending"
        self.attempt = 0
        self.started: float | None = None
        self.ended: float | None = None
        self.reused: tuple[str, ...] = ()
        self.default_budget: int | None = None
        self.backend: str | None = None

    def _set(self, name: str, **changes) -> None:
        record = self.steps.get(name) or StepRecord(name)
        new_status = changes.get("status")
        if new_status is not None and new_status not in TRANSITIONS[record.status] | {record.status}:
            raise ValueError(f"step '{name}': {record.status.value} → {new_status.value} is not a valid transition")
        self.steps[name] = dataclasses.replace(record, **changes)

    def apply(self, event: ev.Event) -> None:
        if isinstance(event, ev.RunStarted):
            self.attempt = event.attempt
            self.status = "running"
            self.started = event.time if self.started is None else self.started
            self.ended = None
            self.reused = event.reused
            self.default_budget = event.default_budget
            self.backend = event.backend
            steps = {}
            for name in event.steps:
                old = self.steps.get(name)
                if old is None or name in event.to_run:
                    steps[name] = StepRecord(name)  # it runs again: a fresh record
                else:
                    # about to be marked reused: keep what it measured when it ran
                    steps[name] = dataclasses.replace(old, status=Status.PENDING)
            self.steps = steps
        elif isinstance(event, ev.StepStarted):
            self._set(event.step, status=Status.RUNNING, started=event.time, ended=None,
                      attempt=event.attempt, chunk_size=event.chunk_size,
                      max_memory=event.max_memory, streaming=event.streaming,
                      records_in=event.records_in, records_done=0, chunks_done=0,
                      error=None, root_cause=None)
        elif isinstance(event, ev.StepPlanned):
            changes = {"chunks_total": event.chunks_total}
            if event.chunk_size:
                changes["chunk_size"] = event.chunk_size
            self._set(event.step, **changes)
        elif isinstance(event, ev.ChunkDone):
            self._set(event.step, chunks_done=event.chunks_done, chunks_total=event.chunks_total,
                      records_done=event.records_done)
        elif isinstance(event, ev.StepCompleted):
            self._set(event.step, status=Status.COMPLETED, ended=event.time,
                      records_in=event.records_in, records_out=event.records_out,
                      chunks_done=event.chunks, chunks_total=event.chunks,
                      bytes_out=event.bytes_out, checkpoint=event.checkpoint,
                      cache_key=event.cache_key, info=dict(event.info))
        elif isinstance(event, ev.StepReused):
            self._set(event.step, status=Status.REUSED, records_out=event.records_out,
                      checkpoint=event.checkpoint, cache_key=event.cache_key,
                      started=None, ended=None)
        elif isinstance(event, ev.StepFailed):
            error = {k: getattr(event, k) for k in
                     ("error_type", "message", "location", "source_line", "traceback", "details")}
            if event.will_retry:
                self._set(event.step, error=error, records_done=event.records_done)
            else:
                self._set(event.step, status=Status.FAILED, ended=event.time, error=error,
                          records_done=event.records_done)
        elif isinstance(event, ev.StepDiagnosed):
            # a diagnosis changes no status: it explains one
            record = self.steps.get(event.step) or StepRecord(event.step)
            self.steps[event.step] = dataclasses.replace(record, root_cause=dict(event.root_cause))
        elif isinstance(event, ev.StepSkipped):
            self._set(event.step, status=Status.SKIPPED, skipped_reason=event.reason,
                      because_of=event.because_of)
        elif isinstance(event, ev.StepCancelled):
            self._set(event.step, status=Status.CANCELLED, ended=event.time)
        elif isinstance(event, ev.RunFinished):
            self.status = event.status
            self.ended = event.time

    @property
    def failed_steps(self) -> list[str]:
        return [name for name, rec in self.steps.items() if rec.status is Status.FAILED]

    @property
    def root_failure(self) -> str | None:
        """The step that failed first: the root cause of a failed run."""
        failed = [rec for rec in self.steps.values() if rec.status is Status.FAILED]
        if not failed:
            return None
        return min(failed, key=lambda rec: rec.ended or 0).name

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "workflow": self.workflow, "status": self.status,
                "attempt": self.attempt, "started": self.started, "ended": self.ended,
                "reused": list(self.reused), "default_budget": self.default_budget,
                "backend": self.backend,
                "steps": {name: rec.to_dict() for name, rec in self.steps.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunState:
        state = cls(data["run_id"], data["workflow"], [])
        state.steps = {name: StepRecord.from_dict(rec) for name, rec in data["steps"].items()}
        for key in ("status", "attempt", "started", "ended", "default_budget", "backend"):
            setattr(state, key, data.get(key))
        state.reused = tuple(data.get("reused") or ())
        return state
