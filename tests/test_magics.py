"""%%workflow and %workflow through a real IPython shell (IPython.testing.globalipapp)."""
from __future__ import annotations

import textwrap

import pytest
from IPython.core.error import UsageError
from IPython.testing import globalipapp

import nbflow
from nbflow.state import Status

WF = textwrap.dedent("""\
    name: magic-test
    parameters: {input_path: missing.csv, threshold: 0}
    steps:
      - name: extract
        action: data.extract
        params: {path: "{input_path}", chunk_size: 300}
      - name: keep
        action: keep_above
        needs: extract
        params: {threshold: "{threshold}"}
    """)


@pytest.fixture
def ip(workdir, records_csv, monkeypatch):
    monkeypatch.setenv("NBFLOW_WIDGETS", "0")
    (workdir / "records.csv").write_bytes(records_csv.read_bytes())
    shell = globalipapp.get_ipython()  # the module swaps in the shell's own after the first call
    shell.run_line_magic("load_ext", "nbflow")
    shell.run_cell("def keep_above(df, threshold=0):\n    return df[df.amount > threshold]\n"
                   "input_path = 'records.csv'")
    yield shell
    for name in ("keep_above", "input_path", "threshold", "workflow_run", "r2"):
        shell.user_ns.pop(name, None)


def test_namespace_function_and_notebook_variable(ip, capsys):
    run = ip.run_cell_magic("workflow", "", WF)
    assert isinstance(run, nbflow.Run)
    assert ip.user_ns["workflow_run"] is run
    assert run.status == "completed"
    assert run.spec.parameters["input_path"] == "records.csv"  # from the notebook, not the default
    out = run.outputs["keep"].compute()
    assert len(out) > 0 and (out["amount"] > 0).all()
    printed = capsys.readouterr().out
    assert "Workflow started: magic-test" in printed and "Workflow completed successfully" in printed


def test_param_option_wins_over_notebook_variable_and_name_binds(ip):
    ip.user_ns["threshold"] = 1000  # would keep nothing
    run = ip.run_cell_magic("workflow", "--name r2 -p threshold=50 --fresh", WF)
    assert ip.user_ns["r2"] is run
    assert run.spec.parameters["threshold"] == 50
    assert (run.outputs["keep"].compute()["amount"] > 50).all()


def test_rerunning_the_cell_reuses_and_edited_function_invalidates(ip):
    first = ip.run_cell_magic("workflow", "", WF)
    again = ip.run_cell_magic("workflow", "", WF)
    assert again.run_id != first.run_id
    assert {n: r.status for n, r in again.records.items()} == {"extract": Status.REUSED,
                                                               "keep": Status.REUSED}
    # the user edits the function in another cell: only its step runs again
    ip.run_cell("def keep_above(df, threshold=0):\n    return df[df.amount > threshold + 10]\n")
    third = ip.run_cell_magic("workflow", "", WF)
    assert third.records["extract"].status is Status.REUSED
    assert third.records["keep"].status is Status.COMPLETED
    assert (third.outputs["keep"].compute()["amount"] > 10).all()


def test_dry_run_shows_plan_and_runs_nothing(ip):
    ip.run_cell_magic("workflow", "", WF)
    plan = ip.run_cell_magic("workflow", "--dry-run", WF)
    text = repr(plan)
    assert "1. extract [data.extract] reuse saved output" in text
    assert "2. keep [keep_above ← extract] reuse saved output" in text
    assert "input_path='records.csv'" in text
    from nbflow.store import RunStore
    assert len(RunStore().run_ids()) == 1  # the dry run recorded no run


def test_spec_error_is_one_message_without_traceback(ip, capsys):
    result = ip.run_cell("%%workflow\nname: bad\nsteps:\n  - name: a\n    acton: data.extract\n")
    assert not result.success
    err = capsys.readouterr()
    text = err.out + err.err
    assert "%%workflow cell, line 5, column 5: step 'a' has unknown key 'acton'" in text
    assert "did you mean 'action'" in text
    assert "Traceback" not in text and "nbflow/spec.py" not in text


