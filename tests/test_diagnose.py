"""Root causes of real failures: each scenario runs through the engine and checks the diagnosis.

Every scenario asserts what a user reads and relies on: where it failed (the user's
line), why (the factors, with their numbers), and the top fix, which is applied and
rerun where it changes the workflow.
"""
from __future__ import annotations

import inspect
import io
import json
import re
import threading
import time

import numpy as np
import pandas as pd
import pytest

import nbflow
from nbflow import yamledit
from nbflow.diagnose import Factor, Fix, RootCause, nice_down, nice_size_up
from nbflow.state import Status
from nbflow.ui.log import TextLog

MB = 1_000_000
NICE = {m * 10 ** e for e in range(7) for m in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8)}


def _wf(*steps: str, name: str = "t", parameters: str = "{input_path: records.csv}") -> str:
    return f"name: {name}\nparameters: {parameters}\nsteps:\n" + "\n".join(steps)


def extract(chunk: int = 250, path: str = '"{input_path}"') -> str:
    return f"""  - name: extract
    action: data.extract
    params: {{path: {path}, chunk_size: {chunk}}}"""


def rules(rc: RootCause) -> dict[str, Factor]:
    return {f.rule: f for f in rc.contributing_factors}


def body_lines(func) -> range:
    lines, first = inspect.getsourcelines(func)
    return range(first, first + len(lines))


