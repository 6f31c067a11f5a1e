"""The text log: one line per event, flushed as it happens (terminal, papermill, CI).

    [2024-01-22 14:00:00] 🚀 Workflow started: data-pipeline
    [2024-01-22 14:00:01] ✓ extract-data: Completed (15.3s)
      └─ Records extracted: 1,000,000
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

from nbflow import events as ev
from nbflow.units import format_size

FANCY = {"start": "🚀", "ok": "✓", "fail": "✗", "pause": "⚠️", "restart": "🔄", "done": "🎉",
         "run": "▶", "reuse": "♻", "skip": "⊘", "cancel": "■", "retry": "↻", "tree": "└─"}
PLAIN = {"start": ">>", "ok": "OK", "fail": "FAIL", "pause": "!!", "restart": "<>", "done": "**",
         "run": ">", "reuse": "=", "skip": "-", "cancel": "x", "retry": "~", "tree": "`-"}

_VERBS = {"extract": "extracted", "validate": "validated", "load": "written", "transform": "transformed",
          "transform_streaming": "transformed"}


def _symbols(stream: TextIO) -> dict[str, str]:
    encoding = getattr(stream, "encoding", None)
    if encoding is None:  # a StringIO or an IPython stream holds text, any character goes
        return FANCY
    try:
        "".join(FANCY.values()).encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return PLAIN
    return FANCY


def stamp(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s"


class TextLog:
    """An observer that prints the run as it goes."""

    def __init__(self, stream: TextIO | None = None, *, actions: dict[str, str] | None = None,
                 progress_every: float = 10.0):
        self.stream = stream
        self.actions = actions or {}  # step -> action name, for "Records extracted"
        self.progress_every = progress_every
        self._last_progress: dict[str, float] = {}

    def _out(self) -> TextIO:
        return self.stream or sys.stdout

    def __call__(self, event: ev.Event) -> None:
        lines = self.format(event)
        if lines:
            out = self._out()
            out.write("\n".join(lines) + "\n")
            out.flush()

    def _verb(self, step: str) -> str:
        action = self.actions.get(step, "")
        return _VERBS.get(action.rsplit(".", 1)[-1], "processed") if action.startswith("data.") else "processed"

    def format(self, event: ev.Event) -> list[str]:
        s = _symbols(self._out())
        t = f"[{stamp(event.time)}]"
        tree = f"  {s['tree']}"
        if isinstance(event, ev.RunStarted):
            if event.attempt > 1:
                reused = ", ".join(event.reused) or "nothing"
                lines = [f"{t} {s['restart']} Workflow restarted (reusing: {reused})"]
            else:
                lines = [f"{t} {s['start']} Workflow started: {event.workflow}"]
            if event.default_budget:
                note = event.budget_note or f"{format_size(event.default_budget)} per step"
                lines.append(f"{tree} Memory budget: {note}; a step's max_memory overrides it")
            return lines
        if isinstance(event, ev.StepStarted):
            self._last_progress[event.step] = event.time
            bits = []
            if event.chunk_size:
                bits.append(f"chunks of {event.chunk_size:,}" if event.streaming is not False
                            else "in memory")
            if event.max_memory:
                bits.append(f"budget {format_size(event.max_memory)}")
            if event.pass_with:
                bits.append(f"one pass with {', '.join(event.pass_with)}")
            retry = f" (attempt {event.attempt})" if event.attempt > 1 else ""
            extra = f" [{', '.join(bits)}]" if bits else ""
            return [f"{t} {s['run']} {event.step}: Running{retry}{extra}"]
        if isinstance(event, ev.StepPlanned):
            if event.chunk_size:
                return [f"{tree} {event.step}: chunk_size auto → {event.chunk_size:,} records per chunk"]
            return []
        if isinstance(event, ev.ChunkDone):
            last = self._last_progress.setdefault(event.step, event.time)
            if event.time - last < self.progress_every or event.chunks_done == event.chunks_total:
                return []
            self._last_progress[event.step] = event.time
            return [f"{tree} {event.step}: {event.chunks_done}/{event.chunks_total} chunks, "
                    f"{event.records_done:,} records"]
        if isinstance(event, ev.StepCompleted):
            lines = [f"{t} {s['ok']} {event.step}: Completed ({duration(event.duration)})"]
            if event.records_out is not None:
                lines.append(f"{tree} Records {self._verb(event.step)}: {event.records_out:,}")
            peak = event.info.get("memory", {}).get("peak_above_baseline") if event.info else None
            if peak is not None:
                lines.append(f"{tree} Peak memory: {format_size(peak)} above baseline")
            return lines
        if isinstance(event, ev.StepReused):
            records = f" ({event.records_out:,} records)" if event.records_out is not None else ""
            return [f"{t} {s['reuse']} {event.step}: Reused saved output{records}"]
        if isinstance(event, ev.StepFailed):
            head = (f"{t} {s['retry']} {event.step}: failed, retrying (attempt {event.attempt})"
                    if event.will_retry else f"{t} {s['fail']} {event.step}: FAILED")
            lines = [head, f"{tree} Error: {event.error_type}: {_first_line(event.message)}"]
            if event.location:
                lines.append(f"{tree} Location: {event.location}")
                if event.source_line:
                    lines.append(f"       {event.source_line}")
            return lines
        if isinstance(event, ev.StepDiagnosed):
            from nbflow.diagnose import RootCause
            from nbflow.ui.rootcause import render_log

            try:
                lines = render_log(RootCause.from_dict(event.root_cause))
            except Exception:  # noqa: BLE001 — a diagnosis the log can't read still leaves the failure shown
                return []
            return [f"{tree} {line}" for line in lines]
        if isinstance(event, ev.StepSkipped):
            return [f"{t} {s['skip']} {event.step}: {event.reason}"]
        if isinstance(event, ev.StepCancelled):
            return [f"{t} {s['cancel']} {event.step}: Cancelled"]
        if isinstance(event, ev.RunFinished):
            if event.status == "completed":
                return [f"{t} {s['done']} Workflow completed successfully! ({duration(event.duration)})"]
            if event.status == "cancelled":
                return [f"{t} {s['cancel']} Workflow cancelled; completed steps are kept for a rerun"]
            return [f"{t} {s['pause']} Workflow paused - waiting for intervention "
                    f"(failed: {', '.join(event.failed)})"]
        return []


def _first_line(text: str) -> str:
    lines = (text or "").strip().splitlines()
    if len(lines) <= 1:
        return text.strip()
    return lines[0] + f" (+{len(lines) - 1} more lines)"
