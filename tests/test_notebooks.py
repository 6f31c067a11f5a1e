"""The demo notebooks under papermill, as a scheduler would run them, and `nbflow run --notebook`.

Every run is a fresh `python -m papermill` process with an outer timeout (tests/papermill_runs.py):
the output notebook must hold the text log and the static summary, no widget, and a failed
workflow must exit non-zero with the root cause in the `%%workflow` cell's output. The
repeated-run test is the proof that scheduled runs do not hang (NBFLOW_PAPERMILL_RUNS, default 30).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
import psutil
import pytest

from papermill_runs import (
    NOTEBOOKS,
    SMALL,
    assert_headless,
    assert_summary,
    env_for,
    kill_tree,
    papermill,
    run_command,
    text_of,
    workflow_cell,
)

ALL = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
BANNER_TAG = "papermill-error-cell-tag"


# -- the committed notebooks ------------------------------------------------------------------

def test_the_three_demo_notebooks_exist():
    assert ALL == ["01-quickstart.ipynb", "02-debugging-out-of-memory.ipynb", "03-scheduled-run.ipynb"]


@pytest.mark.parametrize("name", ALL)
def test_committed_notebook_is_clean_and_parameterised(name):
    """No stale outputs, the python3 kernel, a `parameters` cell papermill can override."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), f"{name} has outputs"
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: one cell tagged 'parameters'"
    for key in SMALL[name]:
        assert f"{key} = " in tagged[0].source, f"{name}: parameter {key} is not in its parameters cell"
    assert any(c.source.startswith("%%workflow") for c in code)


def test_scheduled_notebook_documents_its_commands():
    nb = nbformat.read(NOTEBOOKS / "03-scheduled-run.ipynb", as_version=4)
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "papermill notebooks/03-scheduled-run.ipynb" in text
    assert "nbflow run --notebook notebooks/03-scheduled-run.ipynb" in text
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    for key in ("input_path", "chunk_size", "output_path"):
        assert f"{key} = " in params.source
    workflow = workflow_cell(nb).source
    for key in ("{input_path}", "{chunk_size}", "{output_path}"):
        assert key in workflow, f"the workflow does not use {key}"


# -- papermill, one notebook at a time ---------------------------------------------------------

@pytest.mark.slow
def test_quickstart_under_papermill(tmp_path):
    run = papermill(NOTEBOOKS / "01-quickstart.ipynb", tmp_path / "out.ipynb", cwd=tmp_path,
                    params=SMALL["01-quickstart.ipynb"])
    assert run.returncode == 0, run.describe()
    nb = run.nb
    assert_headless(nb)
    cell = workflow_cell(nb)
    log = text_of(cell)
    assert "Workflow started: quickstart" in log and "Workflow completed successfully" in log
    assert "Records extracted: 200,000" in log
    assert_summary(cell, "extract", "transform", "load")
    # the outputs: the head of the transformed data and the per-step records
    later = "\n".join(text_of(c) for c in nb.cells[nb.cells.index(cell) + 1:] if c.cell_type == "code")
    assert "amount" in later and "records out" in later and "completed" in later
    assert (tmp_path / "out" / "quickstart.parquet").exists()


@pytest.mark.slow
def test_scheduled_run_parameters_reach_the_workflow(tmp_path):
    params = {**SMALL["03-scheduled-run.ipynb"], "chunk_size": 50_000, "output_path": "reports/day.parquet"}
    run = papermill(NOTEBOOKS / "03-scheduled-run.ipynb", tmp_path / "out.ipynb", cwd=tmp_path,
                    params=params)
    assert run.returncode == 0, run.describe()
    nb = run.nb
    assert_headless(nb)
    cell = workflow_cell(nb)
    log = text_of(cell)
    assert "chunks of 50,000" in log and "Workflow completed successfully" in log
    html = assert_summary(cell, "extract-data", "validate-schema", "transform-data", "load-data")
    chunks = re.search(r"<b>extract-data</b>.*?(\d+)/\1<", html)
    assert chunks and int(chunks.group(1)) >= 4, "200,000 records in chunks of 50,000"
    assert (tmp_path / "reports" / "day.parquet").exists()
    assert "records written to reports/day.parquet" in text_of(nb.cells[-1])


