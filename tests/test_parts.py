"""Checkpoint part files: Arrow IPC by default, Parquet on request, both readable."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import nbflow
from nbflow import parts
from nbflow.state import Status

WORKFLOW = """\
name: parts
steps:
  - name: extract
    action: data.extract
    params: {path: records.csv, chunk_size: 300}
  - name: double
    action: double
    needs: extract
  - name: load
    action: data.load
    needs: double
    params: {path: out/doubled.parquet}
"""


def double(df):
    return df.assign(amount=df["amount"] * 2)


def frame(rows: int = 1000) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    return pd.DataFrame({
        "id": np.arange(rows, dtype="int64"),
        "when": pd.date_range("2026-01-01", periods=rows, freq="min"),
        "kind": pd.Categorical(rng.choice(["a", "b", "c"], rows)),
        # text as Dask gives it (pandas 2 would read back plain "string" as Python objects)
        "note": pd.array([None if i % 7 == 0 else f"n{i}" for i in range(rows)],
                         dtype=pd.StringDtype("pyarrow")),
        "amount": rng.normal(size=rows),
        "small": np.arange(rows, dtype="uint16"),
    })


@pytest.mark.parametrize("fmt", parts.FORMATS)
def test_a_part_reads_back_with_the_dtypes_it_was_written_with(tmp_path, fmt):
    df = frame()
    path = tmp_path / parts.part_name(3, fmt)
    size = parts.write_part(df, path, fmt)
    assert path.name == f"part-00003.{fmt}" and size == path.stat().st_size > 0
    pd.testing.assert_frame_equal(parts.read_part(path), df)
    pd.testing.assert_frame_equal(parts.read_part(path, ["note", "id"]), df[["note", "id"]])
    assert parts.part_rows(path) == 1000
    assert parts.part_schema(path).names == list(df.columns)
    pd.testing.assert_frame_equal(parts.read_head(path, 10), df.head(10))
    assert parts.format_of(path) == fmt


@pytest.mark.parametrize("fmt", parts.FORMATS)
def test_a_part_is_converted_on_the_calling_thread(tmp_path, fmt, monkeypatch):
    """A pass runs a chunk per core: Arrow's default starts a Python thread pool in every
    from_pandas of a frame this size, which only adds thread switches."""
    import concurrent.futures

    started = []

    class Counting(concurrent.futures.ThreadPoolExecutor):
        def __init__(self, *args, **kwargs):
            started.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(concurrent.futures, "ThreadPoolExecutor", Counting)
    df = frame(20_000)
    import pyarrow as pa

    pa.Table.from_pandas(df)  # the default: the check below would see this one
    assert started, "Arrow no longer starts a pool for from_pandas: the test needs a new probe"
    started.clear()
    path = tmp_path / parts.part_name(0, fmt)
    parts.write_part(df, path, fmt)
    pd.testing.assert_frame_equal(parts.read_part(path), df)
    assert started == []


def test_part_files_are_listed_in_chunk_order_whatever_their_format(tmp_path):
    for chunk, fmt in [(2, "arrow"), (0, "parquet"), (1, "arrow")]:
        parts.write_part(frame(5), tmp_path / parts.part_name(chunk, fmt), fmt)
    (tmp_path / "_nbflow.json").write_text("{}")
    (tmp_path / "part-00009.txt").write_text("not a part")
    assert [p.name for p in parts.part_files(tmp_path)] == [
        "part-00000.parquet", "part-00001.arrow", "part-00002.arrow"]


def test_checkpoint_format_setting(monkeypatch):
    monkeypatch.delenv("NBFLOW_CHECKPOINT_FORMAT", raising=False)
    assert parts.checkpoint_format() == "arrow"
    monkeypatch.setenv("NBFLOW_CHECKPOINT_FORMAT", " Parquet ")
    assert parts.checkpoint_format() == "parquet"
    monkeypatch.setenv("NBFLOW_CHECKPOINT_FORMAT", "csv")
    with pytest.raises(ValueError, match="use one of arrow, parquet"):
        parts.checkpoint_format()


def _checkpoint_names(run, step):
    return sorted(p.name for p in parts.part_files(run.records[step].checkpoint))


@pytest.fixture
def small_csv(workdir):
    frame(1000)[["id", "amount"]].to_csv(workdir / "records.csv", index=False)
    return workdir


def test_checkpoints_are_arrow_but_parquet_where_only_a_parquet_load_reads_them(small_csv, monkeypatch):
    monkeypatch.delenv("NBFLOW_CHECKPOINT_FORMAT", raising=False)
    run = nbflow.run(WORKFLOW, namespace={"double": double}, log=False)
    assert run.status == "completed", run.summary()
    assert _checkpoint_names(run, "extract") == [f"part-{i:05d}.arrow" for i in range(4)]
    assert _checkpoint_names(run, "double") == [f"part-{i:05d}.parquet" for i in range(4)]
    # so the load copied them byte for byte instead of encoding every value again
    out = sorted((small_csv / "out" / "doubled.parquet").iterdir())
    assert [p.read_bytes() for p in out] == [
        p.read_bytes() for p in parts.part_files(run.records["double"].checkpoint)]
    got = pd.read_parquet(small_csv / "out" / "doubled.parquet")
    np.testing.assert_allclose(got["amount"].to_numpy(), frame(1000)["amount"].to_numpy() * 2)


def test_a_load_with_its_own_options_gets_an_arrow_checkpoint_and_encodes_it(small_csv):
    zstd = WORKFLOW.replace("{path: out/doubled.parquet}", "{path: out/doubled.parquet, compression: zstd}")
    run = nbflow.run(zstd, namespace={"double": double}, log=False)
    assert _checkpoint_names(run, "double") == [f"part-{i:05d}.arrow" for i in range(4)]
    meta = pq.read_metadata(small_csv / "out" / "doubled.parquet" / "part-00000.parquet")
    assert meta.row_group(0).column(0).compression == "ZSTD"
    assert meta.num_rows == parts.part_rows(parts.part_files(run.records["double"].checkpoint)[0])


def test_parquet_checkpoints_of_an_earlier_run_are_reused(small_csv, monkeypatch):
    monkeypatch.setenv("NBFLOW_CHECKPOINT_FORMAT", "parquet")
    first = nbflow.run(WORKFLOW, namespace={"double": double}, log=False)
    assert _checkpoint_names(first, "extract") == [f"part-{i:05d}.parquet" for i in range(4)]
    monkeypatch.delenv("NBFLOW_CHECKPOINT_FORMAT")

    def triple(df):
        return df.assign(amount=df["amount"] * 3)

    again = nbflow.open_run(first.run_id, namespace={"double": triple})
    again.rerun()
    assert again.records["extract"].status is Status.REUSED  # its Parquet parts, read again
    assert again.records["double"].status is Status.COMPLETED
    expected = frame(1000)["amount"].to_numpy() * 3
    got = pd.read_parquet(small_csv / "out" / "doubled.parquet")
    np.testing.assert_allclose(got["amount"].to_numpy(), expected)
    np.testing.assert_allclose(again.outputs["double"].compute()["amount"].to_numpy(), expected)
