"""``%%workflow`` and ``%workflow``: run, rerun and inspect workflows from a notebook.

The magic parses its options with IPython's magic_arguments, fills the
workflow's placeholders from the notebook's variables, resolves actions from
its functions, and shows the run with the widget dashboard where the front end
renders widgets, or with the text log where it does not (papermill, nbconvert,
a terminal). Either way the cell's output ends with a static summary that reads
without a kernel.
"""
from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display, update_display

from nbflow.errors import NbflowError, WorkflowFailed

#: NBFLOW_WIDGETS=0 never sends widgets, =1 always does; unset: decided per cell
WIDGETS_ENV = "NBFLOW_WIDGETS"


def renders_widgets(shell, no_widgets: bool = False) -> bool:
    """Whether the front end that sent this cell will render widgets.

    A kernel cannot ask its front end, but it sees each request: JupyterLab,
    Notebook 7 and VS Code annotate execute requests with metadata (cellId,
    recordTiming, ...), while papermill and nbclient send none. Headless runners
    get the text log and no widget traffic at all — widget messages in a
    papermill run can leave it waiting forever on an idle kernel.
    """
    if no_widgets:
        return False
    setting = os.environ.get(WIDGETS_ENV, "").strip().lower()
    if setting in ("0", "false", "no", "off", "text"):
        return False
    kernel = getattr(shell, "kernel", None)
    if kernel is None:  # terminal IPython
        return False
    if setting in ("1", "true", "yes", "on", "widgets"):
        return True
    try:
        parent = kernel.get_parent()
    except Exception:  # noqa: BLE001 — no request to judge by: play safe
        return False
    return bool((parent or {}).get("metadata"))


def _show_error(shell, etype, value, tb, tb_offset=None):
    """nbflow's own errors say what and where in one message: no traceback of our internals."""
    shell.showtraceback((etype, value, tb), exception_only=True)


class LiveView:
    """What the magic attaches to a run: the dashboard or the text log, and the final summary."""

    def __init__(self, run, widgets: bool):
        self.run = run
        self.widgets = widgets
        self.dashboard = None
        self.display_id = uuid.uuid4().hex
        if widgets:
            from nbflow.ui.widgets import Dashboard

            self.dashboard = Dashboard(run)
        else:
            from nbflow.ui.log import TextLog

            run.subscribe(TextLog(sys.stdout, actions={s.name: s.action for s in run.spec.steps}))
        run._view = self

    def start(self) -> None:
        if self.dashboard is not None:
            from nbflow.ui.widgets import mimebundle

            bundle = mimebundle(self.dashboard, {"text/plain": f"{self.run!r} (running)",
                                                 "text/html": "<i>nbflow: running…</i>"})
            display(bundle, raw=True, display_id=self.display_id)

    def finish(self) -> None:
        """Show the final state: the live display becomes dashboard + static summary."""
        if self.dashboard is not None:
            from nbflow.ui.report import summary_bundle

            static = summary_bundle(self.run)
            from nbflow.ui.widgets import mimebundle

            self.dashboard.refresh(plot=True)
            update_display(mimebundle(self.dashboard, static), raw=True, display_id=self.display_id)
        else:
            # headless: the table and the diagnosis as HTML, the plot as an image/png output of
            # its own (viewers that strip data: images from HTML still show it)
            from nbflow.ui.report import plot_bundle, run_png, summary_bundle

            png = run_png(self.run)
            display(summary_bundle(self.run, png=False), raw=True)
            image = plot_bundle(png)
            if image is not None:
                display(image, raw=True)