def test_failure_raises_workflow_failed_in_text_mode(ip, capsys):
    ip.run_cell("def keep_above(df, threshold=0):\n    return df['nope']\n")
    result = ip.run_cell("%%workflow --fresh\n" + WF)
    assert isinstance(result.error_in_exec, nbflow.WorkflowFailed)
    text = capsys.readouterr().out
    assert "keep failed: KeyError" in text  # the summary was shown before the error
    assert ip.user_ns["workflow_run"].status == "failed"
    assert "Traceback" not in text


def test_usage_errors(ip):
    with pytest.raises(UsageError, match="key=value"):
        ip.run_cell_magic("workflow", "-p nonsense", WF)
    with pytest.raises(UsageError, match="unknown command"):
        ip.run_line_magic("workflow", "explode")


def test_line_magics_runs_show_rerun(ip, capsys):
    ip.run_cell("def keep_above(df, threshold=0):\n    raise ValueError('not yet')\n")
    ip.run_cell("%%workflow --fresh --no-raise\n" + WF)
    failed = ip.user_ns["workflow_run"]
    assert failed.status == "failed"
    ip.run_line_magic("workflow", "runs")
    assert failed.run_id in capsys.readouterr().out
    ip.run_line_magic("workflow", f"show {failed.run_id}")
    assert "keep failed: ValueError: not yet" in capsys.readouterr().out
    # fix the function, then rerun from the store: a new handle, as after a kernel restart
    ip.run_cell("def keep_above(df, threshold=0):\n    return df\n")
    rerun = ip.run_line_magic("workflow", f"rerun {failed.run_id}")
    assert rerun is not failed and rerun.run_id == failed.run_id
    assert rerun.status == "completed"
    assert rerun.records["extract"].status is Status.REUSED
    assert rerun.records["keep"].status is Status.COMPLETED



def test_line_magic_rerun_applies_a_fix_by_its_number(ip, capsys):
    # keep's threshold given as text: the diagnosis offers the number in the workflow
    ip.run_cell("def keep_above(df, threshold=0):\n    return df[df.amount > threshold]\n")
    ip.run_cell("%%workflow --fresh --no-raise\n" + WF.replace('threshold: "{threshold}"', "threshold: '50'"))
    failed = ip.user_ns["workflow_run"]
    assert failed.status == "failed"
    number = next(i for i, fix in enumerate(failed.fixes, 1) if fix.workflow is not None)
    # the log's hint names the variable the run is bound to
    assert f"Apply it: workflow_run.rerun(workflow_run.apply_fix({number - 1}))" in capsys.readouterr().out
    with pytest.raises(UsageError, match="there is no fix 99"):
        ip.run_line_magic("workflow", f"rerun {failed.run_id} --fix 99")
    rerun = ip.run_line_magic("workflow", f"rerun {failed.run_id} --fix {number}")
    assert rerun.status == "completed", rerun.summary()
    assert rerun.records["extract"].status is Status.REUSED
    assert "threshold: 50}" in rerun.spec.text
    assert (rerun.outputs["keep"].compute()["amount"] > 50).all()

def test_widget_decision():
    from nbflow.magics import renders_widgets

    class Kernel:
        def __init__(self, metadata):
            self.metadata = metadata

        def get_parent(self):
            return {"header": {}, "metadata": self.metadata}

    class Shell:
        def __init__(self, kernel=None):
            self.kernel = kernel

    import os
    old = os.environ.pop("NBFLOW_WIDGETS", None)
    try:
        assert renders_widgets(Shell(Kernel({"cellId": "x", "recordTiming": False})))  # JupyterLab
        assert not renders_widgets(Shell(Kernel({})))  # papermill / nbclient
        assert not renders_widgets(Shell())  # terminal IPython
        assert not renders_widgets(Shell(Kernel({"cellId": "x"})), no_widgets=True)
        os.environ["NBFLOW_WIDGETS"] = "0"
        assert not renders_widgets(Shell(Kernel({"cellId": "x"})))
        os.environ["NBFLOW_WIDGETS"] = "1"
        assert renders_widgets(Shell(Kernel({})))
    finally:
        os.environ.pop("NBFLOW_WIDGETS", None)
        if old is not None:
            os.environ["NBFLOW_WIDGETS"] = old
