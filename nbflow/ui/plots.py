"""The memory-over-time figure: RSS samples, step spans, budgets, chunks and the failure.

Built on ``matplotlib.figure.Figure`` with the Agg canvas, never pyplot: no global
state, and it renders the same where ``MPLBACKEND=Agg`` is exported (CI, papermill)
as in a notebook, which shows the PNG (``figure_png``).

One panel per attempt drawn. By default that is the latest attempt, preceded by the
earlier attempt(s) that ran the steps it reused: after a failed run and a fixed
rerun the figure shows the failure and the fix one above the other, on one memory
scale. Every artist a reader (or a test) looks for carries a ``gid``:
``memory``, ``span:<step>``, ``label:<step>``, ``baseline:<step>``, ``budget:<step>``,
``chunks:<step>``, ``failure:<step>``, ``failure-label:<step>``.
"""
from __future__ import annotations

import io
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nbflow import events as ev
from nbflow.state import RunState, Status, StepRecord
from nbflow.ui.attempts import (
    Attempt,
    attempts_of,
    baseline_of,
    budget_of,
    data_top,
    failure_rss,
    select,
)
from nbflow.units import format_size

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOT_FILE = "memory.png"

#: Okabe–Ito (colour-blind safe) without its yellow and vermillion, then two muted extras;
#: red is kept for failures
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#8C564B", "#7A7A2E", "#6B7280")
FAILURE = "#C62828"
INK = "#1F2937"
MUTED = "#6B7280"
GRID = "#E5E7EB"

_LABEL_PT = 8.5
#: margins in inches: the title and a panel title; tick labels, axis label and legend; y labels
_TOP, _BOTTOM, _GAP, _LEFT, _RIGHT = 0.68, 0.82, 0.78, 0.78, 0.15
_FAILURE_BOX_PT = 2 * _LABEL_PT * 1.2 + 12  # two lines, the box's padding, the offset
_SYMBOLS = {Status.COMPLETED: "✓", Status.FAILED: "✗ failed", Status.CANCELLED: "⊘ cancelled",
            Status.RUNNING: "… running"}
#: a budget line this far above the data would flatten the memory line: it is named instead
_OFF_SCALE = 2.5


# -- public API -------------------------------------------------------------------------------

def memory_figure(state: RunState, samples: Sequence[ev.MemorySampled],
                  events: Iterable[ev.Event] | None = None, *, width: float = 10, height: float = 4,
                  attempt: int | str | None = None) -> Figure:
    """Memory over time for a run: one panel per attempt drawn.

    ``attempt``: ``None`` for the latest attempt plus the earlier ones whose outputs
    it reused, ``"latest"``, ``"all"``, or an attempt number. ``width`` × ``height``
    inches is the size for one attempt; each earlier attempt drawn above it adds a
    slightly shorter panel. Without ``events`` only the latest attempt (from
    ``state``) can be drawn, and without chunk ticks.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    attempts = select(attempts_of(state, list(events) if events is not None else None, samples), attempt)
    # Fixed margins rather than a layout engine, which would draw everything twice: this
    # figure is saved after every run.
    ratios = [0.85] * (len(attempts) - 1) + [1.0]
    panel = max(height - _TOP - _BOTTOM, 1.0)
    fig_height = _TOP + _BOTTOM + panel * sum(ratios) + _GAP * (len(attempts) - 1)
    fig = Figure(figsize=(width, fig_height))
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(len(attempts), 1, height_ratios=ratios, left=_LEFT / width,
                            right=1 - _RIGHT / width, top=1 - _TOP / fig_height,
                            bottom=_BOTTOM / fig_height, hspace=_GAP / (panel * sum(ratios) / len(ratios)))
    axes = [fig.add_subplot(grid[0, 0])]
    axes += [fig.add_subplot(grid[i, 0], sharey=axes[0]) for i in range(1, len(attempts))]
    layout = _Layout(width - _LEFT - _RIGHT, panel * min(ratios))
    colours = _colours(state, attempts)
    top = data_top(attempts)
    unit, unit_name = (1e9, "GB") if top >= 2e9 else (1e6, "MB")
    drawn = [_draw_attempt(ax, att, colours, top, state, layout)
             for ax, att in zip(axes, attempts, strict=True)]
    # room at the top for the step labels, and under them for the note above a failure
    headroom = 0.04 + max(levels for _, levels, _ in drawn) * layout.row()
    ymax = max(y for y, _, _ in drawn) * 1.05 / (1 - headroom)
    failures = [y for _, _, y in drawn if y]
    if failures:
        ymax = max(ymax, max(failures) / (1 - headroom - layout.row(_FAILURE_BOX_PT)))
    for ax in axes:
        ax.set_ylim(0, ymax)
        ax.yaxis.set_major_formatter(_size_formatter(unit))
        ax.set_ylabel(f"memory ({unit_name})", color=MUTED, fontsize=9)
    fig.text(0.08 / width, 1 - 0.1 / fig_height, f"{state.workflow} · run {state.run_id} · {state.status}"
             + (f" (attempt {state.attempt})" if (state.attempt or 0) > 1 else ""),
             ha="left", va="top", fontsize=11, fontweight="bold",
             color=FAILURE if state.status == "failed" else INK, gid="title")
    _legend(fig, attempts)
    return fig


def figure_png(fig: Figure, dpi: float = 110) -> bytes:
    """The figure as PNG bytes, rendered by Agg (for the widget, the report, a file)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return buf.getvalue()