@pytest.mark.slow
def test_failing_scheduled_run_exits_nonzero_with_the_root_cause(tmp_path):
    """The nightly file never arrived: papermill exits 1, its banner points at the %%workflow cell."""
    params = {**SMALL["03-scheduled-run.ipynb"], "input_path": "incoming/2026-01-01.csv"}
    run = papermill(NOTEBOOKS / "03-scheduled-run.ipynb", tmp_path / "out.ipynb", cwd=tmp_path,
                    params=params)
    assert run.returncode == 1, run.describe()
    assert "WorkflowFailed" in run.stderr and "PapermillExecutionError" in run.stderr
    nb = run.nb
    assert_headless(nb)
    assert BANNER_TAG in nb.cells[0].metadata.get("tags", []), "no papermill error banner"
    cell = workflow_cell(nb)
    anchor = nb.cells[nb.cells.index(cell) - 1]
    assert BANNER_TAG in anchor.metadata.get("tags", []), "the banner's anchor is not at the %%workflow cell"
    errors = [o for o in cell.outputs if o.output_type == "error"]
    assert [e.ename for e in errors] == ["WorkflowFailed"]
    assert "extract-data" in errors[0].evalue and "InputNotFound" in errors[0].evalue
    # the summary comes before the error, and it carries the root cause
    kinds = [o.output_type for o in cell.outputs]
    assert kinds.index("display_data") < kinds.index("error")
    html = assert_summary(cell, "extract-data", "load-data")
    assert "Root cause" in html or "nbflow-rootcause" in html
    assert "incoming/2026-01-01.csv" in html
    assert "skipped" in html
    # nothing after the failed cell ran
    after = nb.cells[nb.cells.index(cell) + 1:]
    assert all(c.execution_count is None for c in after if c.cell_type == "code")


@pytest.mark.slow
def test_debugging_notebook_runs_top_to_bottom(tmp_path):
    """The seed story: the in-memory transform fails (expected), the fix is applied and rerun.

    The failing cell says --no-raise: the failure is the demo, so the notebook runs to its end
    and papermill exits 0, with the failure and its root cause in that cell's output.
    """
    run = papermill(NOTEBOOKS / "02-debugging-out-of-memory.ipynb", tmp_path / "out.ipynb",
                    cwd=tmp_path, params=SMALL["02-debugging-out-of-memory.ipynb"], timeout=240)
    assert run.returncode == 0, run.describe()
    nb = run.nb
    assert_headless(nb)
    errors = [(i, o) for i, c in enumerate(nb.cells) for o in c.get("outputs", []) if o.output_type == "error"]
    assert errors == [], run.describe()
    cell = workflow_cell(nb)
    assert "--no-raise" in cell.source
    html = assert_summary(cell, "extract-data", "transform-data")
    assert "Root cause" in html or "nbflow-rootcause" in html
    assert "MemoryBudgetExceeded" in html
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "a cell did not run"
    last = text_of(code[-1])
    assert "transform-data: completed" in last, last
    assert "extract-data" in last and "validate-schema" in last  # reused, not redone


# -- nbflow run --notebook -----------------------------------------------------------------------

def nbflow_notebook(tmp_path: Path, *args: str, timeout: float = 120, env=None):
    cmd = [sys.executable, "-m", "nbflow.cli", "run", *args]
    return run_command(cmd, cwd=tmp_path, env=env or env_for(tmp_path), timeout=timeout,
                       output=tmp_path / "report.ipynb")


@pytest.mark.slow
def test_nbflow_run_notebook_exit_codes_and_report(tmp_path):
    nb03 = str(NOTEBOOKS / "03-scheduled-run.ipynb")
    ok = nbflow_notebook(tmp_path, "--notebook", nb03, "-o", "report.ipynb", "-p", "rows=200000",
                         "-p", "chunk_size=100000")
    assert ok.returncode == 0, ok.describe()
    assert "Workflow completed successfully" in ok.stdout  # the kernel's log, streamed as it runs
    assert "completed; output notebook report.ipynb" in ok.stdout
    assert_headless(ok.nb)
    assert_summary(workflow_cell(ok.nb), "load-data")

    failed = nbflow_notebook(tmp_path, "--notebook", nb03, "-o", "report.ipynb",
                             "-p", "input_path=incoming/missing.csv")
    assert failed.returncode == 1, failed.describe()
    assert "WorkflowFailed" in failed.stderr and "report.ipynb" in failed.stderr
    assert "Traceback" not in failed.stderr
    cell = workflow_cell(failed.nb)
    assert "incoming/missing.csv" in assert_summary(cell, "extract-data")
    assert [o.ename for o in cell.outputs if o.output_type == "error"] == ["WorkflowFailed"]


