"""Run: the live handle on one workflow run — its records, outputs, and the buttons' methods.

Every front end is a view over a Run: the CLI, the text log, the widget and the
saved report read its records; rerun / cancel / apply_fix are methods here so a
test (or a button) calls them the same way.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from nbflow import events as ev
from nbflow.errors import RunBusy, SpecError, WorkflowFailed
from nbflow.owner import gone, owner
from nbflow.plan import Plan, make_plan
from nbflow.spec import WorkflowSpec, load, parse
from nbflow.state import RunState, Status, StepRecord
from nbflow.store import RunDir, RunStore, still_running

Observer = Callable[[ev.Event], None]
log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from nbflow.diagnose import Fix, RootCause


class Outputs(Mapping):
    """``run.outputs[step]``: a completed step's output as a lazy Dask DataFrame."""

    def __init__(self, run: Run):
        self._run = run

    def __getitem__(self, step: str):
        from nbflow.engine.chunks import open_checkpoint

        rec = self._run.state.steps[step]
        if not rec.status.done:
            raise KeyError(f"step '{step}' has no output: it is {rec.status.value}")
        return open_checkpoint(rec.checkpoint, step)

    def __iter__(self) -> Iterator[str]:
        return (n for n, rec in self._run.state.steps.items() if rec.status.done)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class Run:
    def __init__(self, spec: WorkflowSpec, run_dir: RunDir, state: RunState, *,
                 overrides: Mapping[str, Any] | None = None,
                 namespace: Mapping[str, Any] | None = None, backend=None,
                 workdir: str | os.PathLike | None = None, observers: list[Observer] | None = None):
        self.spec = spec
        self.run_dir = run_dir
        self.state = state
        self.overrides = dict(overrides or {})
        self.namespace = namespace
        self.backend = backend
        self.workdir = Path(workdir or Path.cwd()).resolve()
        self.observers: list[Observer] = list(observers or [])
        self.plan: Plan | None = None
        self._lock = threading.RLock()
        self._cancel = threading.Event()
        self._running = False
        #: the owner tag (nbflow/owner.py) of another process found running this run
        self.running_elsewhere: str | None = None
        self._plot_thread: threading.Thread | None = None
        #: seconds between memory samples
        self.memory_interval = 0.1
        #: the default per-step budget, as a fraction of the memory available to the process
        self.budget_fraction = 0.5
        #: a memory failure's diagnosis runs the step's function on a small sample to measure it
        self.probe_memory = True

    # -- what views read --------------------------------------------------
    @property
    def run_id(self) -> str:
        return self.run_dir.run_id

    @property
    def status(self) -> str:
        return self.state.status

    @property
    def records(self) -> dict[str, StepRecord]:
        return dict(self.state.steps)

    @property
    def outputs(self) -> Outputs:
        return Outputs(self)

    @property
    def running(self) -> bool:
        return self._running

    @property
    def failed_step(self) -> str | None:
        return self.state.root_failure

    @property
    def root_cause(self) -> RootCause | None:
        """The diagnosis of the step that failed first (or of the interruption); None if it completed."""
        from nbflow.diagnose import RootCause, diagnose_step

        step = self.state.root_failure or next(
            (n for n, rec in self.state.steps.items()
             if rec.status is Status.CANCELLED and rec.root_cause), None)
        if step is None:
            return None
        rec = self.state.steps[step]
        if rec.root_cause:
            return RootCause.from_dict(rec.root_cause)
        if self._running:
            return None  # being diagnosed: StepDiagnosed follows the failure
        return diagnose_step(self, step, probe=False)  # a run recorded before diagnoses existed

    @property
    def fixes(self) -> list[Fix]:
        """The root cause's resolution options, most likely to work first."""
        root = self.root_cause
        return list(root.resolution_options) if root is not None else []

    # -- events -------------------------------------------------------------
    def subscribe(self, observer: Observer) -> None:
        self.observers.append(observer)

    def emit(self, event: ev.Event) -> None:
        if isinstance(event, ev.RunFinished) and event.status == "cancelled":
            self._diagnose(None)  # before the run's last event, so the log reads in order
        with self._lock:
            self.state.apply(event)
            self.run_dir.append_event(event)
            if not isinstance(event, (ev.ChunkDone, ev.MemorySampled)):
                self._save()
            observers = list(self.observers)
        for observer in observers:
            try:
                observer(event)
            except Exception as err:  # noqa: BLE001 — a broken view never stops the run
                self._drop_observer(observer, err)
        if isinstance(event, ev.StepFailed) and not event.will_retry:
            self._diagnose(event.step)

    def _drop_observer(self, observer: Observer, err: Exception) -> None:
        """Stop telling ``observer`` (a log whose pipe closed, a view with a bug): the run, its
        records and the other observers go on; it is said once, on the logger."""
        with self._lock:
            if observer not in self.observers:
                return
            self.observers.remove(observer)
        log.warning("run %s: observer %r raised %r and no longer gets events", self.run_id, observer, err)

    def _diagnose(self, step: str | None) -> None:
        """Emit StepDiagnosed for a failed step (or, with None, for an interrupted run).

        A bug in the diagnosis must never break the run: it is logged, and the
        failure is reported as recorded.
        """
        from nbflow import diagnose

        try:
            if step is None:
                root = diagnose.diagnose_interrupted(self.state, self.spec)
                if root is None:
                    return
            else:
                root = diagnose.diagnose_step(self, step, probe=self.probe_memory)
        except Exception as err:  # noqa: BLE001
            log.exception("diagnosing %s failed", step or "the interruption")
            if step is None:
                return
            root = diagnose.minimal(self.state, step, note=f"the diagnosis itself failed: {err!r}")
        self.emit(ev.StepDiagnosed(run_id=self.run_id, step=root.step, root_cause=root.to_dict()))

    def _on_sample(self, sample) -> None:
        self.emit(ev.MemorySampled(run_id=self.run_id, time=sample.time, rss=sample.rss,
                                   steps=sample.steps, remote=sample.remote))

    def _save(self) -> None:
        self.run_dir.write_run({
            **self.state.to_dict(), "filename": self.spec.filename, "spec_text": self.spec.text,
            "parameters": dict(self.spec.parameters), "overrides": self.overrides,
            "workdir": str(self.workdir), "owner": owner(),
        })

    # -- doing --------------------------------------------------------------
    def execute(self, *, force: set[str] | frozenset = frozenset(), raise_on_failure: bool = False,
                previous: RunState | None = None) -> Run:
        """Run (or rerun) the workflow, reusing every output whose cache key still matches.

        ``previous`` offers another run's records for reuse (a new ``%%workflow``
        run picks up where the last run of the same workflow left off).
        """
        # Dask loads here, not at import: `nbflow runs` and `show` stay quick
        from nbflow.engine.backends import make_backend
        from nbflow.engine.executor import Executor
        from nbflow.engine.limits import default_budget, describe_default_budget
        from nbflow.engine.memory import MemoryMonitor

        if self._running:
            raise RuntimeError(f"run {self.run_id} is already running")
        if self.running_elsewhere is not None and not gone(self.running_elsewhere):
            raise RunBusy(self.run_id, self.running_elsewhere)
        self.running_elsewhere = None
        self.memory_plot()  # the last attempt's figure reads the state this one will change
        if previous is None and self.state.attempt:
            previous = self.state
        self.run_dir.create()
        try:
            plan = make_plan(self.spec, namespace=self.namespace, previous=previous, force=set(force),
                             workdir=self.workdir)
        except SpecError:
            self.run_dir.discard_if_empty()  # a workflow that can't run leaves no empty run behind
            raise
        self.plan = plan
        self._cancel.clear()
        self._running = True
        backend = make_backend(self.backend)
        started = time.time()
        status = "failed"
        budget = default_budget(self.budget_fraction)
        monitor = MemoryMonitor(interval=self.memory_interval, on_sample=self._on_sample,
                                remote=getattr(backend, "remote_memory", None))
        try:
            self.emit(ev.RunStarted(run_id=self.run_id, workflow=self.spec.name,
                                    steps=plan.order, attempt=self.state.attempt + 1,
                                    reused=plan.reused, to_run=plan.to_run, backend=backend.name,
                                    default_budget=budget,
                                    budget_note=describe_default_budget(self.budget_fraction)
                                    .removeprefix("memory budget: ")))
            executor = Executor(plan, self.run_dir, backend, self.emit, namespace=self.namespace,
                                workdir=self.workdir, cancel=self._cancel, monitor=monitor,
                                default_budget=budget)
            monitor.start()
            try:
                status = executor.execute()
            except KeyboardInterrupt:
                status = "cancelled"
                raise
            finally:
                monitor.stop()
        finally:
            self.emit(ev.RunFinished(run_id=self.run_id, status=status, duration=time.time() - started,
                                     failed=tuple(self.state.failed_steps)))
            self._running = False
            if backend is not self.backend:
                backend.close()
            self.run_dir.close()
            # memory.png beside the records, drawn after the caller has its result (importing
            # matplotlib and drawing take ~0.5 s); not a daemon: a script's exit waits for it
            self._plot_thread = threading.Thread(target=self._save_plot, name="nbflow-plot")
            self._plot_thread.start()
        if raise_on_failure and status == "failed":
            self.raise_for_status()
        return self

    def rerun(self, spec: WorkflowSpec | str | None = None, *, from_step: str | None = None,
              parameters: Mapping[str, Any] | None = None, raise_on_failure: bool = False) -> Run:
        """Run failed, cancelled and skipped steps again, and any step whose key changed.

        ``spec`` replaces the workflow (e.g. a corrected one); ``parameters``
        override its placeholders; ``from_step`` forces that step and its
        dependents to run even if their outputs are still valid.
        """
        if isinstance(spec, WorkflowSpec):
            # its parameters are what runs, so they are what the record keeps (a fix may set one)
            self.overrides = dict(spec.overrides)
            spec = spec.text if parameters else spec  # read again with the new parameters below
        if parameters:
            self.overrides.update(parameters)
        if isinstance(spec, str):
            spec = parse(spec, filename=self.spec.filename, overrides=self.overrides,
                         namespace=self.namespace)
        elif spec is None and (parameters or self.namespace is not None):
            spec = parse(self.spec.text, filename=self.spec.filename, overrides=self.overrides,
                         namespace=self.namespace)
        if spec is not None:
            self.spec = spec
        force = set()
        if from_step is not None:
            self.spec.step(from_step)  # KeyError for a step that isn't there
            force.add(from_step)
        return self.execute(force=force, raise_on_failure=raise_on_failure)

    def _save_plot(self) -> None:
        try:  # a figure never fails a run
            from nbflow.ui.plots import save_memory_plot

            save_memory_plot(self)
        except Exception as err:  # noqa: BLE001
            import warnings

            warnings.warn(f"run {self.run_id}: memory plot not saved: {err}", RuntimeWarning,
                          stacklevel=2)

    def memory_plot(self) -> Path | None:
        """``memory.png`` of the last attempt, once written (None if it could not be drawn)."""
        thread = self._plot_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        path = self.run_dir.path / "memory.png"
        return path if self._plot_thread is not None and path.exists() else None

    def cancel(self) -> None:
        """Stop starting new chunks; steps in flight are marked cancelled. Safe from any thread."""
        self._cancel.set()

    def apply_fix(self, i: int = 0, parameters: Mapping[str, Any] | None = None) -> WorkflowSpec:
        """The workflow with resolution option ``i`` applied (and ``parameters``, which the
        fix's own override); ``run.rerun(spec)`` runs it.

        The corrected text changes only what the fix changes, so every step it
        does not touch keeps its cache key and its checkpoint is reused.
        """
        fixes = self.fixes
        if not fixes:
            raise ValueError(f"run {self.run_id} has no fixes to apply: no step failed")
        if not 0 <= i < len(fixes):
            raise IndexError(f"fix {i} does not exist: this run has {len(fixes)} (0 to {len(fixes) - 1})")
        fix = fixes[i]
        if fix.workflow is None:
            raise ValueError(f"fix {i} changes your code, not the workflow: {fix.title} — "
                             f"{fix.snippet}; change it, then run.rerun()")
        return parse(fix.workflow, filename=self.spec.filename,
                     overrides={**self.overrides, **(parameters or {}), **fix.overrides}, namespace=self.namespace)

    def raise_for_status(self) -> None:
        if self.status == "failed":
            step = self.failed_step
            rec = self.state.steps.get(step) if step else None
            message = ""
            if rec is not None and rec.error:
                message = f"{rec.error.get('error_type')}: {rec.error.get('message')}"
            raise WorkflowFailed(self.run_id, step, message)

    # -- display ------------------------------------------------------------
    def summary(self) -> str:
        from nbflow.ui.text import run_summary

        return run_summary(self.state, self.spec)

    def __repr__(self) -> str:
        return f"<Run {self.run_id} {self.spec.name}: {self.status}>"

    def _ipython_display_(self) -> None:
        from IPython.display import display

        from nbflow.ui.report import summary_bundle

        if getattr(self, "_shown", False):
            self._shown = False  # the %%workflow cell already shows this run: don't repeat it
            return
        view = getattr(self, "_view", None)
        static = summary_bundle(self)
        if view is not None and view.dashboard is not None:
            from nbflow.ui.widgets import mimebundle

            view.dashboard.refresh(plot=True)
            static = mimebundle(view.dashboard, static)
        display(static, raw=True)

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(repr(self) if cycle else self.summary())


