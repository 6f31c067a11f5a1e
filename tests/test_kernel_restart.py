"""A failed run is rerun from the store in a new kernel: what completed is reused."""
from __future__ import annotations

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_notebook

from conftest import ROOT

pytestmark = pytest.mark.slow

WORKFLOW = """%%workflow --name first
name: restart-test
steps:
  - name: extract
    action: data.extract
    params: {path: records.csv, chunk_size: 250}
  - name: positive
    action: positive
    needs: extract
"""


def _execute(cells: list[str], cwd, allow_errors: bool = False) -> nbformat.NotebookNode:
    nb = new_notebook(cells=[new_code_cell(src) for src in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    client = NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=allow_errors,
                            resources={"metadata": {"path": str(cwd)}})
    client.execute(env={"PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"})
    return nb


def _text(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") or "".join(o.get("data", {}).get("text/plain", "")))
            out.extend(o.get("traceback", []))
    return "\n".join(out)


def test_rerun_after_a_kernel_restart_reuses_completed_steps(tmp_path, records_csv):
    (tmp_path / "records.csv").write_bytes(records_csv.read_bytes())
    first = _execute([
        "%load_ext nbflow",
        "def positive(df):\n    raise ValueError('not written yet')",
        WORKFLOW,
    ], tmp_path, allow_errors=True)
    text = _text(first)
    assert "positive: FAILED" in text and "WorkflowFailed" in text

    # a new kernel: nothing in memory but the run store on disk
    second = _execute([
        "%load_ext nbflow",
        "def positive(df):\n    return df[df.amount > 0]",
        "run = %workflow rerun latest\n"
        "print({name: rec.status.value for name, rec in run.records.items()})\n"
        "print(len(run.outputs['positive'].compute()))",
    ], tmp_path)
    text = _text(second)
    assert "Workflow restarted (reusing: extract)" in text
    assert "{'extract': 'reused', 'positive': 'completed'}" in text
    import pandas as pd
    expected = int((pd.read_csv(records_csv)["amount"] > 0).sum())
    assert f"\n{expected}" in text
