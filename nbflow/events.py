"""Events: the only coupling between execution and whoever watches it.

Each event is a small frozen dataclass with keyword-only fields. Observers
(the run store, the text log, the widget) receive them in order; the store
appends them to events.jsonl, so a run can be replayed after a restart.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

_KINDS: dict[str, type[Event]] = {}


@dataclass(frozen=True, kw_only=True)
class Event:
    kind: ClassVar[str] = "event"
    run_id: str
    time: float = field(default_factory=time.time)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _KINDS[cls.kind] = cls

    def to_dict(self) -> dict[str, Any]:
        data = {"event": self.kind}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            data[f.name] = list(value) if isinstance(value, tuple) else value
        return data

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Event:
        data = dict(data)
        cls = _KINDS[data.pop("event")]
        names = {f.name: f for f in dataclasses.fields(cls)}
        # tolerate fields written by newer or older versions
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in names}
        return cls(**kwargs)


@dataclass(frozen=True, kw_only=True)
class RunStarted(Event):
    kind: ClassVar[str] = "run_started"
    workflow: str
    steps: tuple[str, ...]
    attempt: int = 1
    #: steps whose checkpoint this attempt reuses
    reused: tuple[str, ...] = ()
    #: steps this attempt will execute
    to_run: tuple[str, ...] = ()
    backend: str = "threads"
    default_budget: int | None = None
    budget_note: str = ""  # where the default budget comes from, for the log


@dataclass(frozen=True, kw_only=True)
class StepStarted(Event):
    kind: ClassVar[str] = "step_started"
    step: str
    attempt: int = 1  # 1 + retries so far
    chunk_size: int | None = None
    max_memory: int | None = None
    streaming: bool | None = None
    records_in: int | None = None
    #: the other steps it runs with chunk by chunk, as one pass (nbflow/engine/fusion.py)
    pass_with: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class StepPlanned(Event):
    """The step's chunk count is known (after its graph was built)."""

    kind: ClassVar[str] = "step_planned"
    step: str
    chunks_total: int
    chunk_size: int | None = None  # set when ``chunk_size: auto`` picked it


@dataclass(frozen=True, kw_only=True)
class ChunkDone(Event):
    kind: ClassVar[str] = "chunk_done"
    step: str
    chunk: int
    chunks_done: int
    chunks_total: int
    records: int  # records this chunk produced
    records_done: int


@dataclass(frozen=True, kw_only=True)
class StepCompleted(Event):
    kind: ClassVar[str] = "step_completed"
    step: str
    duration: float
    records_in: int | None = None
    records_out: int | None = None
    chunks: int = 0
    bytes_out: int | None = None
    checkpoint: str | None = None
    cache_key: str | None = None
    info: dict = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class StepReused(Event):
    kind: ClassVar[str] = "step_reused"
    step: str
    records_out: int | None = None
    checkpoint: str | None = None
    cache_key: str | None = None


@dataclass(frozen=True, kw_only=True)
class StepFailed(Event):
    kind: ClassVar[str] = "step_failed"
    step: str
    error_type: str
    message: str
    location: str | None = None  # "file:line" of the innermost user frame
    source_line: str | None = None
    traceback: str = ""
    duration: float = 0.0
    attempt: int = 1
    will_retry: bool = False
    records_done: int = 0
    details: dict = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class StepDiagnosed(Event):
    """The diagnosis of a failed (or interrupted) step: ``RootCause.to_dict()``."""

    kind: ClassVar[str] = "step_diagnosed"
    step: str
    root_cause: dict = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class StepSkipped(Event):
    kind: ClassVar[str] = "step_skipped"
    step: str
    reason: str
    because_of: str | None = None  # the root failed step


@dataclass(frozen=True, kw_only=True)
class StepCancelled(Event):
    kind: ClassVar[str] = "step_cancelled"
    step: str
    duration: float = 0.0


@dataclass(frozen=True, kw_only=True)
class MemorySampled(Event):
    kind: ClassVar[str] = "memory_sampled"
    rss: int  # bytes, the process (and its children / workers)
    steps: tuple[str, ...] = ()  # steps running at the sample
    remote: int = 0  # bytes of rss on cluster workers outside this process tree


@dataclass(frozen=True, kw_only=True)
class RunFinished(Event):
    kind: ClassVar[str] = "run_finished"
    status: str  # completed | failed | cancelled
    duration: float
    failed: tuple[str, ...] = ()
