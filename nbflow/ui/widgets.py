"""The ipywidgets dashboard: a live view over a Run's events, with its buttons.

The dashboard only reads records and calls Run methods: Rerun failed steps,
Apply fix & rerun, Rerun from step, Cancel. Reruns started from a button run in
a background thread so the kernel stays free to take the Cancel click and the
dashboard keeps updating; while the cell that started the run still holds the
kernel, the Cancel click is taken on a kernel subshell (``ui/sidechannel.py``).
"""
from __future__ import annotations

import threading
import time
from typing import Any

import ipywidgets as w

from nbflow import events as ev
from nbflow.state import Status
from nbflow.ui import report
from nbflow.ui.sidechannel import route_to_subshell
from nbflow.ui.text import step_cells

#: seconds between redraws of the memory plot while a run is live (at most twice a second)
PLOT_INTERVAL = 0.5


class StepRow:
    def __init__(self, name: str):
        self.name = name
        # fixed columns (flex 0 0) line the rows up whatever their text; the figures take the rest
        self.status = w.HTML(layout=w.Layout(width="115px", flex="0 0 115px"))
        self.label = w.HTML(f"<b>{report.esc(name)}</b>", layout=w.Layout(width="190px", flex="0 0 190px"))
        self.progress = w.FloatProgress(value=0, min=0, max=1,
                                        layout=w.Layout(width="160px", flex="0 0 160px"))
        self.figures = w.HTML(layout=w.Layout(width="auto", flex="1 1 auto"))
        self.box = w.HBox([self.status, self.label, self.progress, self.figures])
        self.box.add_class("nbflow-step")
        self._status_class: str | None = None

    def update(self, rec) -> None:
        cells = step_cells(rec)
        colour = report.STATUS_COLOURS[rec.status]
        self.status.value = f"<span style='color:{colour};font-weight:600'>{report.esc(cells['status'])}</span>"
        if rec.status is Status.REUSED or rec.status is Status.COMPLETED:
            self.progress.value = 1
        elif rec.chunks_total:
            self.progress.value = min(1.0, rec.chunks_done / rec.chunks_total)
        else:
            self.progress.value = 0
        self.progress.bar_style = {Status.COMPLETED: "success", Status.REUSED: "info",
                                   Status.FAILED: "danger", Status.CANCELLED: "warning"}.get(rec.status, "")
        # only the figures the step has: a skipped or pending step shows its status and reason
        bits = [f"{cells['records']} records", f"{cells['chunks']} chunks", cells["time"],
                f"peak {cells['memory']}"]
        # (a reused step took no time or memory now: its figures are in nbflow show's table)
        bits = [b for b, cell in zip(bits, ("records", "chunks", "time", "memory"), strict=True)
                if not cells[cell].startswith("-") and not (rec.status is Status.REUSED and cell == "memory")]
        text = cells["note"] if len(cells["note"]) <= 90 else cells["note"][:89] + "…"
        note = (f"{' — ' if bits else ''}<span style='color:#666'>{report.esc(text)}</span>"
                if text else "")
        self.figures.value = " · ".join(report.esc(b) for b in bits) + note
        new_class = f"nbflow-step-{rec.status.value}"
        if new_class != self._status_class:
            if self._status_class:
                self.box.remove_class(self._status_class)
            self.box.add_class(new_class)
            self._status_class = new_class