def run(workflow: WorkflowSpec | str | os.PathLike, *, parameters: Mapping[str, Any] | None = None,
        namespace: Mapping[str, Any] | None = None, store: str | os.PathLike | None = None,
        backend=None, log: bool | Observer = True, workdir: str | os.PathLike | None = None,
        raise_on_failure: bool = False, observers: list[Observer] | None = None) -> Run:
    """Run a workflow: a WorkflowSpec, YAML text, or the path of a YAML file."""
    handle = prepare(workflow, parameters=parameters, namespace=namespace, store=store,
                     backend=backend, log=log, workdir=workdir, observers=observers)
    return handle.execute(raise_on_failure=raise_on_failure)


def prepare(workflow: WorkflowSpec | str | os.PathLike, *, parameters: Mapping[str, Any] | None = None,
            namespace: Mapping[str, Any] | None = None, store: str | os.PathLike | None = None,
            backend=None, log: bool | Observer = True, workdir: str | os.PathLike | None = None,
            observers: list[Observer] | None = None) -> Run:
    """A new run, validated and recorded but not started: attach views, then ``execute()``."""
    from nbflow.actions.registry import check

    if isinstance(workflow, WorkflowSpec):
        spec = workflow
    elif isinstance(workflow, os.PathLike) or (isinstance(workflow, str) and "\n" not in workflow
                                               and workflow.endswith((".yaml", ".yml"))):
        spec = load(workflow, parameters, namespace=namespace,
                    action_check=lambda name: check(name, namespace))
    else:
        spec = parse(workflow, overrides=parameters, namespace=namespace,
                     action_check=lambda name: check(name, namespace))
    run_dir = RunStore(store).new_run(spec.name)
    state = RunState(run_dir.run_id, spec.name, spec.step_names)
    handle = Run(spec, run_dir, state, overrides=parameters, namespace=namespace, backend=backend,
                 workdir=workdir, observers=list(observers or []))
    _attach_log(handle, log)
    return handle