def changed_lines(diff: str) -> tuple[list[str], list[str]]:
    minus = [line[1:] for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")]
    plus = [line[1:] for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    return minus, plus


# -- memory --------------------------------------------------------------------------------

def hoard(df):
    """The seed's habit at test scale: every pass kept, text as Python objects, 16 kB a record each."""
    history, blobs = [df], []
    for _ in range(10):
        frame = history[-1].copy()
        frame["country"] = frame["country"].fillna("").astype(object) + " "
        blobs.append(np.ones((len(frame), 2_000)))
        history.append(frame)
        time.sleep(0.03)  # real work takes time: the 100 ms sampler sees the growth
    return history[-1].assign(score=blobs[-1][:, 0])


HOARD = """  - name: transform
    action: hoard
    needs: extract
    params: {streaming: false, max_memory: 60MB}   # the naive version
  - name: load
    action: data.load
    needs: transform
    params: {path: out/clean.parquet}"""


def test_budget_exceeded_in_memory_is_explained_and_its_fix_runs_under_the_budget(csv_in_workdir, capsys):
    ns = {"hoard": hoard}
    rng = np.random.default_rng(1)
    pd.DataFrame({"id": range(100), "country": rng.choice(["DE", "FR"], 100),
                  "amount": rng.normal(size=100)}).to_csv(csv_in_workdir / "small.csv", index=False)
    small = nbflow.run(_wf(extract(), HOARD), namespace=ns, parameters={"input_path": "small.csv"}, log=False)
    assert small.status == "completed"  # on a sample nobody notices

    log = io.StringIO()
    run = nbflow.run(_wf(extract(), HOARD), namespace=ns, log=TextLog(log))
    assert run.status == "failed"
    rc = run.root_cause
    assert (rc.step, rc.error_type, rc.processing_mode) == ("transform", "MemoryBudgetExceeded", "in-memory")
    assert rc.message.endswith("over its max_memory budget of 60 MB, with all its input in memory at once "
                               "(streaming: false)") and "chunk" not in rc.message
    # where: the user's own line in hoard, not nbflow's, Dask's or NumPy's
    assert rc.location["function"] == "hoard" and rc.location["file"] == __file__
    assert rc.location["line"] in body_lines(hoard)
    assert rc.location["where"] == f"{__file__}:{rc.location['line']}"
    assert rc.stack_trace["frames"][-1]["function"] == "hoard" and rc.stack_trace["library_frames"] > 0
    assert rc.memory_stats["budget"] == 60 * MB and rc.memory_stats["peak_above_baseline"] > 60 * MB
    assert rc.memory_stats["human"]["budget"] == "60 MB"
    assert rc.input["records"] == 1000 and rc.input["inputs"]["extract"]["records"] == 1000
    assert rc.upstream_status == {"extract": "completed"} and rc.blocked == ("load",)

    why = rules(rc)
    assert why["in-memory"].evidence["records"] == 1000 and "streaming: false" in why["in-memory"].text
    assert "(workflow.yaml line 10)" in why["in-memory"].text  # where the workflow says it
    too_large = why["input-exceeds-budget"].evidence
    assert too_large["records"] == 1000 and too_large["estimate"] > 60 * MB
    assert too_large["bytes_per_record"] > 100_000  # 10 arrays of 16 kB a record, measured
    assert why["object-dtype"].evidence["column"] == "country"
    assert why["copies-alive"].evidence["holder"] == "history"
    more = why["more-records"].evidence
    assert (more["records"], more["previous_records"], more["previous_run"]) == (1000, 100, small.run_id)

    top = rc.resolution_options[0]
    size = top.change["chunk_size"]
    assert top.change == {"streaming": True, "chunk_size": size} and size in NICE and size < 1000
    assert top.estimated_peak <= 0.6 * 60 * MB
    minus, plus = changed_lines(top.diff)
    assert minus == ["    params: {streaming: false, max_memory: 60MB}   # the naive version"]
    assert plus == [f"    params: {{streaming: true, max_memory: 60MB, chunk_size: {size}}}   # the naive version"]
    assert rc.corrected_workflow == top.workflow and rc.workflow_diff == top.diff
    assert [f.confidence for f in rc.resolution_options] == sorted(
        (f.confidence for f in rc.resolution_options), reverse=True)
    raise_budget = next(f for f in rc.resolution_options if "max_memory" in f.change)
    assert nbflow.units.parse_size(raise_budget.change["max_memory"]) > 1.2 * too_large["estimate"]

    # the log says it as it happens; `nbflow show` prints the whole diagnosis
    text = log.getvalue()
    assert "✗ transform: FAILED" in text and "└─ Why: streaming: false" in text
    assert f"└─ Fix: params: {{streaming: true, max_memory: 60MB, chunk_size: {size}}}" in text
    from nbflow.cli import main

    assert main(["show", run.run_id]) == 0
    shown = capsys.readouterr().out
    assert "Root cause: transform failed: MemoryBudgetExceeded: step 'transform' used" in shown
    assert f"chunk_size: {size}" in shown
    assert f"{__file__}:{rc.location['line']}, in hoard" in shown
    # stored in run.json, and read back after a restart
    stored = run.run_dir.read_run()["steps"]["transform"]["root_cause"]
    assert RootCause.from_dict(stored) == rc
    assert nbflow.open_run(run.run_id).root_cause == rc

    run.rerun(run.apply_fix(0))
    assert run.status == "completed", run.summary()
    assert run.records["extract"].status is Status.REUSED
    done = run.records["transform"]
    assert done.chunk_size == size and done.streaming is True
    assert done.info["memory"]["peak_above_baseline"] < 60 * MB


def fatten(df):
    blobs = [np.ones((len(df), 2_000)) for _ in range(10)]  # 160 kB a record
    time.sleep(0.3)  # works on them a while: the 100 ms sampler sees the peak
    return df.assign(score=blobs[-1][:, 0])


def test_budget_exceeded_by_a_too_large_skewed_chunk(workdir):
    folder = workdir / "parts"
    folder.mkdir()
    for i, n in enumerate((100, 100, 700)):  # one file much larger than the others
        pd.DataFrame({"id": np.arange(n), "amount": np.ones(n)}).to_parquet(folder / f"p{i}.parquet")
    run = nbflow.run(_wf(extract(1000, "parts"), """  - name: fatten
    action: fatten
    needs: extract
    chunk_size: 1000
    max_memory: 60MB"""), namespace={"fatten": fatten}, log=False)
    rc = run.root_cause
    assert (rc.error_type, rc.processing_mode, rc.location["function"]) == (
        "MemoryBudgetExceeded", "chunked", "fatten")
    why = rules(rc)
    chunk = why["chunk-too-large"].evidence
    assert (chunk["chunk_size"], chunk["records_per_chunk"]) == (1000, 700)
    assert chunk["peak_per_chunk"] > 700 * 150_000  # 160 kB a record, measured by the probe
    skew = why["skewed-chunks"].evidence
    assert (skew["max"], skew["median"], skew["largest_chunk"]) == (700, 100, 2)
    top = rc.resolution_options[0]
    assert set(top.change) == {"chunk_size"} and top.change["chunk_size"] in NICE
    assert top.change["chunk_size"] < 700 and top.estimated_peak <= 0.6 * 60 * MB
    assert changed_lines(top.diff) == (["    chunk_size: 1000"], [f"    chunk_size: {top.change['chunk_size']}"])
    run.rerun(run.apply_fix(0))
    assert run.status == "completed", run.summary()
    assert run.records["extract"].status is Status.REUSED
    assert run.records["fatten"].info["memory"]["peak_above_baseline"] < 60 * MB


def nearby(df):
    x = df["x"].to_numpy()
    d = np.subtract.outer(x, x)  # pairwise differences: n × n
    np.abs(d, out=d)
    return df.assign(close=(d < 1.0).sum(axis=1))


def _refuses(nbytes: int) -> bool:
    """The OS says no to an allocation of ``nbytes`` at once (else it grants it, and it gets touched)."""
    import psutil

    try:
        always = open("/proc/sys/vm/overcommit_memory").read().strip() == "1"
    except OSError:
        always = False
    return not always and nbytes > psutil.virtual_memory().total + psutil.swap_memory().total


@pytest.mark.skipif(not _refuses(200_000 ** 2 * 8), reason="this machine would grant the 320 GB array")
def test_real_memory_error_from_a_quadratic_allocation(workdir):
    pd.DataFrame({"x": np.arange(200_000, dtype="float64")}).to_csv(workdir / "points.csv", index=False)
    run = nbflow.run(_wf(extract(100_000, "points.csv"), """  - name: pairs
    action: nearby
    needs: extract
    params: {streaming: false, max_memory: 100MB}"""), namespace={"nearby": nearby}, log=False)
    rc = run.root_cause
    assert rc.error_type == "MemoryError" and rc.location["function"] == "nearby"
    assert rc.location["code"] == "d = np.subtract.outer(x, x)  # pairwise differences: n × n"
    alloc = rules(rc)["allocation-failed"]
    assert alloc.evidence["shape"] == [200_000, 200_000] and alloc.evidence["bytes"] == 200_000 ** 2 * 8
    assert "with the square of the 200,000 records" in alloc.text
    top = rc.resolution_options[0]
    size = top.change["chunk_size"]
    assert top.change == {"streaming": True, "chunk_size": size} and size in NICE
    assert top.estimated_peak <= 0.6 * 100 * MB and size ** 2 * 8 <= 0.6 * 100 * MB / 2
    hopeless = next(f for f in rc.resolution_options if "max_memory" in f.change)
    assert "more than this machine has" in hopeless.estimate and hopeless.confidence < 0.1
    run.rerun(run.apply_fix(0))
    assert run.status == "completed", run.summary()
    assert run.records["pairs"].info["memory"]["peak_above_baseline"] < 100 * MB


# -- data and code -------------------------------------------------------------------------

def test_key_error_in_a_notebook_function_names_the_cell_and_the_columns(csv_in_workdir):
    from IPython.testing.globalipapp import get_ipython

    ip = get_ipython()
    cell = ip.execution_count
    ip.run_cell('def add_tax(df):\n    rate = 0.2\n    return df.assign(tax=df["amout"] * rate)\n',
                store_history=True)
    run = nbflow.run(_wf(extract(), """  - name: tax
    action: add_tax
    needs: extract"""), namespace=ip.user_ns, log=False)
    rc = run.root_cause
    assert rc.error_type == "KeyError"
    assert rc.location["where"] == f"Cell In[{cell}], line 3"
    assert rc.location["code"] == 'return df.assign(tax=df["amout"] * rate)'
    missing = rules(rc)["missing-column"].evidence
    assert (missing["key"], missing["frame"], missing["close"]) == ("amout", "df", ["amount"])
    assert missing["columns"] == ["id", "country", "amount"]
    top = rc.resolution_options[0]
    assert top.kind == "code" and top.workflow is None
    assert top.snippet == f"Cell In[{cell}], line 3: df['amount'] instead of df['amout']"
    with pytest.raises(ValueError, match="changes your code"):
        run.apply_fix(0)



def write_with_a_typo(df):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pandas(df), "x.parquet", compresion="zstd")  # raised in Cython
    return df


def test_an_error_raised_in_compiled_library_code_is_placed_at_the_users_call(csv_in_workdir):
    from nbflow.tracebacks import is_user_file

    assert not is_user_file("pyarrow/_parquet.pyx") and not is_user_file("pandas/_libs/lib.pyx")
    assert is_user_file(__file__)
    run = nbflow.run(_wf(extract(), """  - name: save
    action: write_with_a_typo
    needs: extract"""), namespace={"write_with_a_typo": write_with_a_typo}, log=False)
    rc = run.root_cause
    assert rc.error_type == "TypeError" and "compresion" in rc.message
    assert rc.location["function"] == "write_with_a_typo" and rc.location["line"] in body_lines(write_with_a_typo)
    assert rc.location["code"].startswith("pq.write_table(")
    assert rc.resolution_options[0].title == f"Fix what raises it at {__file__}:{rc.location['line']}"

def test_schema_mismatch_suggests_reading_the_placeholder_words_as_empty(workdir):
    df = pd.DataFrame({"id": range(1, 201), "amount": [str(i * 1.5) for i in range(200)]})
    df.loc[[3, 50, 120], "amount"] = ["unknown", "?", "unknown"]
    df.to_csv(workdir / "records.csv", index=False)
    run = nbflow.run(_wf(extract(), """  - name: check
    action: data.validate
    needs: extract
    params:
      schema: {id: int64, amount: float64}   # what the export promises"""), log=False)
    rc = run.root_cause
    assert (rc.step, rc.error_type) == ("check", "SchemaError")
    mismatch = rules(rc)["schema-mismatch"].evidence
    assert (mismatch["column"], mismatch["expected"], mismatch["count"]) == ("amount", "float64", 3)
    assert mismatch["found"] in ("str", "string", "object") and set(mismatch["examples"]) == {"unknown", "?"}
    top = rc.resolution_options[0]
    assert (top.step, top.change) == ("extract", {"na_values": ["?", "unknown"]})
    assert changed_lines(top.diff)[1] == [
        "    params: {path: \"{input_path}\", chunk_size: 250, na_values: ['?', unknown]}"]
    declare = next(f for f in rc.resolution_options if f.kind == "schema")
    assert declare.change == {"schema": {"amount": {"dtype": "string"}}}
    run.rerun(run.apply_fix(0))
    assert run.status == "completed", run.summary()
    assert run.outputs["check"].compute()["amount"].isna().sum() == 3


def test_missing_input_file_suggests_the_near_match(csv_in_workdir):
    run = nbflow.run(_wf(extract(), """  - name: t
    action: data.load
    needs: extract
    params: {path: out.parquet}""", parameters="{input_path: record.csv}  # the export"), log=False)
    rc = run.root_cause
    assert (rc.step, rc.error_type) == ("extract", "InputNotFound")
    assert rules(rc)["missing-input"].evidence["near"] == ["records.csv"]
    assert rc.blocked == ("t",)
    top = rc.resolution_options[0]
    assert top.change == {"input_path": "records.csv"}
    assert changed_lines(top.diff) == (["parameters: {input_path: record.csv}  # the export"],
                                       ["parameters: {input_path: records.csv}  # the export"])
    run.rerun(run.apply_fix(0))
    assert run.status == "completed" and run.records["t"].records_out == 1000



def test_a_fix_of_a_caller_parameter_is_kept_for_later_reruns(csv_in_workdir):
    # the path came from the caller (-p, papermill): the fix changes that parameter, not the text
    workflow = _wf(extract(), """  - name: t
    action: data.load
    needs: extract
    params: {path: out.parquet}""")
    run = nbflow.run(workflow, parameters={"input_path": "record.csv"}, log=False)
    top = run.fixes[0]
    assert (top.kind, top.overrides, top.snippet) == ("parameters", {"input_path": "records.csv"},
                                                      "-p input_path=records.csv")
    run.rerun(run.apply_fix(0))
    assert run.status == "completed", run.summary()
    # recorded with the parameter that ran: a new process's rerun reuses both steps
    assert run.run_dir.read_run()["overrides"] == {"input_path": "records.csv"}
    again = nbflow.open_run(run.run_id, log=False).rerun(from_step="t")
    assert again.spec.parameters["input_path"] == "records.csv"
    assert (again.records["extract"].status, again.records["t"].status) == (Status.REUSED, Status.COMPLETED)
    # parameters given with a corrected workflow are not dropped
    again.rerun(again.apply_fix(0) if again.fixes else again.spec, parameters={"input_path": "nope.csv"})
    assert again.status == "failed" and again.root_cause.error_type == "InputNotFound"


def load_qty(workdir, rows: list[str], chunk: int):
    """``qty.csv`` (id,qty and ``rows``) extracted in chunks of ``chunk`` and loaded to Parquet."""
    (workdir / "qty.csv").write_text("\n".join(["id,qty", *rows]) + "\n")
    return nbflow.run(_wf(extract(chunk, "qty.csv"), """  - name: t
    action: data.load
    needs: extract
    params: {path: out.parquet}"""), log=False)


def test_a_gap_far_into_a_column_of_whole_numbers_gets_the_dtype_that_reads_it(workdir):
    # 40,000 whole numbers, then one empty value: past the 256 kB the dtypes are read from
    run = load_qty(workdir, [f"{i},{i % 7}" for i in range(40_000)] + ["40000,"], chunk=10_000)
    rc = run.root_cause
    assert (rc.step, rc.error_type) == ("extract", "StepError")
    drift = rules(rc)["dtype-drift"].evidence
    assert (drift["column"], drift["expected"], drift["found"]) == ("qty", "int64", "empty values")
    top = rc.resolution_options[0]
    assert top.change == {"dtype": {"qty": "float64"}} and top.title == "Read 'qty' as float64"
    assert changed_lines(top.diff)[1] == ["    params: {path: qty.csv, chunk_size: 10000, dtype: {qty: float64}}"]
    run.rerun(run.apply_fix(0))
    assert run.status == "completed" and run.records["t"].records_out == 40_001
    assert pd.read_parquet(workdir / "out.parquet")["qty"].isna().sum() == 1


@pytest.mark.parametrize("bad", [30_000, 38_000])  # in the 256 kB the dtypes are read from (Dask
# reads the file), or after it (nbflow's blocks): pandas counts lines from a block's start either way
def test_a_line_with_too_many_fields_is_named_by_its_line_in_the_file(workdir, bad):
    rows = [f"{i},{i % 7}" for i in range(40_000)]
    rows[bad] = f"{bad},3,extra,fields"
    run = load_qty(workdir, rows, chunk=5_000)
    rc = run.root_cause
    assert rc.message.startswith(f"data.extract: line {bad + 2:,} of qty.csv has 4 fields where the header "
                                 f"has 2: '{bad},3,extra,fields'")
    ragged = rules(rc)["ragged-line"].evidence
    assert (ragged["line"], ragged["expected"], ragged["found"]) == (bad + 2, 2, 4)
    top = rc.resolution_options[0]
    assert top.change == {"on_bad_lines": "skip"}
    run.rerun(run.apply_fix(0))
    assert run.status == "completed" and run.records["t"].records_out == 39_999


def test_a_broken_json_line_is_named_by_its_line_in_the_file(workdir):
    lines = [json.dumps({"id": i, "qty": i % 7}) for i in range(30_000)]
    lines[21_000] = '{"id": 21000, "qty": '  # cut short
    (workdir / "qty.jsonl").write_text("\n".join(lines) + "\n")
    run = nbflow.run(_wf(extract(5_000, "qty.jsonl")), log=False)
    assert run.root_cause.message == (
        "data.extract: line 21,001 of qty.jsonl is not valid JSON (Expecting value, column 22): "
        "'{\"id\": 21000, \"qty\": ' — correct that line: each line of a JSON Lines file is one whole "
        "JSON object")


def test_whole_numbers_read_as_floats_in_one_json_chunk_get_the_dtype_that_reads_all(workdir):
    # pandas infers each block's dtypes: the block with the gap reads qty as floats
    lines = [json.dumps({"id": i, "qty": None if i == 25_000 else i % 7}) for i in range(30_000)]
    (workdir / "qty.jsonl").write_text("\n".join(lines) + "\n")
    run = nbflow.run(_wf(extract(5_000, "qty.jsonl")), log=False)
    rc = run.root_cause
    assert re.search(r"column 'qty' is int64 in chunk 0 but double in chunk \d", rc.message)
    top = rc.resolution_options[0]
    assert top.change == {"dtype": {"qty": "float64"}}
    run.rerun(run.apply_fix(0))
    assert run.status == "completed" and run.outputs["extract"].compute()["qty"].isna().sum() == 1

def scale(df, factor):
    return df.assign(amount=df["amount"] * factor)


def test_bad_parameter_type_in_user_code(csv_in_workdir):
    run = nbflow.run(_wf(extract(), """  - name: scale
    action: scale
    needs: extract
    params: {factor: "1.5"}"""), namespace={"scale": scale}, log=False)
    rc = run.root_cause
    assert rc.error_type.endswith("TypeError")  # numpy's UFuncTypeError
    assert rc.location["function"] == "scale" and rc.location["line"] in body_lines(scale)
    wrong = rules(rc)["parameter-type"].evidence
    assert (wrong["param"], wrong["value"], wrong["meant"], wrong["type"]) == ("factor", "1.5", 1.5, "str")
    top = rc.resolution_options[0]
    assert top.change == {"factor": 1.5}
    assert changed_lines(top.diff)[1] == ["    params: {factor: 1.5}"]
    run.rerun(run.apply_fix(0))
    assert run.status == "completed"
    out = run.outputs["scale"].compute()
    source = pd.read_csv(csv_in_workdir / "records.csv")
    assert np.allclose(out["amount"], source["amount"] * 1.5)


def test_retries_exhausted_with_the_same_error_says_it_is_not_transient(csv_in_workdir):
    calls = []

    def push(df):
        calls.append(len(df))
        raise ConnectionError("warehouse db.internal:5432 refused the connection")

    run = nbflow.run(_wf(extract(2000), """  - name: push
    action: push
    needs: extract
    retries: 2"""), namespace={"push": push}, log=False)
    rc = run.root_cause
    assert (rc.error_type, rc.attempts, len(calls)) == ("ConnectionError", 3, 3)
    retries = rules(rc)["retries-exhausted"].evidence
    assert (retries["attempts"], retries["retries"], retries["same_error"]) == (3, 2, True)
    assert retries["errors"] == ["ConnectionError: warehouse db.internal:5432 refused the connection"] * 3
    top = rc.resolution_options[0]
    assert top.kind == "code" and "not transient" in top.estimate and "push" not in top.change
    assert "(after 3 attempts)" in rc.to_text()


def test_cascade_points_dependents_at_the_root(csv_in_workdir):
    def transform(df):
        if (df["amount"] < 0).any():
            raise ValueError(f"{int((df['amount'] < 0).sum())} negative amounts")
        return df

    ns = {"transform": transform, "report": lambda df: df, "count": lambda df: df}
    run = nbflow.run(_wf(extract(2000), """  - name: transform
    action: transform
    needs: extract
  - name: load
    action: data.load
    needs: transform
    params: {path: out.parquet}
  - name: report
    action: report
    needs: load
  - name: count
    action: count
    needs: extract"""), namespace=ns, log=False)
    assert run.status == "failed"
    rc = run.root_cause
    assert (rc.step, rc.error_type, rc.blocked) == ("transform", "ValueError", ("load", "report"))
    assert rc.upstream_status == {"extract": "completed"}
    for step in ("load", "report"):
        rec = run.records[step]
        assert (rec.status, rec.because_of, rec.skipped_reason) == (
            Status.SKIPPED, "transform", "skipped: transform failed")
        assert rec.root_cause is None  # only the root is diagnosed
    assert run.records["count"].status is Status.COMPLETED
    assert "Skipped because of it: load, report" in run.summary()


def test_interrupted_run_says_what_was_cancelled_and_what_is_kept(csv_in_workdir, monkeypatch):
    monkeypatch.setenv("NBFLOW_FUSE", "0")  # extract finishes before slow starts
    started = threading.Event()

    def slow(df):
        started.set()
        time.sleep(0.2)
        return df

    spec = nbflow.parse(_wf(extract(50), """  - name: slow
    action: slow
    needs: extract"""), namespace={"slow": slow})
    from nbflow.handle import prepare

    run = prepare(spec, namespace={"slow": slow}, log=False)
    canceller = threading.Thread(target=lambda: (started.wait(10), run.cancel()), name="canceller")
    canceller.start()
    run.execute()
    canceller.join()
    assert run.status == "cancelled"
    rc = run.root_cause
    assert (rc.step, rc.error_type) == ("slow", "RunInterrupted")
    why = rules(rc)
    assert why["cancelled"].evidence["running"] == ["slow"] and why["kept"].evidence["kept"] == ["extract"]
    assert 0 < why["cancelled"].evidence["chunks_done"] < why["cancelled"].evidence["chunks_total"]
    assert run.fixes[0].kind == "rerun" and "reuses extract" in run.fixes[0].estimate
    run.rerun(run.apply_fix(0))
    assert run.status == "completed" and run.records["extract"].status is Status.REUSED


def test_a_broken_diagnosis_still_reports_the_failure(csv_in_workdir, monkeypatch, caplog):
    from nbflow import causes

    def broken(*args, **kwargs):
        raise RuntimeError("bug in a rule")

    def t(df):
        return df["nope"]

    monkeypatch.setattr(causes.Context, "collect", broken)
    run = nbflow.run(_wf(extract(), """  - name: t
    action: t
    needs: extract"""), namespace={"t": t}, log=False)
    assert run.status == "failed"
    rc = run.root_cause
    assert (rc.step, rc.error_type) == ("t", "KeyError") and "bug in a rule" in rc.contributing_factors[0].text
    assert "diagnosing t failed" in caplog.text


# -- the views and the pieces ---------------------------------------------------------------

def test_html_escapes_every_string():
    evil = "<script>alert(1)</script>"
    rc = RootCause(step=evil, error_type=evil, message=evil, summary=evil,
                   location={"where": evil, "function": evil, "code": evil},
                   upstream_status={evil: "completed"},
                   contributing_factors=(Factor(evil, evil, {}),),
                   resolution_options=(Fix(title=evil, kind="code", snippet=evil, estimate=evil,
                                           confidence=0.5),),
                   workflow_diff=evil, blocked=(evil,))
    html = rc.to_html()
    assert "<script>" not in html and html.count("&lt;script&gt;") >= 10
    assert json.loads(rc.to_json())["error_type"] == evil
    assert RootCause.from_dict(json.loads(rc.to_json())) == rc


def test_text_edits_keep_comments_and_change_only_the_step():
    text = """name: x   # top
defaults: {chunk_size: 100000}
steps:
  - name: a   # first
    action: data.extract
    params:
      path: in.csv   # the input

  - name: b
    action: f
    needs: a
    # a trailing comment
  - {name: c, action: g, needs: b}
"""
    out = yamledit.set_step_setting(text, "a", "chunk_size", 500)
    out = yamledit.set_step_setting(out, "b", "streaming", True)
    out = yamledit.set_step_setting(out, "c", "max_memory", "2.5GB")
    assert out == text.replace("      path: in.csv   # the input\n",
                               "      path: in.csv   # the input\n      chunk_size: 500\n") \
        .replace("    needs: a\n", "    needs: a\n    streaming: true\n") \
        .replace("needs: b}", "needs: b, max_memory: 2.5GB}")
    spec = nbflow.parse(out)
    assert (spec.step("a").chunk_size, spec.step("b").streaming, spec.step("c").max_memory) == (
        500, True, 2_500_000_000)
    assert spec.defaults == {"chunk_size": 100000}


def test_round_numbers():
    assert [nice_down(x) for x in (0.5, 1, 112, 1936, 80_400, 99_999)] == [0, 1, 100, 1500, 80_000, 80_000]
    assert [nice_size_up(x) for x in (2.2e9, 1.0e9, 510e6, 3)] == ["2.5GB", "1GB", "600MB", "1MB"]


@pytest.mark.slow
def test_seed_scale_in_memory_transform_gets_a_chunk_size_that_runs_under_512mb(workdir):
    from nbflow.demo import OOM, generate_records

    generate_records(workdir / "records.csv", rows=1_000_000)
    run = nbflow.run(OOM, log=False)
    assert run.status == "failed"
    rc = run.root_cause
    assert (rc.step, rc.error_type, rc.processing_mode) == (
        "transform-data", "MemoryBudgetExceeded", "in-memory")
    assert rc.location["function"] in ("enrich_in_memory", "clean_records")
    assert {"in-memory", "input-exceeds-budget", "object-dtype", "copies-alive"} <= set(rules(rc))
    assert rules(rc)["input-exceeds-budget"].evidence["records"] == 1_000_000
    assert rules(rc)["object-dtype"].evidence["column"] == "note"
    top = rc.resolution_options[0]
    assert top.change["streaming"] is True and top.change["chunk_size"] in NICE
    assert top.estimated_peak <= 0.6 * 512 * MB
    run.rerun(run.apply_fix(0))
    assert run.status == "completed", run.summary()
    assert [run.records[s].status for s in ("extract-data", "validate-schema")] == [Status.REUSED] * 2
    assert run.records["transform-data"].info["memory"]["peak_above_baseline"] < 512 * MB