def save_memory_plot(run_or_dir, path: str | os.PathLike | None = None, dpi: float = 110,
                     **figure_options) -> Path:
    """Write the memory figure of a ``Run`` or a ``RunDir`` (or a run folder) as a PNG.

    ``path`` defaults to ``memory.png`` in the run's folder; the file is replaced
    atomically, so a reader never sees half a PNG. Returns the path written.
    """
    from nbflow.store import RunDir

    if isinstance(run_or_dir, (str, os.PathLike)):
        run_or_dir = RunDir(Path(run_or_dir))
    if isinstance(run_or_dir, RunDir):
        run_dir = run_or_dir
        state = RunState.from_dict(run_dir.read_run())
    else:  # a Run: its live state is newer than run.json only by what it is about to write
        run_dir, state = run_or_dir.run_dir, run_or_dir.state
    fig = memory_figure(state, run_dir.read_memory(), list(run_dir.read_events()), **figure_options)
    data = figure_png(fig, dpi=dpi)
    target = Path(path) if path is not None else run_dir.path / PLOT_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


# -- drawing ------------------------------------------------------------------------------------

def _colours(state: RunState, attempts: list[Attempt]) -> dict[str, str]:
    """One colour per step, in workflow order, the same in every panel."""
    names = list(state.steps)
    for att in attempts:
        names += [n for n in att.records if n not in names]
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


@dataclass(frozen=True)
class _Layout:
    """A panel's size in inches, to place text in axes fractions."""

    width: float
    height: float

    def row(self, points: float = _LABEL_PT * 1.55) -> float:
        """``points`` (a label row, by default) as a fraction of the panel's height."""
        return points / 72 / self.height

    def chars(self, n: int) -> float:
        """The width of ``n`` average label characters, as a fraction of the panel's width."""
        return n * 0.58 * _LABEL_PT / 72 / self.width