class Dashboard:
    """The widget view of a Run; ``dashboard.widget`` is what gets displayed."""

    def __init__(self, run, *, background: bool = True):
        self.run = run
        self.background = background
        self._events: list[ev.Event] = []
        self._samples: list[ev.MemorySampled] = []
        self._lock = threading.Lock()
        self._plot_dirty = False
        self._ticker: threading.Thread | None = None
        self._ticking = threading.Event()
        self._worker: threading.Thread | None = None

        self.header = w.HTML()
        self.header.add_class("nbflow-header")
        self.rows = {name: StepRow(name) for name in run.state.steps}
        self.steps_box = w.VBox([row.box for row in self.rows.values()])
        self.steps_box.add_class("nbflow-steps")
        self.plot = w.Image(format="png", layout=w.Layout(max_width="900px"))
        self.plot.add_class("nbflow-plot")
        self.root_cause = w.HTML()
        self.root_cause.add_class("nbflow-rootcause")
        self.message = w.HTML()
        self.message.add_class("nbflow-message")

        auto = w.Layout(width="auto")
        self.rerun_button = w.Button(description="Rerun failed steps", icon="redo", button_style="primary",
                                     layout=auto)
        self.rerun_button.add_class("nbflow-rerun")
        self.rerun_button.on_click(self._on_rerun)
        self.from_step = w.Dropdown(options=list(run.state.steps), layout=w.Layout(width="180px"))
        self.from_button = w.Button(description="Rerun from step…", icon="step-forward", layout=auto)
        self.from_button.add_class("nbflow-rerun-from")
        self.from_button.on_click(self._on_rerun_from)
        self.cancel_button = w.Button(description="Cancel", icon="stop", button_style="warning", layout=auto)
        self.cancel_button.add_class("nbflow-cancel")
        self.cancel_button.on_click(self._on_cancel)
        # the cell that started the run holds the main shell: take Cancel's click on a subshell
        self.cancel_routed = route_to_subshell(self.cancel_button)
        if not self.cancel_routed:
            self.cancel_button.tooltip = ("stops a rerun started here; to stop the cell's own run, "
                                          "interrupt the kernel (■)")
        self.fix_buttons: list[w.Button] = []
        self.fixes_box = w.VBox()
        self.fixes_box.add_class("nbflow-fixes")
        controls = w.HBox([self.rerun_button, self.from_step, self.from_button, self.cancel_button])
        controls.add_class("nbflow-controls")

        self.widget = w.VBox([self.header, self.steps_box, self.plot, self.root_cause, self.fixes_box,
                              controls, self.message])
        self.widget.add_class("nbflow-dashboard")
        run.subscribe(self.on_event)
        self.refresh(plot=True)

    # -- events ------------------------------------------------------------
    def on_event(self, event: ev.Event) -> None:
        if isinstance(event, ev.MemorySampled):
            with self._lock:
                self._samples.append(event)
                self._plot_dirty = True
            return
        with self._lock:
            self._events.append(event)
            self._plot_dirty = True
        if isinstance(event, ev.RunStarted):
            with self._lock:
                self._events = [event]
                self._samples = [s for s in self._samples if s.time >= event.time]
            self._start_ticker()
        if isinstance(event, ev.ChunkDone):
            self._update_row(event.step)
            return
        if isinstance(event, ev.RunFinished):
            self._stop_ticker()
            if self.message.value.startswith("<i>cancelling"):
                self.message.value = "<i>cancelled: rerun to go on from where it stopped</i>"
            self.refresh(plot=True)
            return
        step = getattr(event, "step", None)
        if step is not None:
            self._update_row(step)
        self._update_header()
        self._update_controls()

    def _update_row(self, step: str) -> None:
        rec = self.run.state.steps.get(step)
        row = self.rows.get(step)
        if rec is None:
            return
        if row is None:  # a corrected workflow may add a step
            row = self.rows[step] = StepRow(step)
            self.steps_box.children = tuple(r.box for r in self.rows.values())
            self.from_step.options = list(self.rows)
        row.update(rec)

    def _update_header(self) -> None:
        self.header.value = report.header_html(self.run.state)

    def _update_controls(self) -> None:
        state = self.run.state
        busy = state.status == "running" or (
            self._worker is not None and self._worker.is_alive() and self._worker is not threading.current_thread())
        failed = any(rec.status in (Status.FAILED, Status.CANCELLED, Status.SKIPPED)
                     for rec in state.steps.values())
        self.rerun_button.disabled = busy or not failed
        self.from_button.disabled = busy
        self.from_step.disabled = busy
        self.cancel_button.disabled = not busy
        for button in self.fix_buttons:
            button.disabled = busy

    def refresh(self, plot: bool = False) -> None:
        """Redraw everything from the run's records."""
        for name in list(self.run.state.steps):
            self._update_row(name)
        self._update_header()
        self._update_root_cause()
        self._update_controls()
        if plot:
            self._draw_plot()

    def _update_root_cause(self) -> None:
        state = self.run.state
        if state.root_failure is None or state.status == "running":
            self.root_cause.value = ""
            self.fixes_box.children = ()
            self.fix_buttons = []
            return
        self.root_cause.value = report.root_cause_html(state)
        fixes = list(getattr(self.run, "fixes", None) or [])
        rows, self.fix_buttons = [], []
        for i, fix in enumerate(fixes):
            title = fix.get("title") if isinstance(fix, dict) else getattr(fix, "title", str(fix))
            workflow = fix.get("workflow") if isinstance(fix, dict) else getattr(fix, "workflow", None)
            if workflow is None:  # a change to the user's code: nothing a button could apply
                rows.append(w.HTML(f"<span class='nbflow-code-fix'><b>Fix {i + 1}</b> (in your code): "
                                   f"{report.esc(title)} — change it, then <b>Rerun failed steps</b></span>"))
                continue
            button = w.Button(description=f"Apply fix {i + 1} & rerun", icon="wrench",
                              button_style="success" if not self.fix_buttons else "",
                              tooltip=str(title), layout=w.Layout(width="auto"))
            button.add_class("nbflow-apply-fix")
            button.on_click(lambda _b, i=i: self._on_apply_fix(i))
            self.fix_buttons.append(button)
            rows.append(w.HBox([button, w.HTML(f"<span style='margin-left:8px'>{report.esc(title)}</span>")]))
        self.fixes_box.children = tuple(rows)

    # -- the live plot -----------------------------------------------------
    def _draw_plot(self) -> None:
        with self._lock:
            events = list(self._events) or list(self.run.run_dir.read_events())
            samples = list(self._samples) or self.run.run_dir.read_memory()
            self._plot_dirty = False
        try:
            from nbflow.ui.plots import figure_png, memory_figure

            png = figure_png(memory_figure(self.run.state, samples, events))
        except Exception as err:  # noqa: BLE001 — the rest of the dashboard still works
            self.message.value = f"<i>memory plot unavailable: {report.esc(err)}</i>"
            return
        self.plot.value = png  # one model update: the image swaps in place, no flicker

    def _start_ticker(self) -> None:
        if self._ticker is not None and self._ticker.is_alive():
            return
        self._ticking.set()
        self._ticker = threading.Thread(target=self._tick, name="nbflow-dashboard", daemon=True)
        self._ticker.start()

    def _stop_ticker(self) -> None:
        self._ticking.clear()
        ticker = self._ticker
        if ticker is not None and ticker is not threading.current_thread():
            ticker.join(timeout=5)
        self._ticker = None

    def _tick(self) -> None:
        while self._ticking.is_set():
            time.sleep(PLOT_INTERVAL)
            if self._plot_dirty and self._ticking.is_set():
                self._draw_plot()
                self._update_header()

    # -- buttons -----------------------------------------------------------
    def _start(self, action, description: str) -> None:
        if self.run.running or (self._worker is not None and self._worker.is_alive()):
            self.message.value = "<i>a run is already in progress</i>"
            return
        self.message.value = f"<i>{report.esc(description)}…</i>"

        def work():
            try:
                action()
                self.message.value = ""
            except Exception as err:  # noqa: BLE001 — shown in the dashboard, kept on the record
                self.message.value = (f"<span style='color:#c62828'>{report.esc(type(err).__name__)}: "
                                      f"{report.esc(err)}</span>")
            finally:
                self.refresh(plot=True)

        for button in [self.rerun_button, self.from_button, *self.fix_buttons]:
            button.disabled = True
        self.cancel_button.disabled = False
        if self.background:
            self._worker = threading.Thread(target=work, name="nbflow-rerun", daemon=True)
            self._worker.start()
        else:
            work()

    def wait(self, timeout: float | None = None) -> None:
        """Wait for a rerun started from a button (tests and scripts)."""
        if self._worker is not None:
            self._worker.join(timeout)

    def _on_rerun(self, _button=None) -> None:
        self._start(self.run.rerun, "rerunning the failed steps")

    def _on_rerun_from(self, _button=None) -> None:
        step = self.from_step.value
        self._start(lambda: self.run.rerun(from_step=step), f"rerunning from {step}")

    def _on_apply_fix(self, index: int) -> None:
        def apply():
            spec = self.run.apply_fix(index)
            self.run.rerun(spec)
        self._start(apply, f"applying fix {index + 1} and rerunning")

    def _on_cancel(self, _button=None) -> None:
        self.run.cancel()
        self.message.value = "<i>cancelling: chunks in flight finish, no new chunk starts…</i>"

    def close(self) -> None:
        self._stop_ticker()
        self.wait()


def mimebundle(dashboard: Dashboard, static: dict[str, Any]) -> dict[str, Any]:
    """The widget view plus the static summary: front ends without widgets show the HTML."""
    bundle = dict(static)
    bundle["application/vnd.jupyter.widget-view+json"] = {
        "version_major": 2, "version_minor": 0, "model_id": dashboard.widget.model_id}
    return bundle
