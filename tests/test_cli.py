"""The CLI in fresh processes: exit codes, reruns reusing checkpoints, cache invalidation, Ctrl-C."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import nbflow_cmd, subprocess_env

STEPS_MODULE = '''
import os
import time

LOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls.log")


def _log(name):
    with open(LOG, "a") as fh:
        fh.write(name + "\\n")


def count(df):
    _log("count")
    return df


def tag(df, factor=1):
    _log("tag")
    if os.path.exists("FAIL"):
        raise RuntimeError("asked to fail by the FAIL file")
    return df.assign(scaled=df.amount * factor)


def slow(df, factor=1):
    _log("slow")
    time.sleep(0.3)
    return df
'''

WORKFLOW = """\
name: cli-test
parameters: {input_path: records.csv, factor: 1}
steps:
  - name: extract
    action: data.extract
    params: {path: "{input_path}", chunk_size: 200}
  - name: count
    action: mysteps:count
    needs: extract
  - name: tag
    action: mysteps:tag
    needs: count
    params: {factor: "{factor}"}
  - name: load
    action: data.load
    needs: tag
    params: {path: out/tagged.parquet}
"""


@pytest.fixture
def project(tmp_path, records_csv):
    (tmp_path / "mysteps.py").write_text(STEPS_MODULE)
    (tmp_path / "wf.yaml").write_text(WORKFLOW)
    (tmp_path / "records.csv").write_bytes(records_csv.read_bytes())
    return tmp_path


def cli(project: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(nbflow_cmd(*args), cwd=project, capture_output=True, text=True,
                          timeout=timeout, env=subprocess_env(PYTHONPATH=f"{project}"))


def calls(project: Path) -> list[str]:
    path = project / "calls.log"
    return path.read_text().split() if path.exists() else []


def latest_run(project: Path, store: str = ".nbflow") -> dict:
    runs = sorted((project / store / "runs").iterdir())
    return json.loads((runs[-1] / "run.json").read_text())


def statuses(run: dict) -> dict[str, str]:
    return {name: rec["status"] for name, rec in run["steps"].items()}


def test_success_exits_0_and_prints_the_log(project):
    res = cli(project, "run", "wf.yaml")
    assert res.returncode == 0, res.stderr
    assert "Workflow started: cli-test" in res.stdout
    assert "Records extracted: 1,000" in res.stdout
    assert "Workflow completed successfully!" in res.stdout
    assert len(pd.read_parquet(project / "out/tagged.parquet")) == 1000


def test_failure_exits_1_then_rerun_in_a_new_process_reuses_completed_steps(project):
    (project / "FAIL").touch()
    res = cli(project, "run", "wf.yaml")
    assert res.returncode == 1
    assert "✗ tag: FAILED" in res.stdout
    assert "RuntimeError: asked to fail by the FAIL file" in res.stdout
    assert "mysteps.py:" in res.stdout  # the location of the user's line
    assert "Workflow paused - waiting for intervention" in res.stdout
    assert statuses(latest_run(project)) == {"extract": "completed", "count": "completed",
                                            "tag": "failed", "load": "skipped"}
    assert not (project / "out").exists()
    count_calls = calls(project).count("count")

    (project / "FAIL").unlink()
    res = cli(project, "rerun", "latest")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Workflow restarted (reusing: extract, count)" in res.stdout
    assert calls(project).count("count") == count_calls  # count did not execute again
    assert statuses(latest_run(project)) == {"extract": "reused", "count": "reused",
                                            "tag": "completed", "load": "completed"}
    assert len(pd.read_parquet(project / "out/tagged.parquet")) == 1000


def test_changed_parameter_or_code_invalidates_only_that_step_and_dependents(project):
    assert cli(project, "run", "wf.yaml").returncode == 0
    before = calls(project)

    res = cli(project, "rerun", "latest", "-p", "factor=3")
    assert res.returncode == 0, res.stderr
    assert statuses(latest_run(project)) == {"extract": "reused", "count": "reused",
                                            "tag": "completed", "load": "completed"}
    assert calls(project).count("count") == before.count("count")
    out = pd.read_parquet(project / "out/tagged.parquet")
    assert (out["scaled"] == out["amount"] * 3).all()

    # nothing changed: up to date, nothing runs
    recorded = latest_run(project)
    res = cli(project, "rerun", "latest")
    assert res.returncode == 0 and "is up to date" in res.stdout
    assert latest_run(project) == recorded

    # the function's code changes: its step and what follows run again
    module = project / "mysteps.py"
    module.write_text(module.read_text().replace('_log("tag")', '_log("tag")  # edited'))
    tag_calls = calls(project).count("tag")
    assert cli(project, "rerun", "latest").returncode == 0
    assert statuses(latest_run(project)) == {"extract": "reused", "count": "reused",
                                            "tag": "completed", "load": "completed"}
    assert calls(project).count("tag") > tag_calls


def _interrupted_slow_run(project: Path, **env: str) -> tuple[str, str]:
    """``nbflow run`` of the workflow with a slow step, Ctrl-C once three of its chunks began."""
    (project / "slow.yaml").write_text(WORKFLOW.replace("mysteps:tag", "mysteps:slow").replace(
        "chunk_size: 200", "chunk_size: 20"))
    proc = subprocess.Popen(nbflow_cmd("run", "slow.yaml"), cwd=project, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(PYTHONPATH=str(project), **env))
    deadline = time.time() + 60
    while time.time() < deadline and calls(project).count("slow") < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    assert "Traceback" not in err
    return out, err


def test_interrupt_exits_130_and_leaves_no_trusted_checkpoint(project):
    # one step after the other, so count is done when tag is hit
    # (a pass cancelled midway: test_executor's cancel tests)
    _interrupted_slow_run(project, NBFLOW_FUSE="0")
    run = latest_run(project)
    assert run["status"] == "cancelled"
    assert statuses(run)["tag"] == "cancelled"
    run_dir = sorted((project / ".nbflow" / "runs").iterdir())[-1]
    assert not list(run_dir.glob("checkpoints/tag-*/_nbflow.json"))
    assert list(run_dir.glob("checkpoints/count-*/_nbflow.json"))

    res = cli(project, "rerun", "latest", timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    assert statuses(latest_run(project))["tag"] == "completed"
    assert statuses(latest_run(project))["count"] == "reused"


def test_interrupt_in_a_pass_exits_130_and_leaves_no_partial_output(project):
    # extract, count, slow and the load run as one pass: the load has written parts when it stops
    out, _ = _interrupted_slow_run(project)
    assert "one pass with" in out
    assert latest_run(project)["status"] == "cancelled"
    assert not (project / "out").exists() or not list((project / "out").iterdir())


def test_a_closed_pipe_ends_the_output_quietly_and_the_run_finishes(project):
    # `nbflow run wf.yaml | head -1`: the log's reader goes away at the first line
    proc = subprocess.Popen(nbflow_cmd("run", "wf.yaml"), cwd=project, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=subprocess_env(PYTHONPATH=str(project)))
    assert b"Workflow started" in proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "no longer gets events" in err
    run = latest_run(project)
    assert run["status"] == "completed" and set(statuses(run).values()) == {"completed"}
    assert len(pd.read_parquet(project / "out" / "tagged.parquet")) == 1000
    assert not list((project / "out").glob("*.tmp-*"))


def test_invalid_workflow_exits_2_with_line_and_no_traceback(project):
    (project / "bad.yaml").write_text(textwrap.dedent("""\
        name: bad
        steps:
          - name: extract
            action: data.extract
            params: {path: records.csv}
          - name: load
            action: data.load
            needs: [extrct]
            params: {path: out.parquet}
        """))
    for command in (["run", "bad.yaml"], ["validate", "bad.yaml"]):
        res = cli(project, *command)
        assert res.returncode == 2
        assert "line 8" in res.stderr and "did you mean 'extract'" in res.stderr
        assert "Traceback" not in res.stderr
    # a parameter the action doesn't take: found before anything runs, nothing written
    (project / "typo.yaml").write_text(WORKFLOW.replace("{factor: \"{factor}\"}", "{factr: 2}"))
    for command in (["run", "typo.yaml"], ["validate", "typo.yaml"]):
        res = cli(project, *command)
        assert res.returncode == 2, res.stdout + res.stderr
        assert ("typo.yaml, line 13: step 'tag': mysteps:tag has no parameter 'factr' — did you mean "
                "'factor'?") in res.stderr and "Traceback" not in res.stderr
    assert calls(project) == [] and not list(project.glob(".nbflow/runs/*"))  # no empty run left
    assert "no runs yet" in cli(project, "runs").stdout


def test_usage_errors_exit_2(project):
    assert cli(project, "run").returncode == 2
    res = cli(project, "run", "wf.yaml", "-p", "not-a-pair")
    assert res.returncode == 2 and "key=value" in res.stderr
    res = cli(project, "show", "no-such-run")
    assert res.returncode == 2 and "no run 'no-such-run'" in res.stderr and "Traceback" not in res.stderr


def test_runs_and_show(project):
    (project / "FAIL").touch()
    cli(project, "run", "wf.yaml")
    res = cli(project, "runs")
    assert res.returncode == 0 and "cli-test" in res.stdout and "failed" in res.stdout
    res = cli(project, "show", "latest")
    assert res.returncode == 0
    assert "tag failed: RuntimeError: asked to fail" in res.stdout
    assert "Skipped because of it: load" in res.stdout
    assert "skipped: tag failed" not in res.stdout  # said once, by the root cause


def test_store_is_taken_before_or_after_the_command(project):
    from nbflow.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["runs"]).store is None
    assert parse(["--store", "a", "runs"]).store == "a"
    assert parse(["runs", "--store", "b"]).store == "b"
    assert parse(["--store", "a", "show", "latest", "--store", "b"]).store == "b"
    res = cli(project, "run", "wf.yaml", "--store", "elsewhere")
    assert res.returncode == 0, res.stderr
    assert len(list((project / "elsewhere" / "runs").iterdir())) == 1
    assert not (project / ".nbflow").exists()
    res = cli(project, "runs", "--store", "elsewhere")
    assert res.returncode == 0 and "cli-test" in res.stdout and "completed" in res.stdout
    assert "no runs yet" in cli(project, "runs").stdout


def test_a_run_in_progress_elsewhere_shows_running_and_a_killed_one_cancelled(project):
    # another process is running it: show and runs say so, and a rerun waits its turn
    (project / "slow.yaml").write_text(WORKFLOW.replace("mysteps:tag", "mysteps:slow").replace(
        "chunk_size: 200", "chunk_size: 20"))
    proc = subprocess.Popen(nbflow_cmd("run", "slow.yaml"), cwd=project, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=subprocess_env(PYTHONPATH=str(project)))
    try:
        deadline = time.time() + 60
        while time.time() < deadline and calls(project).count("slow") < 2:
            time.sleep(0.05)
        assert "running" in cli(project, "runs").stdout
        assert "RUNNING" in cli(project, "show", "latest").stdout
        res = cli(project, "rerun", "latest")
        assert res.returncode == 2 and f"still running in process {proc.pid}" in res.stderr
        assert "Traceback" not in res.stderr
    finally:
        proc.kill()  # SIGKILL: it can't record that it stopped
        proc.wait(timeout=60)
    assert latest_run(project)["status"] == "running"  # what the dead process left on record
    assert "cancelled" in cli(project, "runs").stdout
    assert "CANCELLED" in cli(project, "show", "latest").stdout
    res = cli(project, "rerun", "latest", timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    assert latest_run(project)["status"] == "completed"


def test_the_fix_the_log_names_is_a_command_that_applies_it_and_reuses_what_completed(project):
    # a schema that misspells a column: the diagnosis renames it in the workflow
    (project / "typo.yaml").write_text(WORKFLOW.replace("""  - name: tag
    action: mysteps:tag
    needs: count
    params: {factor: "{factor}"}""", """  - name: tag
    action: data.validate
    needs: count
    params: {schema: {amout: float64}}"""))
    res = cli(project, "run", "typo.yaml", "--store", "st")
    assert res.returncode == 1, res.stdout + res.stderr
    run_id = latest_run(project, "st")["run_id"]
    hints = [line.split("Apply it: ", 1)[1] for line in res.stdout.splitlines() if "Apply it: " in line]
    # the command to type here: the store it needs, this run, the fix's number as listed
    assert hints and hints[0].startswith(f"nbflow rerun --store st {run_id} --fix "), res.stdout
    number = int(hints[0].rsplit(" ", 1)[1])
    assert f"  {number}. Validate 'amount' instead of 'amout'" in cli(project, "show", "--store", "st",
                                                                       run_id).stdout
    count_calls = calls(project).count("count")

    res = subprocess.run(nbflow_cmd(*shlex.split(hints[0])[1:]), cwd=project, capture_output=True,
                         text=True, timeout=120, env=subprocess_env(PYTHONPATH=str(project)))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"fix {number} applied: Validate 'amount' instead of 'amout'" in res.stdout
    assert "Workflow restarted (reusing: extract, count)" in res.stdout
    assert calls(project).count("count") == count_calls
    assert statuses(latest_run(project, "st")) == {"extract": "reused", "count": "reused",
                                                   "tag": "completed", "load": "completed"}
    assert len(pd.read_parquet(project / "out/tagged.parquet")) == 1000
    # the corrected workflow is the run's now: printed for the user to keep, used by the next rerun
    shown = cli(project, "show", "--store", "st", run_id, "--workflow")
    assert "params: {schema: {amount: float64}}" in shown.stdout and "amout" not in shown.stdout
    assert (project / "typo.yaml").read_text().count("amout") == 1  # the user's file is untouched


def test_a_fix_that_is_not_a_workflow_change_is_refused_with_what_to_do(project):
    (project / "FAIL").touch()
    assert cli(project, "run", "wf.yaml").returncode == 1
    before = latest_run(project)
    for number, says in ((1, "changes your code, not the workflow: Fix what raises it at"),
                         (9, "there is no fix 9: run"), (0, "there is no fix 0")):
        res = cli(project, "rerun", "latest", "--fix", str(number))
        assert res.returncode == 2 and says in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
    assert latest_run(project) == before  # nothing ran, nothing recorded
    (project / "FAIL").unlink()
    assert cli(project, "run", "wf.yaml").returncode == 0
    res = cli(project, "rerun", "latest", "--fix", "1")
    assert res.returncode == 2 and "has no fixes to apply (completed" in res.stderr


def test_an_interrupted_run_names_the_command_that_continues_it():
    from nbflow.diagnose import Fix, RootCause
    from nbflow.ui import rootcause

    rc = RootCause(step="slow", error_type="RunInterrupted", message="cancelled", run_id="r-1",
                   resolution_options=(Fix(title="Rerun", kind="rerun", snippet="run.rerun()",
                                           estimate="runs slow", confidence=0.9),))
    try:
        rootcause.phrase_for_python("run")
        assert "Fix: run.rerun() — runs slow" in rootcause.render_log(rc)
        rootcause.phrase_for_shell("nbflow rerun --store 'my runs'")
        assert "Fix: nbflow rerun --store 'my runs' r-1 — runs slow" in rootcause.render_log(rc)
        assert "       nbflow rerun --store 'my runs' r-1" in rootcause.render_text(rc)
    finally:
        rootcause.phrase_for_python("run")


def test_rerunning_a_completed_run_that_is_up_to_date_runs_and_records_nothing(project):
    assert cli(project, "run", "wf.yaml").returncode == 0
    before, called = latest_run(project), calls(project)
    res = cli(project, "rerun", "latest")
    assert res.returncode == 0 and f"run {before['run_id']} is up to date" in res.stdout
    assert latest_run(project) == before and calls(project) == called
    # a newer input file is a change: the steps from extract on run again
    stamp = (project / "records.csv").stat().st_mtime + 10
    os.utime(project / "records.csv", (stamp, stamp))
    res = cli(project, "rerun", "latest")
    assert res.returncode == 0 and "Workflow restarted (reusing: nothing)" in res.stdout
    assert latest_run(project)["attempt"] == before["attempt"] + 1
