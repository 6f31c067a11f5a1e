"""Chunk-wise neighbours run as one pass: which steps fuse, and that a pass behaves like
the steps run one after the other (outputs, checkpoints, failures, reruns)."""
from __future__ import annotations

import threading
from pathlib import Path

import pandas as pd
import pytest

import nbflow
from nbflow import events as ev
from nbflow.demo import PIPELINE
from nbflow.engine.fusion import chains
from nbflow.plan import make_plan
from nbflow.state import Status
from nbflow.ui.log import TextLog


def _wf(*steps: str) -> str:
    return "name: t\nparameters: {input_path: records.csv}\nsteps:\n" + "\n".join(steps)


EXTRACT = """  - name: extract
    action: data.extract
    params: {path: "{input_path}", chunk_size: 200}"""
VALIDATE = """  - name: check
    action: data.validate
    needs: extract
    params: {schema: {id: int64, country: {dtype: string, nullable: false}, amount: float64}}"""


def _plan(text: str, namespace=None):
    return make_plan(nbflow.parse(text, namespace=namespace), namespace=namespace)


def double(df):
    return df.assign(amount=df["amount"] * 2)


def test_the_demo_pipeline_runs_as_one_pass_load_included_unless_it_writes_csv():
    plan = _plan(PIPELINE)
    assert chains(plan, "threads") == [("extract-data", "validate-schema", "transform-data", "load-data")]
    assert chains(plan, "distributed") == []
    # a CSV file is written whole after the pass (its header needs the columns first)
    csv = _plan(PIPELINE.replace("output_path: out/clean.parquet", "output_path: out/clean.csv"))
    assert chains(csv, "threads") == [("extract-data", "validate-schema", "transform-data")]


def test_what_breaks_a_chain(monkeypatch):
    ns = {"double": double}
    # a step two others read: each reads its checkpoint
    branch = _wf(EXTRACT, """  - name: a
    action: double
    needs: extract
  - name: b
    action: double
    needs: extract""")
    assert chains(_plan(branch, ns), "threads") == []
    # retries, an in-memory step, chunk_size: auto
    for setting in ("retries: 2", "streaming: false", "chunk_size: auto"):
        text = _wf(EXTRACT, f"""  - name: a
    action: double
    needs: extract
    {setting}""")
        assert chains(_plan(text, ns), "threads") == [], setting
    text = _wf(EXTRACT, """  - name: a
    action: double
    needs: extract""")
    assert chains(_plan(text, ns), "threads") == [("extract", "a")]
    # an independent step between them in the order does not break the chain
    between = _wf(EXTRACT, """  - name: other
    action: data.extract
    params: {path: "{input_path}"}
  - name: a
    action: double
    needs: extract
  - name: b
    action: double
    needs: other""")
    assert chains(_plan(between, ns), "threads") == [("extract", "a"), ("other", "b")]
    monkeypatch.setenv("NBFLOW_FUSE", "0")
    assert chains(_plan(text, ns), "threads") == []


def _events(handle_observers: list):
    seen: list = []
    handle_observers.append(seen.append)
    return seen


def test_a_pass_gives_what_the_steps_give_one_by_one(csv_in_workdir, monkeypatch):
    calls = []
    lock = threading.Lock()

    def tag(df):
        with lock:
            calls.append(int(df["id"].iloc[0]))
        return double(df)

    text = _wf(EXTRACT, VALIDATE.replace("nullable: false", "nullable: true"), """  - name: tag
    action: tag
    needs: check
  - name: load
    action: data.load
    needs: tag
    params: {path: out/tagged.parquet}""")
    events: list = []
    fused = nbflow.run(text, namespace={"tag": tag}, log=False, observers=[events.append])
    assert fused.status == "completed", fused.summary()
    # the four started together: every StepStarted comes before the first chunk is done
    first_chunk = next(i for i, e in enumerate(events) if isinstance(e, ev.ChunkDone))
    assert {e.step for e in events[:first_chunk] if isinstance(e, ev.StepStarted)} == {
        "extract", "check", "tag", "load"}
    started = {e.step: e for e in events if isinstance(e, ev.StepStarted)}
    assert started["check"].pass_with == ("extract", "tag", "load")
    assert "one pass with extract, tag, load" in "\n".join(TextLog().format(started["check"]))
    out_fused = pd.read_parquet(csv_in_workdir / "out" / "tagged.parquet")
    recs = fused.records
    assert [recs[n].records_out for n in ("extract", "check", "tag", "load")] == [1000] * 4
    chunks = recs["extract"].chunks_total
    assert chunks >= 5 and all(recs[n].chunks_done == recs[n].chunks_total == chunks
                               for n in ("extract", "check", "tag", "load"))
    # the load copied tag's Parquet parts as they were written (no second encoding)
    out_parts = sorted((csv_in_workdir / "out" / "tagged.parquet").glob("part-*.parquet"))
    tag_parts = sorted(Path(recs["tag"].checkpoint).glob("part-*.parquet"))
    assert len(out_parts) == chunks
    assert [p.read_bytes() for p in out_parts] == [p.read_bytes() for p in tag_parts]
    assert not list((csv_in_workdir / "out").glob("*.tmp-*"))
    # each chunk went through the user's function once
    assert len(calls) == len(set(calls)) == chunks
    # each step keeps its own checkpoint: extract's holds the raw amounts, tag's the doubled
    assert fused.outputs["extract"].compute()["amount"].sum() * 2 == pytest.approx(
        fused.outputs["tag"].compute()["amount"].sum())

    monkeypatch.setenv("NBFLOW_FUSE", "0")
    calls.clear()
    staged = nbflow.run(text, namespace={"tag": tag}, log=False, store=csv_in_workdir / "staged")
    assert staged.status == "completed"
    out_staged = pd.read_parquet(csv_in_workdir / "out" / "tagged.parquet")
    pd.testing.assert_frame_equal(out_fused, out_staged)

    # a rerun reuses all of the pass's checkpoints, from a handle opened on the store
    monkeypatch.delenv("NBFLOW_FUSE")
    calls.clear()
    again = nbflow.open_run(fused.run_id, namespace={"tag": tag})
    again.rerun()
    assert {n: r.status for n, r in again.records.items()} == dict.fromkeys(
        ("extract", "check", "tag", "load"), Status.REUSED)
    assert calls == []


