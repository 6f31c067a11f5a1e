"""What the memory figure draws, from a run's records: its attempts and their figures.

``attempts_of`` folds the events back into each attempt's step records, chunk
times and memory samples (``Attempt``); the helpers below read a step's baseline,
budget and memory at failure from its record. No matplotlib here: plots.py draws.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from nbflow import events as ev
from nbflow.state import RunState, Status, StepRecord


@dataclass
class Attempt:
    number: int
    start: float | None
    end: float | None
    status: str
    records: dict[str, StepRecord]
    reused: tuple[str, ...] = ()
    chunks: dict[str, list[float]] = field(default_factory=dict)
    samples: list[Any] = field(default_factory=list)
    #: steps reused here, by the attempt whose run of them it reused
    reused_from: dict[str, int] = field(default_factory=dict)

    @property
    def executed(self) -> list[StepRecord]:
        return [rec for rec in self.records.values() if rec.started is not None
                and rec.status not in (Status.REUSED, Status.SKIPPED, Status.PENDING)]



def attempts_of(state: RunState, events: list[ev.Event] | None, samples: Sequence[Any]) -> list[Attempt]:
    """Each attempt's step records, folded from the events with ``RunState.apply``."""
    samples = sorted(samples, key=lambda s: s.time)
    if not events or not any(isinstance(e, ev.RunStarted) for e in events):
        return [from_state(state, samples)]
    folded = RunState(state.run_id, state.workflow, [])
    found: list[Attempt] = []
    current: Attempt | None = None
    for event in events:
        if isinstance(event, ev.MemorySampled):
            continue
        try:
            folded.apply(event)
        except ValueError:  # a record cut short by a crash: draw what is consistent
            continue
        if isinstance(event, ev.RunStarted):
            current = Attempt(event.attempt, event.time, None, "running", {}, reused=event.reused)
            found.append(current)
        if current is None:
            continue
        if isinstance(event, ev.StepStarted):
            current.chunks[event.step] = []  # a retry starts the step's chunks over
        elif isinstance(event, ev.ChunkDone):
            current.chunks.setdefault(event.step, []).append(event.time)
        elif isinstance(event, ev.RunFinished):
            current.end, current.status = event.time, event.status
        current.records = dict(folded.steps)
    if found and found[-1].end is None and state.status != "running":
        found[-1].status = state.status  # the process died mid-run; open_run said what became of it
    for i, att in enumerate(found):
        until = found[i + 1].start if i + 1 < len(found) else float("inf")
        att.samples = [s for s in samples if att.start <= s.time < until]
        for name in att.reused:
            ran = [a.number for a in found[:i] if name in {r.name for r in a.executed}
                   and a.records[name].status is Status.COMPLETED]
            if ran:
                att.reused_from[name] = ran[-1]
    return found


def from_state(state: RunState, samples: list[Any]) -> Attempt:
    """The latest attempt from its records alone (no events.jsonl: no chunk times)."""
    starts = [rec.started for rec in state.steps.values() if rec.started is not None]
    start = min(starts) if starts else (samples[0].time if samples else None)
    if state.attempt and state.attempt > 1 and start is not None:
        samples = [s for s in samples if s.time >= start]  # earlier attempts' samples
    if samples and start is not None:
        start = min(start, samples[0].time)
    return Attempt(state.attempt or 1, start, state.ended, state.status, dict(state.steps),
                    reused=tuple(state.reused), samples=samples)


def select(attempts: list[Attempt], which: int | str | None) -> list[Attempt]:
    latest = attempts[-1]
    if which == "all":
        return attempts
    if which == "latest":
        return [latest]
    if isinstance(which, int):
        chosen = [a for a in attempts if a.number == which]
        if not chosen:
            numbers = ", ".join(str(a.number) for a in attempts)
            raise ValueError(f"this run has no attempt {which} on record (attempts: {numbers})")
        return chosen
    if which is not None:
        raise ValueError(f"attempt={which!r}: give an attempt number, 'latest', 'all' or None")
    earlier = sorted(set(latest.reused_from.values()))[-2:]  # at most three panels
    return [a for a in attempts if a.number in earlier] + [latest]


def step_memory(rec: StepRecord) -> dict[str, Any]:
    if rec.info.get("memory"):
        return rec.info["memory"]
    if rec.error:
        return (rec.error.get("details") or {}).get("memory") or {}
    return {}


def rss_at(samples: list[Any], when: float) -> int | None:
    """The last sample at or before ``when``, else the first after it."""
    before = [s for s in samples if s.time <= when]
    if before:
        return before[-1].rss
    return samples[0].rss if samples else None


def baseline_of(rec: StepRecord, samples: list[Any]) -> int | None:
    return step_memory(rec).get("baseline") or (rss_at(samples, rec.started) if rec.started else None)


def budget_of(rec: StepRecord) -> int | None:
    return rec.max_memory or step_memory(rec).get("budget")


def failure_rss(rec: StepRecord, samples: list[Any]) -> int | None:
    details = (rec.error or {}).get("details") or {}
    mem = details.get("memory") or {}
    if mem.get("at_failure"):
        return mem["at_failure"]
    baseline = baseline_of(rec, samples)
    if details.get("at_failure") and baseline:  # the error's own figure is above the baseline
        return baseline + details["at_failure"]
    return mem.get("peak") or (rss_at(samples, rec.ended) if rec.ended else None)


def data_top(attempts: list[Attempt]) -> float:
    """The highest memory a panel must show: samples, peaks, failures, baselines."""
    values = [1e6]
    for att in attempts:
        values += [s.rss for s in att.samples]
        for rec in att.executed:
            mem = step_memory(rec)
            values += [v for v in (mem.get("peak"), baseline_of(rec, att.samples)) if v]
            if rec.status is Status.FAILED:
                values.append(failure_rss(rec, att.samples) or 0)
    return float(max(values))
