"""Plain-text views of a run: the step table for ``nbflow show``, reprs and papermill output."""
from __future__ import annotations

import time

from nbflow.state import RunState, Status
from nbflow.ui.log import duration, stamp
from nbflow.units import format_size

ICONS = {Status.PENDING: "·", Status.RUNNING: "▶", Status.COMPLETED: "✓", Status.FAILED: "✗",
         Status.CANCELLED: "■", Status.SKIPPED: "⊘", Status.REUSED: "♻"}


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*["-" * w for w in widths])]
    lines += [fmt.format(*[str(c) for c in r]) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def run_summary(state: RunState, spec=None) -> str:
    when = stamp(state.started) if state.started else "not started"
    total = duration((state.ended or time.time()) - state.started) if state.started else "-"
    head = (f"Run {state.run_id} — {state.workflow}: {state.status.upper()} "
            f"(attempt {state.attempt}, started {when}, {total})")
    rows = []
    for name, rec in state.steps.items():
        cells = step_cells(rec)
        rows.append([cells["status"], name, cells["time"], cells["records"], cells["chunks"], cells["memory"]])
    lines = [head, "", table(rows, ["status", "step", "time", "records", "chunks", "memory"])]
    told: set[str] = set()  # skipped steps a root cause already names ("Skipped because of it")
    for name, rec in state.steps.items():
        if rec.root_cause and rec.status in (Status.FAILED, Status.CANCELLED):
            lines += ["", _root_cause_text(rec.root_cause)]
            told.update(rec.root_cause.get("blocked") or ())
        elif rec.status is Status.FAILED and rec.error:
            lines += ["", f"{name} failed: {rec.error.get('error_type')}: {rec.error.get('message')}"]
            if rec.error.get("location"):
                lines.append(f"  at {rec.error['location']}")
                if rec.error.get("source_line"):
                    lines.append(f"    {rec.error['source_line']}")
        elif rec.status is Status.SKIPPED and rec.skipped_reason and name not in told:
            lines.append(f"{name}: {rec.skipped_reason}")
    return "\n".join(lines)


def _root_cause_text(root: dict) -> str:
    from nbflow.diagnose import render_text

    try:
        return render_text(root)
    except Exception as err:  # noqa: BLE001 — show the record, never hide the failure
        return f"{root.get('step')} failed: {root.get('error_type')}: {root.get('message')} " \
               f"(the diagnosis could not be shown: {err!r})"


def runs_table(summaries: list[dict]) -> str:
    if not summaries:
        return "no runs yet"
    rows = []
    for s in reversed(summaries):
        took = duration(s["ended"] - s["started"]) if s.get("ended") and s.get("started") else "-"
        rows.append([s["run_id"], s.get("workflow") or "?", s.get("status") or "?",
                     str(s.get("attempt") or "-"), stamp(s["started"]) if s.get("started") else "-",
                     took, ", ".join(s.get("failed") or []) or "-"])
    return table(rows, ["run", "workflow", "status", "attempts", "started", "time", "failed"])


__all__ = ["run_summary", "runs_table", "format_size"]


def step_cells(rec) -> dict[str, str]:
    """The figures of one step, as text, shared by the table and the widget rows."""
    peak = (rec.info or {}).get("memory", {}).get("peak_above_baseline")
    if peak is None and rec.error:
        peak = (rec.error.get("details") or {}).get("memory", {}).get("peak_above_baseline")
    memory = format_size(peak) if peak is not None else "-"
    if rec.max_memory:
        memory += f" / {format_size(rec.max_memory)}"
    if rec.records_out is not None:
        records = f"{rec.records_out:,}"
    elif rec.records_done:
        records = f"{rec.records_done:,}…"
    else:
        records = "-"
    chunks = f"{rec.chunks_done}/{rec.chunks_total}" if rec.chunks_total else "-"
    took = duration(rec.duration) if rec.duration is not None else (
        duration(time.time() - rec.started) if rec.status is Status.RUNNING and rec.started else "-")
    note = ""
    if rec.status is Status.FAILED and rec.error:
        note = f"{rec.error.get('error_type')}: {_first_line(rec.error.get('message', ''))}"
    elif rec.status is Status.SKIPPED:
        note = rec.skipped_reason or ""
    elif rec.status is Status.REUSED:
        note = "saved output reused"
    return {"status": f"{ICONS[rec.status]} {rec.status.value}", "records": records, "chunks": chunks,
            "time": took, "memory": memory, "note": note}


def _first_line(text: str) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0] if lines else ""