def latest_state(workflow: str, *, store: str | os.PathLike | None = None,
                 exclude: str | None = None) -> RunState | None:
    """The records of the most recent run of ``workflow`` in the store, if any."""
    runs = RunStore(store)
    for summary in reversed(runs.summaries()):
        if summary["workflow"] == workflow and summary["run_id"] != exclude:
            try:
                return RunState.from_dict(runs.open(summary["run_id"]).read_run())
            except (OSError, ValueError, KeyError):
                continue
    return None


def _attach_log(handle: Run, log: bool | Observer) -> None:
    if log is True:
        from nbflow.ui.log import TextLog

        handle.subscribe(TextLog(actions={s.name: s.action for s in handle.spec.steps}))
    elif callable(log):
        handle.subscribe(log)


def open_run(run_id: str | None = None, *, store: str | os.PathLike | None = None,
             namespace: Mapping[str, Any] | None = None, backend=None,
             log: bool | Observer = False) -> Run:
    """A past run from the store (in this process or after a restart), ready to show or rerun."""
    run_dir = RunStore(store).open(run_id)
    data = run_dir.read_run()
    state = RunState.from_dict(data)
    elsewhere = still_running(data)
    if state.status == "running" and not elsewhere:
        # the process that ran it died mid-run: whatever was running never finished
        state.status = "cancelled"
        for name, rec in state.steps.items():
            if rec.status in (Status.RUNNING, Status.PENDING):
                state.steps[name] = StepRecord(name, status=Status.CANCELLED, attempt=rec.attempt)
    overrides = data.get("overrides") or {}
    spec = parse(data["spec_text"], filename=data.get("filename", "workflow.yaml"),
                 overrides=overrides, namespace=namespace)
    handle = Run(spec, run_dir, state, overrides=overrides, namespace=namespace, backend=backend,
                 workdir=data.get("workdir"))
    handle.running_elsewhere = data["owner"] if elsewhere else None
    _attach_log(handle, log)
    return handle
