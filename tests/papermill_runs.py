"""Run a notebook under papermill in a fresh process, always under an outer timeout.

papermill/nbclient can wait forever on an idle kernel (see the notes on widget traffic), so
a test never calls papermill without a deadline: on timeout the papermill process and its
kernel are killed and the run is reported as hung, with whatever it printed.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nbformat
import psutil

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
#: small enough for CI, large enough that every step has several chunks
SMALL = {
    "01-quickstart.ipynb": {"rows": 200_000},
    # the in-memory transform peaks ~330 MB above its baseline at 300,000 rows; chunked ~70 MB
    "02-debugging-out-of-memory.ipynb": {"rows": 300_000, "max_memory": "256MB"},
    "03-scheduled-run.ipynb": {"rows": 200_000},
}


@dataclass
class NotebookRun:
    output: Path
    returncode: int | None  # None: it hung and was killed
    stdout: str
    stderr: str
    seconds: float

    @property
    def hung(self) -> bool:
        return self.returncode is None

    @property
    def nb(self) -> nbformat.NotebookNode:
        return nbformat.read(self.output, as_version=4)

    def describe(self) -> str:
        what = "hung (killed)" if self.hung else f"exit {self.returncode}"
        return (f"{self.output.name}: {what} after {self.seconds:.0f}s\n"
                f"--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-3000:]}")


def env_for(cwd: Path, python_path: bool = True, **extra: str) -> dict[str, str]:
    """The environment of a headless run: the run store inside ``cwd``, Agg for matplotlib."""
    env = dict(os.environ)
    env.pop("NBFLOW_WIDGETS", None)  # the kernel must find out by itself that nothing renders widgets
    if python_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["NBFLOW_HOME"] = str(cwd / ".nbflow")
    env["MPLBACKEND"] = "Agg"
    env.update(extra)
    return env


def run_command(cmd: Sequence[str], *, cwd: Path, env: Mapping[str, str], timeout: float,
                output: Path) -> NotebookRun:
    """Run ``cmd`` in its own session; on timeout kill it and every process it started."""
    started = time.monotonic()
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=dict(env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        code = None
    return NotebookRun(output, code, out, err, time.monotonic() - started)


def kill_tree(pid: int) -> None:
    """The process and its descendants; a kernel runs in a session of its own, so killpg misses it."""
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def papermill(notebook: Path, output: Path, *, cwd: Path, params: Mapping[str, object] | None = None,
              timeout: float = 120, python: str = sys.executable, env: Mapping[str, str] | None = None,
              kernel: str = "python3") -> NotebookRun:
    """``python -m papermill NB OUT -k KERNEL -p key value ...`` with ``cwd`` as the kernel's folder."""
    cmd = [python, "-m", "papermill", str(notebook), str(output), "-k", kernel, "--cwd", str(cwd),
           "--no-progress-bar"]
    for key, value in (params or {}).items():
        cmd += ["-p", key, str(value)]
    run = run_command(cmd, cwd=cwd, env=env or env_for(cwd), timeout=timeout, output=output)
    if not run.hung and run.returncode != 0 and KERNEL_START_FAILED in run.stderr:
        # jupyter_client picks the kernel's TCP ports by binding and releasing them, so two
        # kernels starting at the same moment can race for one and the loser dies before any
        # cell (nbflow included) ran: start that one again, once, and say so
        print(f"{output}: the kernel died while starting; starting it again", file=sys.stderr)
        run = run_command(cmd, cwd=cwd, env=env or env_for(cwd), timeout=timeout, output=output)
    return run


KERNEL_START_FAILED = "Kernel died before replying to kernel_info"


def outputs(nb: nbformat.NotebookNode) -> Iterator[tuple[int, nbformat.NotebookNode, dict]]:
    """(cell index, cell, output) for every output of every code cell."""
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            yield i, cell, out


def workflow_cell(nb: nbformat.NotebookNode, nth: int = 0) -> nbformat.NotebookNode:
    return [c for c in nb.cells if c.cell_type == "code" and c.source.startswith("%%workflow")][nth]


def text_of(cell: nbformat.NotebookNode) -> str:
    """Everything a reader sees in a cell's output: streams, text/plain and HTML, error lines."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type == "error":
            parts.append(f"{out.ename}: {out.evalue}")
        else:
            parts += [out.data.get("text/plain", ""), out.data.get("text/html", "")]
    return "\n".join(parts)


def summary_html(cell: nbformat.NotebookNode) -> str:
    """The static summary's HTML in a cell's output ('' if it has none)."""
    for out in cell.get("outputs", []):
        html = out.get("data", {}).get("text/html", "")
        if "nbflow-report" in html:
            return html
    return ""


def assert_headless(nb: nbformat.NotebookNode) -> None:
    """No widget in any output, and no widget state saved: nothing was sent to a widget manager."""
    widgets = [(i, out.output_type) for i, _, out in outputs(nb) if WIDGET_MIME in out.get("data", {})]
    assert not widgets, f"widget outputs in a headless run: {widgets}"
    assert "widgets" not in nb.metadata, "the kernel opened widget comms in a headless run"


def assert_summary(cell: nbformat.NotebookNode, *steps: str) -> str:
    """The static summary: a step table naming ``steps`` and the memory plot as an embedded PNG."""
    html = summary_html(cell)
    assert html, f"no static summary in the cell's output:\n{text_of(cell)[:2000]}"
    assert "<table class='nbflow-steps'>" in html
    for step in steps:
        assert f"<b>{step}</b>" in html, f"step {step} missing from the summary table"
    has_png = "data:image/png;base64," in html or any(
        "image/png" in out.get("data", {}) for out in cell.get("outputs", []))
    assert has_png, "no memory plot (PNG) in the summary"
    return html
