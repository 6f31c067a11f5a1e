"""The engine, run for real on small files: order, concurrency, retries, failures, cancellation."""
from __future__ import annotations

import re
import threading
import time

import pandas as pd
import pytest

import nbflow
from nbflow import events as ev
from nbflow.state import Status


def _wf(*steps: str, name: str = "t") -> str:
    return f"name: {name}\nparameters: {{input_path: records.csv}}\nsteps:\n" + "\n".join(steps)


EXTRACT = """  - name: extract
    action: data.extract
    params: {path: "{input_path}", chunk_size: 250}"""


def _handle(spec, namespace, **kwargs):
    """A run handle not started yet (so a test can cancel it from another thread)."""
    from nbflow.handle import Run
    from nbflow.state import RunState
    from nbflow.store import RunStore

    run_dir = RunStore().new_run(spec.name)
    return run_dir, Run(spec, run_dir, RunState(run_dir.run_id, spec.name, spec.step_names),
                        namespace=namespace, **kwargs)


def _collect(handle_events: list):
    def observer(event):
        handle_events.append(event)
    return observer


def test_chunkwise_function_sees_at_most_chunk_size_rows(csv_in_workdir):
    sizes = []

    def measure(df):
        sizes.append(len(df))
        return df

    handle = nbflow.run(_wf(EXTRACT, """  - name: t
    action: measure
    needs: extract
    chunk_size: 100"""), namespace={"measure": measure}, log=False)
    assert handle.status == "completed"
    assert sum(sizes) == 1000 and max(sizes) <= 100
    assert handle.records["extract"].chunks_total >= 4  # 1,000 rows in chunks of at most ~250
    assert handle.outputs["t"].compute()["id"].tolist() == list(range(1, 1001))


def test_independent_steps_run_concurrently(csv_in_workdir):
    # both branches must be inside their function at the same time to pass the barrier
    barrier = threading.Barrier(2, timeout=20)

    def left(df):
        barrier.wait()
        return df

    def right(df):
        barrier.wait()
        return df

    handle = nbflow.run(_wf(EXTRACT.replace("250", "2000"), """  - name: left
    action: left
    needs: extract
  - name: right
    action: right
    needs: extract"""), namespace={"left": left, "right": right}, log=False)
    assert handle.status == "completed", handle.summary()
    assert not barrier.broken


def test_retries_rerun_a_failing_step(csv_in_workdir):
    calls = []

    def flaky(df):
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("the database hiccuped")
        return df

    seen = []
    handle = nbflow.run(_wf(EXTRACT.replace("250", "5000"), """  - name: flaky
    action: flaky
    needs: extract
    retries: 2"""), namespace={"flaky": flaky}, log=False, observers=[_collect(seen)])
    assert handle.status == "completed"
    assert handle.records["flaky"].attempt == 2
    failures = [e for e in seen if isinstance(e, ev.StepFailed)]
    assert [(f.error_type, f.will_retry) for f in failures] == [("ConnectionError", True)]


def test_failure_skips_dependents_but_finishes_other_branches(csv_in_workdir):
    def broken(df):
        return df["no_such_column"]  # KeyError in the user's code

    def fine(df):
        return df

    handle = nbflow.run(_wf(EXTRACT, """  - name: broken
    action: broken
    needs: extract
  - name: after-broken
    action: fine
    needs: broken
  - name: other
    action: fine
    needs: extract"""), namespace={"broken": broken, "fine": fine}, log=False)
    assert handle.status == "failed"
    recs = handle.records
    assert recs["broken"].status is Status.FAILED
    assert recs["broken"].error["error_type"] == "KeyError"
    assert recs["broken"].error["location"].endswith(f":{broken.__code__.co_firstlineno + 1}")
    assert "no_such_column" in recs["broken"].error["source_line"]
    assert recs["after-broken"].status is Status.SKIPPED
    assert recs["after-broken"].because_of == "broken"
    assert recs["other"].status is Status.COMPLETED
    with pytest.raises(nbflow.WorkflowFailed, match="broken"):
        handle.raise_for_status()


def _cancelled_after_first_chunk(extract_chunk: int, step_params: str, pause: float,
                                 after_extract: bool = False):
    """Run extract → slow, cancelling from another thread once slow's first chunk started
    (``after_extract``: and every chunk of extract was written)."""
    started, extracted, cancelled = threading.Event(), threading.Event(), threading.Event()
    seen_chunks, starts = [], []

    def slow(df):
        seen_chunks.append(len(df))
        if after_extract:
            if len(seen_chunks) > 1:
                return df  # the other thread goes on with extract and slow
            # the first chunk holds out until extract is written and the cancel is in
            extracted.wait(10)
            started.set()
            cancelled.wait(10)
            return df
        started.set()
        time.sleep(pause)
        return df

    def observe(event):
        if isinstance(event, ev.StepStarted) or isinstance(event, ev.ChunkDone) and not starts[-1:] == ["chunk"]:
            starts.append(event.step if isinstance(event, ev.StepStarted) else "chunk")
        if isinstance(event, ev.ChunkDone) and event.step == "extract" \
                and event.chunks_done == event.chunks_total:
            extracted.set()

    spec = nbflow.parse(_wf(EXTRACT.replace("250", str(extract_chunk)), f"""  - name: slow
    action: slow
    needs: extract{step_params}"""), namespace={"slow": slow})
    run_dir, handle = _handle(spec, {"slow": slow})
    handle.observers.append(observe)
    threading.Thread(target=lambda: (started.wait(10), handle.cancel(), cancelled.set()),
                     name="canceller").start()
    handle.execute()
    assert handle.status == "cancelled"
    assert handle.records["slow"].status is Status.CANCELLED
    assert not list(run_dir.path.glob("checkpoints/slow-*/_nbflow.json"))
    handle.starts = starts
    return handle, seen_chunks


