"""The dashboard in-process: its widgets follow the run's records, its buttons call Run methods."""
from __future__ import annotations

import threading
import time

import pytest

import nbflow
import nbflow.events
from nbflow.handle import prepare
from nbflow.state import Status
from nbflow.ui.widgets import Dashboard

WF = """\
name: widget-test
steps:
  - name: extract
    action: data.extract
    params: {path: records.csv, chunk_size: 200}
  - name: tag
    action: tag
    needs: extract
  - name: after
    action: passthrough
    needs: tag
"""

BEHAVIOUR = {"fail": True, "slow": 0.0}


def tag(df):
    if BEHAVIOUR["fail"]:
        raise ValueError("<b>bad</b> & unescaped")
    time.sleep(BEHAVIOUR["slow"])
    return df.assign(tag=1)


def passthrough(df):
    return df


NS = {"tag": tag, "passthrough": passthrough}


@pytest.fixture
def failed(workdir, records_csv):
    (workdir / "records.csv").write_bytes(records_csv.read_bytes())
    BEHAVIOUR.update(fail=True, slow=0.0)
    run = prepare(WF, namespace=NS, log=False)
    dash = Dashboard(run, background=False)
    run.execute()
    yield run, dash
    dash.close()


def test_rows_follow_the_records_and_escape_strings(failed):
    run, dash = failed
    assert run.status == "failed"
    assert "failed" in dash.rows["tag"].status.value
    assert "nbflow-step-failed" in dash.rows["tag"].box._dom_classes
    assert "nbflow-step-skipped" in dash.rows["after"].box._dom_classes
    assert dash.rows["extract"].progress.value == 1
    assert "1,000 records" in dash.rows["extract"].figures.value
    # a skipped step never ran: its reason, not a row of dashes
    skipped = dash.rows["after"].figures.value
    assert "skipped: tag failed" in skipped and "- records" not in skipped and "peak -" not in skipped
    assert "<b>bad</b>" not in dash.rows["tag"].figures.value
    assert "&lt;b&gt;bad&lt;/b&gt; &amp; unescaped" in dash.rows["tag"].figures.value
    assert "&lt;b&gt;bad&lt;/b&gt;" in dash.root_cause.value and "<b>bad</b>" not in dash.root_cause.value
    assert "FAILED" in dash.header.value and run.run_id in dash.header.value
    assert dash.plot.value[:8] == b"\x89PNG\r\n\x1a\n"
    assert not dash.rerun_button.disabled and dash.cancel_button.disabled
    # the fix is a change to the user's code: said so, with no button that could not apply it
    assert dash.fix_buttons == []
    [code_fix] = dash.fixes_box.children
    assert "Fix 1</b> (in your code): Fix what raises it at" in code_fix.value


def test_rerun_button_reruns_failed_steps_and_shows_reuse(failed):
    run, dash = failed
    BEHAVIOUR["fail"] = False
    dash.rerun_button.click()
    assert run.status == "completed"
    assert run.records["extract"].status is Status.REUSED
    assert run.records["tag"].status is Status.COMPLETED
    assert "reused" in dash.rows["extract"].status.value
    reused = dash.rows["extract"].figures.value  # its records, not this attempt's time or memory
    assert "1,000 records" in reused and "saved output reused" in reused and "peak" not in reused
    assert "nbflow-step-completed" in dash.rows["after"].box._dom_classes
    assert dash.rerun_button.disabled  # nothing left to rerun
    assert dash.root_cause.value == ""


def test_rerun_from_step_forces_that_step_and_after(failed):
    run, dash = failed
    BEHAVIOUR["fail"] = False
    dash.rerun_button.click()
    dash.from_step.value = "tag"
    dash.from_button.click()
    assert run.records["extract"].status is Status.REUSED
    assert run.records["tag"].status is Status.COMPLETED
    assert run.records["after"].status is Status.COMPLETED
    assert run.state.attempt == 3


def test_cancel_button_stops_a_background_rerun(failed):
    run, dash = failed
    BEHAVIOUR.update(fail=False, slow=0.3)
    dash.background = True
    dash.rerun_button.click()  # returns at once: the rerun goes on in a thread
    deadline = time.time() + 20
    while run.records["tag"].status is not Status.RUNNING and time.time() < deadline:
        time.sleep(0.02)
    assert dash.rerun_button.disabled and not dash.cancel_button.disabled
    dash.cancel_button.click()
    dash.wait(30)
    assert run.status == "cancelled"
    assert run.records["tag"].status is Status.CANCELLED
    assert not dash.rerun_button.disabled  # a cancelled step can be rerun


def test_dashboard_updates_while_running(workdir, records_csv):
    (workdir / "records.csv").write_bytes(records_csv.read_bytes())
    BEHAVIOUR.update(fail=False, slow=0.05)
    run = prepare(WF, namespace=NS, log=False)
    dash = Dashboard(run, background=False)
    seen = []

    def watch(event):
        if isinstance(event, nbflow.events.ChunkDone) and event.step == "tag":
            seen.append((dash.rows["tag"].progress.value, "running" in dash.rows["tag"].status.value))
    run.subscribe(watch)
    thread = threading.Thread(target=run.execute, name="runner")
    thread.start()
    thread.join(60)
    dash.close()
    assert run.status == "completed"
    assert seen and all(running for _, running in seen)
    progress = [p for p, _ in seen]
    assert progress == sorted(progress) and 0 < progress[0] < 1
