"""The static summary: what a saved or papermill-run notebook shows without a kernel.

HTML (a step table, the memory plot as an embedded PNG, the root cause) and the
same as plain text; built from the run's records only, every string escaped.
"""
from __future__ import annotations

import base64
import html
import time
from typing import Any

from nbflow.state import RunState, Status
from nbflow.ui.log import duration
from nbflow.ui.text import step_cells
from nbflow.units import format_size

STATUS_COLOURS = {
    Status.PENDING: "#9e9e9e", Status.RUNNING: "#1e88e5", Status.COMPLETED: "#2e7d32",
    Status.FAILED: "#c62828", Status.CANCELLED: "#6d4c41", Status.SKIPPED: "#757575",
    Status.REUSED: "#00897b",
}
RUN_COLOURS = {"completed": "#2e7d32", "failed": "#c62828", "cancelled": "#6d4c41",
               "running": "#1e88e5", "pending": "#9e9e9e"}

CSS = """<style>
.nbflow-report {font-family: var(--jp-ui-font-family, sans-serif); font-size: 13px; max-width: 980px}
.nbflow-report table {border-collapse: collapse; margin: 6px 0}
.nbflow-report th, .nbflow-report td {padding: 3px 10px; text-align: left; border-bottom: 1px solid #e0e0e0}
.nbflow-report th {font-weight: 600}
.nbflow-report td.num {text-align: right; font-variant-numeric: tabular-nums}
.nbflow-report .nbflow-why {color: #555}
.nbflow-report img {max-width: 100%}
</style>"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def header_html(state: RunState, budget: int | None = None) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(state.started)) if state.started else "-"
    elapsed = duration((state.ended or time.time()) - state.started) if state.started else "-"
    colour = RUN_COLOURS.get(state.status, "#333")
    budget = budget or state.default_budget
    parts = [f"<b>{esc(state.workflow)}</b>",
             f"<span style='color:{colour};font-weight:600'>{esc(state.status.upper())}</span>",
             f"run <code>{esc(state.run_id)}</code>", f"attempt {state.attempt}",
             f"started {esc(started)}", f"elapsed {esc(elapsed)}"]
    if budget:
        parts.append(f"default budget {esc(format_size(budget))} per step")
    return " · ".join(parts)


def steps_table_html(state: RunState) -> str:
    rows = []
    for name, rec in state.steps.items():
        cells = step_cells(rec)
        colour = STATUS_COLOURS[rec.status]
        rows.append(
            f"<tr class='nbflow-row-{esc(rec.status.value)}'>"
            f"<td style='color:{colour};font-weight:600'>{esc(cells['status'])}</td>"
            f"<td><b>{esc(name)}</b></td><td class='num'>{esc(cells['records'])}</td>"
            f"<td class='num'>{esc(cells['chunks'])}</td><td class='num'>{esc(cells['time'])}</td>"
            f"<td class='num'>{esc(cells['memory'])}</td><td class='nbflow-why'>{esc(cells['note'])}</td></tr>")
    head = "".join(f"<th>{h}</th>" for h in
                   ("status", "step", "records", "chunks", "time", "peak / budget", ""))
    return f"<table class='nbflow-steps'><tr>{head}</tr>{''.join(rows)}</table>"


def png_html(png: bytes | None, alt: str = "memory over time") -> str:
    if not png:
        return ""
    data = base64.b64encode(png).decode("ascii")
    return f"<img class='nbflow-plot' alt='{esc(alt)}' src='data:image/png;base64,{data}'/>"


def root_cause_html(state: RunState) -> str:
    step = state.root_failure
    if step is None:
        return ""
    rec = state.steps[step]
    root = getattr(rec, "root_cause", None)
    if root:
        try:
            from nbflow.diagnose import RootCause, render_html

            return render_html(RootCause.from_dict(root))
        except Exception as err:  # noqa: BLE001 — a broken renderer must not hide the failure
            return f"<pre>{esc(root)}</pre><p>(could not render the diagnosis: {esc(err)})</p>"
    error = rec.error or {}
    where = f" at <code>{esc(error.get('location'))}</code>" if error.get("location") else ""
    source = f"<pre>{esc(error.get('source_line'))}</pre>" if error.get("source_line") else ""
    return (f"<div class='nbflow-rootcause'><b>{esc(step)} failed</b>{where}: "
            f"{esc(error.get('error_type'))}: {esc(error.get('message'))}{source}</div>")


def summary_html(state: RunState, png: bytes | None = None) -> str:
    return (f"{CSS}<div class='nbflow-report'><div>{header_html(state)}</div>"
            f"{steps_table_html(state)}{png_html(png)}{root_cause_html(state)}</div>")


def run_png(run) -> bytes | None:
    """The memory plot of a run as PNG bytes (None when it cannot be drawn)."""
    try:
        saved = run.memory_plot() if hasattr(run, "memory_plot") else None
        if saved is not None:  # the run drew it as it ended: the same figure, same dpi
            return saved.read_bytes()
        from nbflow.ui.plots import figure_png, memory_figure

        events = list(run.run_dir.read_events())
        return figure_png(memory_figure(run.state, run.run_dir.read_memory(), events))
    except Exception:  # noqa: BLE001 — the table and the diagnosis still show
        return None


def summary_bundle(run, png: bytes | None | bool = True) -> dict[str, str]:
    """A mimebundle of the run's static summary: HTML for notebooks, text for terminals.

    ``png=True`` draws the memory plot into the HTML; ``False`` leaves it out (for
    a separate image output), or pass the PNG bytes already drawn.
    """
    if png is True:
        png = run_png(run)
    return {"text/html": summary_html(run.state, png or None), "text/plain": run.summary()}


def plot_bundle(png: bytes | None) -> dict[str, str] | None:
    """The memory plot as its own image/png output: every notebook viewer shows those."""
    if not png:
        return None
    return {"image/png": base64.b64encode(png).decode("ascii"), "text/plain": "<memory over time>"}