def test_cancel_stops_new_chunks_and_commits_nothing(csv_in_workdir, monkeypatch):
    monkeypatch.setenv("NBFLOW_FUSE", "0")  # one step after the other: extract is done first
    handle, seen_chunks = _cancelled_after_first_chunk(50, "", pause=0.2)
    assert len(seen_chunks) < 20  # 1,000 rows in chunks of 50: it stopped early
    # the next attempt runs it again and reuses extract
    handle.rerun()
    assert handle.status == "completed"
    assert handle.records["extract"].status is Status.REUSED
    assert handle.records["slow"].status is Status.COMPLETED


def test_cancel_in_a_pass_keeps_the_steps_it_finished(csv_in_workdir):
    # extract and slow run as one pass (nbflow/engine/fusion.py), one task per chunk: the
    # first chunk's slow holds out until the other thread wrote extract's last chunk and the
    # cancel is in; slow takes each chunk of 50 in two calls of 25, and the cancel stops the
    # second: extract is committed, slow is not
    handle, seen_chunks = _cancelled_after_first_chunk(50, "\n    params: {chunk_size: 25}", pause=0.2,
                                                       after_extract=True)
    # both started before either wrote a chunk
    assert handle.starts[:3] == ["extract", "slow", "chunk"]
    assert handle.records["extract"].status is Status.COMPLETED
    assert handle.records["slow"].chunks_done < handle.records["slow"].chunks_total
    handle.rerun()
    assert handle.status == "completed"
    assert handle.records["extract"].status is Status.REUSED
    assert handle.records["slow"].status is Status.COMPLETED


def test_cancel_stops_between_the_chunks_of_one_partition(csv_in_workdir):
    # extract hands over partitions of 1,000 records; the step works through each in
    # chunks of 10: a cancel must not wait for the 100 chunks of a partition in flight
    _, seen_chunks = _cancelled_after_first_chunk(1000, "\n    params: {chunk_size: 10}", pause=0.05)
    assert set(seen_chunks) == {10} and len(seen_chunks) < 10  # of 100 in the partition


def test_whole_action_in_memory_gets_one_frame(csv_in_workdir):
    got = []

    @nbflow.action("test.count_all", kind="whole", streaming=False)
    def count_all(df):
        got.append(type(df))
        return pd.DataFrame({"rows": [len(df)]})

    handle = nbflow.run(_wf(EXTRACT, """  - name: count
    action: test.count_all
    needs: extract"""), log=False)
    assert got == [pd.DataFrame]
    assert handle.outputs["count"].compute()["rows"].tolist() == [1000]


def test_in_memory_chunk_function_with_streaming_false(csv_in_workdir):
    sizes = []

    def whole(df):
        sizes.append(len(df))
        return df

    handle = nbflow.run(_wf(EXTRACT, """  - name: t
    action: whole
    needs: extract
    streaming: false"""), namespace={"whole": whole}, log=False)
    assert handle.status == "completed"
    assert sizes == [1000]  # one call with every record: the naive mode


def test_transform_names_a_function(csv_in_workdir):
    def double(df, factor=2):
        return df.assign(amount=df.amount * factor)

    handle = nbflow.run(_wf(EXTRACT, """  - name: t
    action: data.transform_streaming
    needs: extract
    params: {function: double, factor: 3}"""), namespace={"double": double}, log=False)
    out = handle.outputs["t"].compute()
    src = pd.read_csv(csv_in_workdir / "records.csv")
    assert out["amount"].round(6).tolist() == (src["amount"] * 3).round(6).tolist()


def test_local_cluster_backend(csv_in_workdir):
    from distributed import Client, LocalCluster

    def positive(df):
        return df[df.amount > 0]

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        handle = nbflow.run(_wf(EXTRACT, """  - name: positive
    action: positive
    needs: extract
  - name: load
    action: data.load
    needs: positive
    params: {path: out/positive.parquet}"""), namespace={"positive": positive}, backend=client,
            log=False)
    assert handle.status == "completed", handle.summary()
    src = pd.read_csv(csv_in_workdir / "records.csv")
    out = pd.read_parquet(csv_in_workdir / "out/positive.parquet")
    assert len(out) == int((src.amount > 0).sum())
    assert handle.records["extract"].chunks_done == handle.records["extract"].chunks_total >= 4


@pytest.mark.parametrize("fuse", ["1", "0"])
def test_a_function_whose_chunks_differ_in_types_fails_its_step(csv_in_workdir, monkeypatch, fuse):
    monkeypatch.setenv("NBFLOW_FUSE", fuse)  # in one pass with the load, and alone

    def text_later(df):
        return df.assign(amount=df["amount"].astype(str)) if df["id"].iloc[0] > 500 else df

    handle = nbflow.run(_wf(EXTRACT, """  - name: t
    action: text_later
    needs: extract
  - name: save
    action: data.load
    needs: t
    params: {path: out.parquet}"""), namespace={"text_later": text_later}, log=False)
    assert handle.status == "failed" and handle.failed_step == "t"
    error = handle.records["t"].error
    assert error["error_type"] == "StepError"
    assert re.search(r"column 'amount' is double in chunk 0 but string in chunk [1-9]", error["message"])
    assert handle.records["save"].status is Status.SKIPPED
    assert not (csv_in_workdir / "out.parquet").exists()