@pytest.mark.slow
def test_nbflow_run_notebook_usage_errors_exit_2(tmp_path):
    nb03 = str(NOTEBOOKS / "03-scheduled-run.ipynb")
    cases = {
        "no notebook": ["--notebook", "nope.ipynb"],
        "both": ["wf.yaml", "--notebook", nb03],
        "bad parameter": ["--notebook", nb03, "-p", "not-a-pair"],
        "no such kernel": ["--notebook", nb03, "-k", "no-such-kernel"],
    }
    (tmp_path / "broken.ipynb").write_text("{")
    cases["not a notebook"] = ["--notebook", "broken.ipynb"]
    for what, args in cases.items():
        res = nbflow_notebook(tmp_path, *args)
        assert res.returncode == 2, f"{what}: {res.describe()}"
        assert "Traceback" not in res.stderr, f"{what}: {res.stderr}"
    # papermill not installed: say how to get it
    fake = tmp_path / "no-papermill"
    (fake / "papermill").mkdir(parents=True)
    (fake / "papermill" / "__init__.py").write_text("raise ImportError('No module named papermill')\n")
    env = env_for(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(fake), env["PYTHONPATH"]])
    res = nbflow_notebook(tmp_path, "--notebook", nb03, env=env)
    assert res.returncode == 2 and "pip install papermill" in res.stderr, res.describe()


@pytest.mark.slow
def test_nbflow_run_notebook_interrupted_exits_130(tmp_path):
    """Ctrl-C mid-run: the kernel is interrupted and shut down, the CLI exits 130."""
    cmd = [sys.executable, "-m", "nbflow.cli", "run", "--notebook", str(NOTEBOOKS / "01-quickstart.ipynb"),
           "-o", "report.ipynb", "-p", "rows=2000000"]
    log = tmp_path / "stdout.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env_for(tmp_path), stdout=out,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while "transform: Running" not in log.read_text() and time.monotonic() < deadline:
                assert proc.poll() is None, log.read_text()
                time.sleep(0.2)
            assert "transform: Running" in log.read_text()
            kernels = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=60)
            stderr = proc.stderr.read()
        finally:
            kill_tree(proc.pid)
    assert code == 130, stderr
    assert "interrupted" in stderr
    time.sleep(1)
    alive = [pid for pid in kernels if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert not alive, f"kernel processes left running: {alive}"


# -- no hang: many scheduled runs in a row --------------------------------------------------------

@pytest.mark.slow
def test_repeated_papermill_runs_never_hang(tmp_path):
    """papermill + nbclient can wait forever after widget traffic (5 hangs in 62 runs here).

    nbflow sends none in a headless run: N runs (NBFLOW_PAPERMILL_RUNS, default 30) of the
    quickstart and the scheduled notebook, two at a time, each under a 120 s outer timeout.
    """
    runs = int(os.environ.get("NBFLOW_PAPERMILL_RUNS", "30"))
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                    "from nbflow.demo import ensure_records; ensure_records(Path(sys.argv[1]), 200_000)",
                    str(data)], check=True, env=env_for(tmp_path), timeout=120)
    plans = [("01-quickstart.ipynb", {"rows": 200_000, "data_dir": str(data)}),
             ("03-scheduled-run.ipynb", {"input_path": str(data / "records.csv"), "chunk_size": 50_000})]

    def one(i: int):
        name, params = plans[i % 2]
        cwd = tmp_path / f"run-{i:03d}"
        cwd.mkdir()
        return papermill(NOTEBOOKS / name, cwd / "out.ipynb", cwd=cwd, params=params, timeout=120)

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(one, range(runs)))
    hung = [r for r in results if r.hung]
    failed = [r for r in results if not r.hung and r.returncode != 0]
    print(f"\n{runs} papermill runs in {time.monotonic() - started:.0f}s: {len(hung)} hung, "
          f"{len(failed)} failed; slowest {max(r.seconds for r in results):.1f}s")
    assert not hung, "\n\n".join(r.describe() for r in hung)
    assert not failed, "\n\n".join(r.describe() for r in failed)
    for r in results:
        assert_headless(r.nb)
        assert "Workflow completed successfully" in text_of(workflow_cell(r.nb))


def test_outer_timeout_reports_a_hang_and_kills_the_kernel_too(tmp_path):
    """A run that never ends is reported hung, and its child (a kernel has a session of its own) dies."""
    child = "import os, time; open('child.pid', 'w').write(str(os.getpid())); time.sleep(600)"
    cmd = [sys.executable, "-c", "import subprocess, sys, time; "
           f"subprocess.Popen([sys.executable, '-c', {child!r}], start_new_session=True); time.sleep(600)"]
    run = run_command(cmd, cwd=tmp_path, env=env_for(tmp_path), timeout=3, output=tmp_path / "x.ipynb")
    assert run.hung and run.seconds < 30
    pid = int((tmp_path / "child.pid").read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
