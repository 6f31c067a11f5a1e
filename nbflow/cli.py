"""``nbflow``: run, rerun, list and show workflow runs from a terminal.

Exit codes: 0 success, 1 a step failed, 2 invalid workflow or usage, 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from nbflow.errors import NbflowError, SpecError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_PIPE = 0, 1, 2, 130, 141


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse exits 2 as well; keep one message format
        self.print_usage(sys.stderr)
        print(f"nbflow: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def parse_param(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as YAML, so ``rows=1000`` is an int (like papermill -y)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"'{text}' is not key=value (e.g. -p input_path=data/x.csv)")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, (dict, list)) and not value.strip().startswith(("{", "[")):
        parsed = value
    return key.strip(), parsed


def _params(pairs) -> dict[str, Any]:
    return dict(pairs or [])


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nbflow", description="Run notebook-first workflows in chunks on Dask.")
    store_help = "run store folder (default: $NBFLOW_HOME or ./.nbflow)"
    parser.add_argument("--store", help=store_help)
    # also after the command (`nbflow runs --store DIR`); SUPPRESS: absent there, it keeps the
    # value given before the command
    after = argparse.ArgumentParser(add_help=False)
    after.add_argument("--store", default=argparse.SUPPRESS, help=store_help)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def with_params(p):
        p.add_argument("-p", "--param", dest="params", action="append", type=parse_param, default=[],
                       metavar="KEY=VALUE", help="set a workflow parameter (repeatable)")

    p = sub.add_parser("run", parents=[after], help="run a workflow file, or a notebook with papermill")
    p.add_argument("workflow", nargs="?", help="workflow YAML file")
    with_params(p)
    p.add_argument("--scheduler", default=None,
                   help="'threads' (default), 'distributed' for a LocalCluster, or a scheduler address")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    p.add_argument("--notebook", metavar="NB.ipynb",
                   help="run this notebook with papermill instead; -p sets its parameters")
    p.add_argument("-o", "--output", metavar="OUT.ipynb",
                   help="(--notebook) the executed notebook (default: NB-output.ipynb here)")
    p.add_argument("-k", "--kernel", default=None, help="(--notebook) kernel name (default: the notebook's)")

    p = sub.add_parser("rerun", parents=[after], help="rerun a past run: failed steps and what depends on them")
    p.add_argument("run_id", nargs="?", default="latest", help="run id, a unique part of it, or 'latest'")
    with_params(p)
    p.add_argument("--from", dest="from_step", help="also rerun this step and its dependents")
    p.add_argument("--fix", type=int, metavar="N",
                   help="apply fix N of the run's diagnosis (as `nbflow show` numbers them) first")
    p.add_argument("--scheduler", default=None)

    sub.add_parser("runs", parents=[after], help="list past runs")

    p = sub.add_parser("show", parents=[after], help="show a run: steps, status, durations, records, error")
    p.add_argument("run_id", nargs="?", default="latest")
    p.add_argument("--plot", metavar="FILE.png", help="write the memory-over-time figure")
    p.add_argument("--json", action="store_true", help="print run.json")
    p.add_argument("--workflow", action="store_true",
                   help="print the workflow the run last ran (after --fix, the corrected one)")

    p = sub.add_parser("validate", parents=[after], help="check a workflow file without running it")
    p.add_argument("workflow")
    with_params(p)

    p = sub.add_parser("demo", parents=[after], help="generate demo data and run the demo pipeline on it")
    p.add_argument("--rows", type=int, default=1_000_000, help="records to generate (default 1,000,000)")
    p.add_argument("--dir", default="nbflow-demo", help="folder for data, outputs and runs")
    p.add_argument("--scenario", choices=["pipeline", "oom"], default="pipeline",
                   help="'oom': the in-memory transform over its budget, then the chunked fix")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from nbflow.ui.rootcause import phrase_for_shell

    # the diagnosis' hints name the commands to type here, with the store they need
    store = getattr(args, "store", None)
    if args.command == "demo" and not store:
        store = args.store = str(Path(args.dir) / ".nbflow")
    phrase_for_shell("nbflow rerun" + (f" --store {shlex.quote(store)}" if store else ""))
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("\ninterrupted: completed steps are kept; `nbflow rerun` continues", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SpecError as err:
        print(str(err), file=sys.stderr)
        return EXIT_USAGE
    except NbflowError as err:
        print(f"nbflow: {err}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # the reader of our output left (`nbflow runs | head`): what's unprinted goes nowhere,
        # quietly (else Python complains again when it flushes stdout at exit)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PIPE  # what a shell reports for a program stopped by SIGPIPE


def _exit_for(handle) -> int:
    return {"completed": EXIT_OK, "cancelled": EXIT_INTERRUPTED}.get(handle.status, EXIT_FAILED)


def cmd_run(args) -> int:
    if bool(args.workflow) == bool(args.notebook):
        print("nbflow run: give a workflow file or --notebook NB.ipynb (one of them)", file=sys.stderr)
        return EXIT_USAGE
    if args.notebook:
        return run_notebook(args)
    from nbflow.handle import run

    handle = run(Path(args.workflow), parameters=_params(args.params), store=args.store,
                 backend=args.scheduler, log=not args.quiet)
    print()
    print(handle.summary())
    return _exit_for(handle)


def run_notebook(args) -> int:
    """``nbflow run --notebook``: papermill, with the kernel's text log streamed to this terminal.

    Exit 1 when a cell raised (a failed ``%%workflow`` raises WorkflowFailed) or the
    kernel died; the output notebook then holds the log, the summary and the root cause.
    """
    notebook, output = Path(args.notebook), args.output or f"{Path(args.notebook).stem}-output.ipynb"
    if not notebook.is_file():
        print(f"nbflow run: no notebook at {notebook}", file=sys.stderr)
        return EXIT_USAGE
    try:
        import papermill
        from jupyter_client.kernelspec import NoSuchKernel
        from nbclient.exceptions import DeadKernelError
        from papermill.exceptions import PapermillException, PapermillExecutionError
    except ImportError as err:
        print(f"nbflow run --notebook needs papermill ({err}): pip install papermill, "
              "or nbflow's 'test' extra (pip install -e \".[test]\")", file=sys.stderr)
        return EXIT_USAGE
    if args.store:  # the kernel inherits this process's environment
        os.environ["NBFLOW_HOME"] = str(Path(args.store).resolve())
    # nothing renders widgets here; the kernel would tell so by itself, this makes it certain
    os.environ.setdefault("NBFLOW_WIDGETS", "0")
    try:
        papermill.execute_notebook(str(notebook), str(output), parameters=_params(args.params),
                                   kernel_name=args.kernel, progress_bar=False,
                                   stdout_file=sys.stdout, stderr_file=sys.stderr)
    except PapermillExecutionError as err:
        print(f"\nnbflow run: {notebook} failed in cell [{err.exec_count}]: {err.ename}: {err.evalue}\n"
              f"the output notebook {output} shows the log and the cause", file=sys.stderr)
        return EXIT_FAILED
    except DeadKernelError as err:
        print(f"\nnbflow run: the kernel died running {notebook} ({err}); see {output}", file=sys.stderr)
        return EXIT_FAILED
    except (NoSuchKernel, PapermillException, ValueError) as err:  # ValueError: not a notebook
        print(f"nbflow run: cannot run {notebook}: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(f"\nnbflow run: {notebook} completed; output notebook {output}")
    return EXIT_OK


def cmd_rerun(args) -> int:
    from nbflow.handle import open_run

    handle = open_run(args.run_id, store=args.store, backend=args.scheduler, log=True)
    params, spec = _params(args.params), None
    if handle.status == "completed" and not (params or args.fix or args.from_step) and _up_to_date(handle):
        print(f"run {handle.run_id} is up to date: every step's saved output still matches its "
              "workflow, code and input files, so nothing reruns (--from STEP runs a step and "
              "those after it again)")
        return EXIT_OK
    if args.fix is not None:
        spec = _fixed(handle, args.fix, params)
        if spec is None:
            return EXIT_USAGE
        print(f"fix {args.fix} applied: {handle.fixes[args.fix - 1].title}; "
              f"`nbflow show {handle.run_id} --workflow` prints the corrected workflow\n")
    handle.rerun(spec, parameters=None if spec is not None else params or None, from_step=args.from_step)
    print()
    print(handle.summary())
    return _exit_for(handle)


def _up_to_date(handle) -> bool:
    from nbflow.plan import make_plan

    try:
        return not make_plan(handle.spec, previous=handle.state, workdir=handle.workdir).to_run
    except Exception:  # noqa: BLE001 — the rerun itself will say what is wrong
        return False


def _fixed(handle, number: int, params: dict):
    """The run's workflow with fix ``number`` applied, or None after saying why not."""
    from nbflow.ui.rootcause import fix_refusal

    problem = fix_refusal(handle, number)
    if problem:
        print(f"nbflow rerun: {problem}", file=sys.stderr)
        return None
    return handle.apply_fix(number - 1, params)  # -p goes with the fix; the fix's own parameters win