@magics_class
class WorkflowMagics(Magics):
    def __init__(self, shell):
        super().__init__(shell)
        shell.set_custom_exc((NbflowError,), _show_error)

    @magic_arguments()
    @argument("command", nargs="*", help="(line magic) runs | show [RUN_ID] | rerun [RUN_ID]")
    @argument("--name", default="workflow_run", help="variable the run handle is bound to")
    @argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
              help="set a workflow parameter (wins over notebook variables)")
    @argument("--dry-run", action="store_true", help="show the plan without running")
    @argument("--no-widgets", action="store_true", help="text log and static summary only")
    @argument("--store", default=None, help="run store folder (default $NBFLOW_HOME or ./.nbflow)")
    @argument("--fresh", action="store_true",
              help="don't reuse saved outputs of earlier runs of this workflow")
    @argument("--raise", dest="raise_", action="store_true", default=None,
              help="raise WorkflowFailed when a step fails (default: when no widgets are shown)")
    @argument("--no-raise", dest="raise_", action="store_false")
    @argument("--from", dest="from_step", default=None, help="(rerun) also rerun this step and after")
    @argument("--fix", type=int, default=None, metavar="N", help="(rerun) apply the diagnosis' fix N first")
    @line_cell_magic
    def workflow(self, line: str, cell: str | None = None):
        """Run the workflow in the cell: ``%%workflow [--name VAR] [-p key=value] [--dry-run] ...``

        As a line magic: ``%workflow runs``, ``%workflow show [RUN_ID]``,
        ``%workflow rerun [RUN_ID] [--from STEP] [--fix N]``.
        """
        try:
            args = parse_argstring(self.workflow, line)
        except UsageError:
            raise
        except SystemExit as err:  # argparse's own exit on a bad option
            raise UsageError(f"%%workflow: bad options: {line!r}") from err
        params = self._params(args.param)
        from nbflow.ui.rootcause import phrase_for_python

        phrase_for_python(args.name)  # the hints name the variable the run is bound to
        if cell is None:
            return self._line(args, params)
        if args.command:
            raise UsageError(f"%%workflow takes options only, not {' '.join(args.command)!r} — "
                             "the workflow goes in the cell body")
        return self._cell(args, params, cell)

    # -- helpers -------------------------------------------------------------
    @staticmethod
    def _params(pairs: list[str]) -> dict:
        from nbflow.cli import parse_param

        params = {}
        for text in pairs:
            try:
                key, value = parse_param(text)
            except Exception as err:  # argparse.ArgumentTypeError
                raise UsageError(str(err)) from None
            params[key] = value
        return params

    def _cell(self, args, params: dict, cell: str):
        from nbflow.actions.registry import check
        from nbflow.handle import latest_state, prepare
        from nbflow.plan import make_plan
        from nbflow.spec import parse

        ns = self.shell.user_ns
        # a leading newline: the YAML's line numbers become the cell's (line 1 is %%workflow)
        spec = parse("\n" + cell, filename="%%workflow cell", overrides=params, namespace=ns,
                     action_check=lambda name: check(name, ns))
        previous = None if args.fresh else latest_state(spec.name, store=args.store)
        if args.dry_run:
            plan = make_plan(spec, namespace=ns, previous=previous, workdir=Path.cwd())
            return DryRun(plan)
        widgets = renders_widgets(self.shell, args.no_widgets)
        run = prepare(spec, parameters=params, namespace=ns, store=args.store, log=False)
        ns[args.name] = run
        return self._execute(run, widgets, args.raise_,
                             lambda: run.execute(previous=previous))

    def _execute(self, run, widgets: bool, raise_: bool | None, go):
        view = LiveView(run, widgets)
        view.start()
        try:
            go()
        finally:
            view.finish()
        should_raise = (not widgets) if raise_ is None else raise_
        if run.status == "failed" and should_raise:
            run.raise_for_status()
        # only a returned run is the cell's result: mark it so it isn't shown twice (set before a
        # raise, the flag would swallow the next display of the run, e.g. `workflow_run.rerun()`)
        run._shown = True
        return run

    def _line(self, args, params: dict):
        from nbflow.handle import open_run
        from nbflow.store import RunStore
        from nbflow.ui.report import summary_bundle
        from nbflow.ui.text import runs_table

        command, *rest = args.command or ["runs"]
        run_id = rest[0] if rest else "latest"
        if command == "runs":
            print(runs_table(RunStore(args.store).summaries()))
            return None
        if command == "show":
            display(summary_bundle(open_run(run_id, store=args.store)), raw=True)
            return None
        if command == "rerun":
            ns = self.shell.user_ns
            run = open_run(run_id, store=args.store, namespace=ns)
            spec = None
            if args.fix is not None:  # numbered from 1, as the root cause lists them
                from nbflow.ui.rootcause import fix_refusal

                if problem := fix_refusal(run, args.fix):
                    raise UsageError(f"%workflow rerun --fix {args.fix}: {problem}")
                spec = run.apply_fix(args.fix - 1, params)
            ns[args.name] = run
            widgets = renders_widgets(self.shell, args.no_widgets)
            return self._execute(run, widgets, args.raise_, lambda: run.rerun(
                spec, parameters=None if spec is not None else params or None, from_step=args.from_step))
        raise UsageError(f"%workflow {command}: unknown command — use runs, show [RUN_ID] or rerun [RUN_ID]")


class DryRun:
    """``%%workflow --dry-run``: the order, what would be reused, the resolved parameters."""

    def __init__(self, plan):
        self.plan = plan

    def lines(self) -> list[str]:
        plan = self.plan
        out = [f"{plan.workflow.name}: {len(plan.order)} steps (dry run, nothing executed)"]
        for i, name in enumerate(plan.order, 1):
            p = plan.steps[name]
            what = "reuse saved output" if p.reuse else "run"
            needs = f" ← {', '.join(p.spec.needs)}" if p.spec.needs else ""
            mode = "streaming" if p.streaming else "in memory"
            out.append(f"  {i}. {name} [{p.spec.action}{needs}] {what}; {mode}, chunk_size {p.chunk_size}")
        if plan.workflow.parameters:
            out.append("parameters: " + ", ".join(f"{k}={v!r}" for k, v in plan.workflow.parameters.items()))
        return out

    def __repr__(self) -> str:
        return "\n".join(self.lines())

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(repr(self))


def load(ip) -> None:
    ip.register_magics(WorkflowMagics)


__all__ = ["WorkflowMagics", "renders_widgets", "load", "WorkflowFailed"]