def test_a_step_whose_code_raises_in_a_pass_fails_once_and_upstream_completes(csv_in_workdir):
    calls = []
    lock = threading.Lock()

    def picky(df):
        bad = bool((df["id"] == 450).any())
        with lock:
            calls.append(bad)
        if bad:
            raise ValueError("not the chunk with id 450")
        return df

    text = _wf(EXTRACT, """  - name: picky
    action: picky
    needs: extract
  - name: after
    action: data.load
    needs: picky
    params: {path: out/x.parquet}""")
    handle = nbflow.run(text, namespace={"picky": picky}, log=False)
    recs = handle.records
    assert handle.status == "failed"
    # extract completed every chunk even though the pass stopped at picky's third
    assert recs["extract"].status is Status.COMPLETED and recs["extract"].records_out == 1000
    assert recs["picky"].status is Status.FAILED
    assert recs["picky"].error["error_type"] == "ValueError"
    assert recs["picky"].error["location"].endswith(f":{picky.__code__.co_firstlineno + 5}")
    assert recs["after"].status is Status.SKIPPED and recs["after"].because_of == "picky"
    # the load in the pass had written the first chunks: nothing of them is left
    assert not (csv_in_workdir / "out").exists() or not list((csv_in_workdir / "out").iterdir())
    # the failing chunk met the function once: a pass is not a hidden retry
    assert calls.count(True) == 1
    assert handle.root_cause.step == "picky"
    # fixed, the rerun reuses extract
    handle.namespace["picky"] = lambda df: df
    handle.rerun()
    assert handle.records["extract"].status is Status.REUSED
    assert handle.status == "completed"


def test_a_check_in_a_pass_holds_back_the_chunks_it_rejects(tmp_path, workdir):
    ids = list(range(1, 1001))
    country = ["DE"] * 1000
    country[450] = None  # id 451, in the third chunk
    pd.DataFrame({"id": ids, "country": country, "amount": [1.0] * 1000}).to_csv(
        workdir / "records.csv", index=False)
    seen = []
    lock = threading.Lock()

    def tag(df):
        with lock:
            seen.append((bool((df["id"] == 451).any()), int(df["country"].isna().sum())))
        return df

    text = _wf(EXTRACT, VALIDATE, """  - name: tag
    action: tag
    needs: check""")
    handle = nbflow.run(text, namespace={"tag": tag}, log=False)
    recs = handle.records
    assert handle.status == "failed"
    assert recs["extract"].status is Status.COMPLETED
    assert recs["check"].status is Status.FAILED
    assert "country" in recs["check"].error["message"]
    assert recs["tag"].status is Status.SKIPPED and recs["tag"].because_of == "check"
    # the chunk with the empty country never reached tag (without the hold-back tag sees every
    # chunk: a check's problems fail it only once all its chunks are checked)
    assert not any(has_451 or nulls for has_451, nulls in seen)
    assert not list((workdir / ".nbflow").glob("runs/*/checkpoints/tag-*/_nbflow.json"))


def test_a_load_that_may_not_overwrite_fails_alone_and_leaves_the_old_output(csv_in_workdir):
    old = csv_in_workdir / "out" / "x.parquet"
    old.mkdir(parents=True)
    (old / "keep.txt").write_text("the old output")
    text = _wf(EXTRACT, """  - name: tag
    action: tag
    needs: extract
  - name: load
    action: data.load
    needs: tag
    params: {path: out/x.parquet, overwrite: false}""")
    handle = nbflow.run(text, namespace={"tag": double}, log=False)
    recs = handle.records
    assert handle.status == "failed"
    assert recs["extract"].status is recs["tag"].status is Status.COMPLETED
    assert recs["tag"].records_out == 1000
    assert recs["load"].status is Status.FAILED
    assert "overwrite is false" in recs["load"].error["message"]
    assert [p.name for p in old.iterdir()] == ["keep.txt"]
    assert not list((csv_in_workdir / "out").glob("*.tmp-*"))