def cmd_runs(args) -> int:
    from nbflow.store import RunStore
    from nbflow.ui.text import runs_table

    print(runs_table(RunStore(args.store).summaries()))
    return EXIT_OK


def cmd_show(args) -> int:
    from nbflow.handle import open_run

    handle = open_run(args.run_id, store=args.store)
    if args.json:
        print(json.dumps(handle.run_dir.read_run(), indent=1))
    elif args.workflow:  # (a %%workflow cell's text starts with a newline: its line numbers are the cell's)
        text = handle.spec.text.removeprefix("\n") if handle.spec.filename == "%%workflow cell" else handle.spec.text
        print(text, end="" if text.endswith("\n") else "\n")
    else:
        print(handle.summary())
    if args.plot:
        from nbflow.ui.plots import save_memory_plot

        path = save_memory_plot(handle, args.plot)
        print(f"\nmemory plot written to {path}")
    return EXIT_OK


def cmd_validate(args) -> int:
    from nbflow.actions.registry import check
    from nbflow.plan import make_plan
    from nbflow.spec import load

    spec = load(args.workflow, _params(args.params), action_check=check)
    plan = make_plan(spec)
    print(f"{args.workflow}: valid — {len(plan.order)} steps: {' → '.join(plan.order)}")
    return EXIT_OK


def cmd_demo(args) -> int:
    from nbflow.demo import run_demo

    return run_demo(rows=args.rows, folder=Path(args.dir), scenario=args.scenario, store=args.store)


_COMMANDS = {"run": cmd_run, "rerun": cmd_rerun, "runs": cmd_runs, "show": cmd_show,
             "validate": cmd_validate, "demo": cmd_demo}

if __name__ == "__main__":
    sys.exit(main())

__all__ = ["main", "parse_param"]