def _draw_attempt(ax: Axes, att: Attempt, colours: dict[str, str], data_top: float,
                  state: RunState, layout: _Layout) -> tuple[float, int, float | None]:
    """Draw one attempt; returns the highest y it needs, the label rows it used
    and the highest failure it marked."""
    from matplotlib.patches import Rectangle

    t0 = att.start if att.start is not None else (att.samples[0].time if att.samples else 0.0)
    last = max([s.time for s in att.samples] + [att.end or 0.0]
               + [t for rec in att.executed for t in (rec.started, rec.ended) if t] + [t0])
    xmax = max(last - t0, 1e-3)
    top = data_top
    off_scale: dict[int, list[str]] = {}
    failure_y = None

    ax.grid(True, color=GRID, linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color("#9CA3AF")
    ax.tick_params(colors=MUTED, labelsize=8.5)

    if att.samples:
        xs = [s.time - t0 for s in att.samples]
        ys = [s.rss for s in att.samples]
        ax.plot(xs, ys, color=INK, linewidth=1.6, marker="o" if len(xs) == 1 else None,
                markersize=4, zorder=4, gid="memory", label="memory (RSS)")
    else:
        ax.text(0.5, 0.45, "no memory samples recorded for this attempt", transform=ax.transAxes,
                ha="center", va="center", color=MUTED, fontsize=9, gid="no-samples")

    spans = []
    for rec in sorted(att.executed, key=lambda r: r.started):
        colour = colours[rec.name]
        x0 = rec.started - t0
        x1 = (rec.ended if rec.ended is not None else last) - t0
        x1 = max(x1, x0)
        ax.add_patch(Rectangle((x0, 0), x1 - x0, 1, transform=ax.get_xaxis_transform(),
                               facecolor=colour, alpha=0.17, linewidth=0, zorder=1,
                               gid=f"span:{rec.name}"))
        spans.append((rec, x0, x1))
        baseline, budget = baseline_of(rec, att.samples), budget_of(rec)
        if baseline:
            ax.plot([x0, x1], [baseline, baseline], color=colour, linewidth=1.0, linestyle=":",
                    zorder=2, gid=f"baseline:{rec.name}")
        if baseline and budget:
            y = baseline + budget
            ax.plot([x0, x1], [y, y], color=colour, linewidth=1.6, linestyle=(0, (5, 2)), zorder=3,
                    gid=f"budget:{rec.name}")
            if y <= data_top * _OFF_SCALE:
                top = max(top, y)
            else:
                off_scale.setdefault(budget, []).append(rec.name)
        ticks = [t - t0 for t in att.chunks.get(rec.name, ()) if t >= rec.started - 1e-6]
        if ticks:
            ax.plot(ticks, [0.0] * len(ticks), linestyle="none", marker="|", markersize=9,
                    markeredgewidth=1.3, color=colour, transform=ax.get_xaxis_transform(),
                    clip_on=False, zorder=5, gid=f"chunks:{rec.name}")
        if rec.status is Status.FAILED and _draw_failure(ax, rec, att, x1, xmax):
            failure_y = max(failure_y or 0, failure_rss(rec, att.samples))

    levels = _draw_labels(ax, spans, colours, xmax, att, state, layout)
    ax.set_xlim(0, xmax * 1.01)
    _time_axis(ax, xmax)
    ax.set_xlabel(f"time since attempt {att.number} started" + (" (min:s)" if xmax >= 180 else " (s)"),
                  color=MUTED, fontsize=9)
    duration = f" in {_seconds(att.end - att.start)}" if att.end and att.start else ""
    ax.set_title(f"attempt {att.number}: {att.status}{duration}", loc="left", fontsize=10,
                 color=FAILURE if att.status == "failed" else INK)
    ax.set_title(_notes(att, off_scale), loc="right", fontsize=8.5, color=MUTED)
    return top, levels, failure_y


def _draw_failure(ax: Axes, rec: StepRecord, att: Attempt, x: float, xmax: float) -> bool:
    y = failure_rss(rec, att.samples)
    if y is None:
        return False
    ax.plot([x], [y], linestyle="none", marker="X", markersize=10, color=FAILURE,
            markeredgecolor="white", markeredgewidth=0.8, zorder=6, gid=f"failure:{rec.name}")
    right = x / xmax > 0.55
    ax.annotate(_failure_text(rec), (x, y), xytext=(-10 if right else 10, 6), textcoords="offset points",
                ha="right" if right else "left", va="bottom", fontsize=8.5, color=FAILURE, zorder=7,
                bbox={"boxstyle": "round,pad=0.3", "facecolor": "white", "edgecolor": FAILURE,
                      "linewidth": 0.8, "alpha": 0.92},
                gid=f"failure-label:{rec.name}")
    return True


def _failure_text(rec: StepRecord) -> str:
    error = rec.error or {}
    kind = error.get("error_type") or "failed"
    details = error.get("details") or {}
    if kind == "MemoryBudgetExceeded" and details.get("budget"):
        above = details.get("at_failure") or details.get("peak")
        return f"{kind}\n{format_size(above)} above baseline (budget {format_size(details['budget'])})"
    message = " ".join(str(error.get("message") or "").split())
    if len(message) > 60:
        message = message[:59] + "…"
    return f"{kind}\n{message}" if message else kind


def _draw_labels(ax: Axes, spans: list[tuple[StepRecord, float, float]], colours: dict[str, str],
                 xmax: float, att: Attempt, state: RunState, layout: _Layout) -> int:
    """Step names over their spans, stacked into rows where they would overlap."""
    rows: list[float] = []  # where each row's last label ends
    row = layout.row()
    latest_dead = att.end is None and state.status != "running"
    for rec, x0, x1 in spans:
        status = _SYMBOLS.get(rec.status, rec.status.value)
        if rec.status is Status.RUNNING and latest_dead:
            status = "⊘ did not finish"
        duration = f" {_seconds(rec.duration)}" if rec.duration is not None else ""
        text = f"{rec.name} {status}{duration}"
        start = x0 / (xmax * 1.01)
        width = layout.chars(len(text)) + 0.015
        span_width = (x1 - x0) / (xmax * 1.01)
        if width <= span_width:  # it fits: centre it on the span
            start = start + (span_width - width) / 2
        start = min(start, 1 - width) if start + width > 1 else start
        level = next((i for i, end in enumerate(rows) if start >= end), len(rows))
        if level == len(rows):
            rows.append(0.0)
        rows[level] = start + width
        ax.text(start + 0.004, 1 - 0.025 - level * row, text, transform=ax.transAxes, ha="left", va="top",
                fontsize=_LABEL_PT, color=_darker(colours[rec.name]), fontweight="bold", zorder=7,
                gid=f"label:{rec.name}")
    return len(rows)


def _notes(att: Attempt, off_scale: dict[int, list[str]]) -> str:
    notes = []
    if att.reused:
        by: dict[int | None, list[str]] = {}
        for name in att.reused:
            by.setdefault(att.reused_from.get(name), []).append(name)
        for number, names in by.items():
            notes.append(f"reused {', '.join(names)}" + (f" (from attempt {number})" if number else ""))
    skipped = [r.name for r in att.records.values() if r.status is Status.SKIPPED]
    if skipped:
        notes.append(f"skipped {', '.join(skipped)}")
    for budget in sorted(off_scale):
        notes.append(f"budget {format_size(budget)} above the scale")
    return " · ".join(notes)


def _legend(fig: Figure, attempts: list[Attempt]) -> None:
    from matplotlib.lines import Line2D

    remote = any(getattr(sample, "remote", 0) for att in attempts for sample in att.samples)
    what = "memory (RSS, process + children + cluster workers)" if remote else \
        "memory (RSS, process + children)"
    handles = [Line2D([], [], color=INK, linewidth=1.6, label=what),
               Line2D([], [], color=MUTED, linewidth=1.0, linestyle=":", label="step baseline"),
               Line2D([], [], color=MUTED, linewidth=1.6, linestyle=(0, (5, 2)),
                      label="baseline + max_memory"),
               Line2D([], [], color=MUTED, linestyle="none", marker="|", markersize=9,
                      markeredgewidth=1.3, label="chunk done")]
    if any(rec.status is Status.FAILED for att in attempts for rec in att.executed):
        handles.append(Line2D([], [], color=FAILURE, linestyle="none", marker="X", markersize=8,
                              label="failure"))
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=len(handles), frameon=False,
               fontsize=8.5, labelcolor=MUTED, handlelength=2.2, columnspacing=1.6)


