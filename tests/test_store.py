"""The run store and the text log: what a run leaves behind and how it reads."""
from __future__ import annotations

import io
import json

import pytest

import nbflow
from nbflow import events as ev
from nbflow.state import RunState, Status
from nbflow.store import RunStore, read_checkpoint_meta
from nbflow.ui.log import TextLog

WF = """\
name: store-test
steps:
  - name: extract
    action: data.extract
    params: {path: records.csv, chunk_size: 300}
  - name: positive
    action: positive
    needs: extract
"""


def positive(df):
    return df[df.amount > 0]


@pytest.fixture
def done_run(workdir, records_csv):
    (workdir / "records.csv").write_bytes(records_csv.read_bytes())
    return nbflow.run(WF, namespace={"positive": positive}, log=False)


def test_run_directory_layout(done_run):
    path = done_run.run_dir.path
    data = json.loads((path / "run.json").read_text())
    assert data["spec_text"] == WF
    assert data["status"] == "completed"
    assert set(data["steps"]) == {"extract", "positive"}
    for name in ("extract", "positive"):
        meta = read_checkpoint_meta(data["steps"][name]["checkpoint"])
        assert meta is not None and meta["key"] == data["steps"][name]["cache_key"]
    assert sorted(p.name for p in (path / "checkpoints").iterdir()) == sorted(
        f"{n}-{data['steps'][n]['cache_key']}" for n in ("extract", "positive"))


def test_events_replay_to_the_same_records(done_run):
    replayed = RunState(done_run.run_id, "store-test", [])
    for event in done_run.run_dir.read_events():
        replayed.apply(event)
    assert replayed.to_dict()["steps"] == done_run.state.to_dict()["steps"]
    kinds = [e.kind for e in done_run.run_dir.read_events()]
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished"
    assert kinds.count("chunk_done") == sum(r.chunks_total for r in done_run.records.values())


def test_a_truncated_event_line_does_not_lose_the_rest(done_run):
    path = done_run.run_dir.path / "events.jsonl"
    with open(path, "a") as fh:
        fh.write('{"event": "step_started", "run_id": "x", "st')  # a crash mid-write
    assert [e.kind for e in done_run.run_dir.read_events()][-1] == "run_finished"


def test_checkpoint_without_marker_is_not_trusted(done_run):
    ckpt = done_run.records["positive"].checkpoint
    (done_run.run_dir.path / "checkpoints").joinpath(ckpt.rsplit("/", 1)[-1], "_nbflow.json").unlink()
    assert read_checkpoint_meta(ckpt) is None
    done_run.rerun()
    assert done_run.records["extract"].status is Status.REUSED
    assert done_run.records["positive"].status is Status.COMPLETED


def test_store_open_by_prefix_latest_and_unknown(done_run):
    store = RunStore()
    assert store.open("latest").run_id == done_run.run_id
    assert store.open(done_run.run_id[-4:]).run_id == done_run.run_id
    with pytest.raises(nbflow.NbflowError, match="no run 'nope'"):
        store.open("nope")


def test_log_lines_in_the_seed_format():
    out = io.StringIO()
    log = TextLog(out, actions={"extract-data": "data.extract"})
    log(ev.RunStarted(run_id="r", workflow="data-pipeline", steps=("extract-data",), time=0))
    log(ev.StepCompleted(run_id="r", step="extract-data", duration=15.3, records_out=1_000_000, time=1))
    log(ev.StepFailed(run_id="r", step="transform-data", error_type="MemoryError",
                      message="Cannot allocate 512MB", location="Cell In[5]:12", time=2))
    log(ev.RunFinished(run_id="r", status="failed", duration=3, failed=("transform-data",), time=3))
    log(ev.RunStarted(run_id="r", workflow="data-pipeline", steps=("extract-data",), attempt=2,
                      reused=("extract-data", "validate-schema"), time=4))
    text = out.getvalue()
    assert "🚀 Workflow started: data-pipeline" in text
    assert "✓ extract-data: Completed (15.3s)\n  └─ Records extracted: 1,000,000" in text
    assert "✗ transform-data: FAILED\n  └─ Error: MemoryError: Cannot allocate 512MB\n" in text
    assert "  └─ Location: Cell In[5]:12" in text
    assert "⚠️ Workflow paused - waiting for intervention" in text
    assert "🔄 Workflow restarted (reusing: extract-data, validate-schema)" in text


def test_log_falls_back_to_ascii():
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="ascii")
    TextLog(out)(ev.RunFinished(run_id="r", status="completed", duration=1.0))
    out.flush()
    assert raw.getvalue().decode("ascii").endswith("** Workflow completed successfully! (1.0s)\n")