# -- small formatting helpers -------------------------------------------------------------------

def _size_formatter(unit: float):
    from matplotlib.ticker import FuncFormatter

    def fmt(y, _pos):
        value = y / unit
        return f"{value:.0f}" if abs(value - round(value)) < 1e-9 or value >= 10 else f"{value:.1f}"
    return FuncFormatter(fmt)


def _time_axis(ax: Axes, xmax: float) -> None:
    """Seconds for short attempts; min:s on whole minutes (or halves, quarters) for long ones."""
    from matplotlib.ticker import FuncFormatter, MultipleLocator

    if xmax < 180:
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:g}"))
        return
    step = next((s for s in (30, 60, 120, 300, 600, 900, 1800, 3600) if xmax / s <= 8), 7200)
    ax.xaxis.set_major_locator(MultipleLocator(step))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{int(x // 60)}:{int(x % 60):02d}"))


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    if value < 60:
        return f"{value:.1f}s"
    return f"{int(value // 60)}m{int(value % 60):02d}s"


def _darker(colour: str, by: float = 0.3) -> str:
    r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return "#" + "".join(f"{int(c * (1 - by)):02x}" for c in (r, g, b))


__all__ = ["PNG_SIGNATURE", "figure_png", "memory_figure", "save_memory_plot"]
