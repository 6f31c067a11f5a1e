"""The built-in data.* actions on real files made in tmp_path."""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nbflow.actions import Effect, StepContext, registered, resolve
from nbflow.actions.sinks import AtomicWriter, parquet_sink, recover
from nbflow.errors import InputNotFound, SchemaError, StepError
from nbflow.spec import StepSpec

ROWS = 1000


def records(rows: int = ROWS) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    amount = np.round(rng.normal(50, 20, rows), 2)
    amount[::50] = np.nan
    return pd.DataFrame({
        "id": np.arange(1, rows + 1),
        "user": [f"user_{i % 97:03d}" for i in range(rows)],
        "amount": amount,
        "note": rng.choice(["Gift wrap", "  late  ", "call first", "ok"], rows),
    })


def ctx(tmp_path: Path, chunk_size: int = 100, streaming: bool = True, data=None) -> StepContext:
    inputs = {"up": data} if data is not None else {}
    return StepContext(step=StepSpec("step", "data.x"), inputs=inputs, chunk_size=chunk_size,
                       streaming=streaming, workdir=tmp_path)


def sizes(ddf) -> list[int]:
    return [int(n) for n in ddf.map_partitions(len).compute(scheduler="sync")]


def run(effect: Effect):
    """What the engine does with an Effect: compute every chunk's frame, then finish."""
    frames = dask.compute(*effect.chunks.to_delayed(), scheduler="sync")
    return effect.finish(pd.concat(frames, ignore_index=True))


@pytest.fixture
def csv(tmp_path) -> Path:
    path = tmp_path / "records.csv"
    records().to_csv(path, index=False)
    return path


def test_builtins_are_registered():
    names = registered()
    for name in ("data.extract", "data.validate", "data.load"):
        assert names[name].kind == "step"
    assert resolve("demo.clean_records").kind == "chunk"


# -- extract ---------------------------------------------------------------------------------

def test_extract_csv_partitions_stay_under_chunk_size(tmp_path, csv):
    ddf = resolve("data.extract").func(ctx(tmp_path, 100), "records.csv")
    counts = sizes(ddf)
    assert sum(counts) == ROWS and max(counts) <= 100
    assert 10 <= len(counts) <= 13  # about chunk_size: sized with a 10% margin
    pd.testing.assert_frame_equal(ddf.compute().reset_index(drop=True), pd.read_csv(csv),
                                  check_dtype=False)


def test_extract_csv_chunk_close_to_file_size_still_splits(tmp_path, csv):
    # dask makes size // blocksize blocks and spreads the rest: one 1000-row block here
    # unless the block size is chosen to divide the file evenly
    counts = sizes(resolve("data.extract").func(ctx(tmp_path, 700), csv))
    assert sum(counts) == ROWS and max(counts) <= 700 and len(counts) == 2


@pytest.mark.parametrize("name", ["records.parquet", "records.jsonl", "records.csv.gz",
                                  "records.tsv", "records.ndjson.gz"])
def test_extract_formats_bounded_and_complete(tmp_path, name):
    df = records()
    path = tmp_path / name
    if ".parquet" in name:
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path, row_group_size=350)
    elif ".tsv" in name:
        df.to_csv(path, sep="\t", index=False)
    elif "json" in name:
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_csv(path, index=False)
    ddf = resolve("data.extract").func(ctx(tmp_path, 128), name)
    counts = sizes(ddf)
    assert sum(counts) == ROWS and max(counts) <= 128 and len(counts) <= 12
    out = ddf.compute()
    assert list(out["id"]) == list(range(1, ROWS + 1))
    assert list(out.columns) == list(df.columns)


def test_extract_parquet_dataset_folder_and_columns(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    df = records()
    for i in range(3):
        part = df.iloc[i * 400:(i + 1) * 400]
        pq.write_table(pa.Table.from_pandas(part, preserve_index=False),
                       folder / f"part-{i:05d}.parquet")
    (folder / "_SUCCESS").touch()
    ddf = resolve("data.extract").func(ctx(tmp_path, 150), "ds", columns=["id", "amount"])
    assert list(ddf.columns) == ["id", "amount"]
    assert sizes(ddf) == [133, 133, 134, 133, 133, 134, 100, 100]
    assert list(ddf.compute()["id"]) == list(range(1, ROWS + 1))


def test_extract_glob_reads_every_match(tmp_path):
    (tmp_path / "in").mkdir()
    for i in range(2):
        records().assign(id=lambda d, i=i: d["id"] + i * ROWS).to_csv(
            tmp_path / "in" / f"day{i}.csv", index=False)
    ddf = resolve("data.extract").func(ctx(tmp_path, 250), "in/day*.csv")
    counts = sizes(ddf)
    assert sum(counts) == 2 * ROWS and max(counts) <= 250
    assert sorted(ddf.compute()["id"]) == list(range(1, 2 * ROWS + 1))


def test_extract_not_streaming_reads_all_then_cuts_exact_chunks(tmp_path, csv):
    ddf = resolve("data.extract").func(ctx(tmp_path, 300, streaming=False), csv,
                                       columns=["id", "amount"])
    assert sizes(ddf) == [300, 300, 300, 100]
    assert list(ddf.columns) == ["id", "amount"]


def test_extract_missing_file_suggests_near_names(tmp_path, csv):
    with pytest.raises(InputNotFound) as info:
        resolve("data.extract").func(ctx(tmp_path), "recrods.csv")
    err = info.value
    assert "recrods.csv" in str(err) and "did you mean 'records.csv'?" in str(err)
    assert err.details["near"] == ["records.csv"]
    assert err.details["path"] == str(tmp_path / "recrods.csv")
    assert isinstance(err, FileNotFoundError)
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.details == err.details


def test_extract_missing_folder_and_empty_glob(tmp_path):
    (tmp_path / "data").mkdir()
    records().to_csv(tmp_path / "data" / "records.csv", index=False)
    with pytest.raises(InputNotFound) as info:
        resolve("data.extract").func(ctx(tmp_path), "dta/records.csv")
    assert info.value.details["near"] == ["data/records.csv"]
    with pytest.raises(InputNotFound, match=r"nothing matches .*\*\.parquet"):
        resolve("data.extract").func(ctx(tmp_path), "data/*.parquet")



def test_extract_names_an_empty_file_and_reads_a_header_only_one(tmp_path):
    (tmp_path / "data").mkdir()
    records(10).to_csv(tmp_path / "data" / "a.csv", index=False)
    (tmp_path / "data" / "b.csv").write_text("")  # an export still being written
    with pytest.raises(StepError, match=r"data/b.csv is empty \(0 bytes\): no header to read the columns"):
        resolve("data.extract").func(ctx(tmp_path), "data/*.csv")
    (tmp_path / "data" / "b.csv").write_text("id,user,amount,note\n")
    assert len(resolve("data.extract").func(ctx(tmp_path), "data/*.csv").compute()) == 10

def test_extract_unknown_suffix_asks_for_format(tmp_path):
    (tmp_path / "records.dat").write_text("id\n1\n")
    with pytest.raises(StepError, match="add format"):
        resolve("data.extract").func(ctx(tmp_path), "records.dat")
    ddf = resolve("data.extract").func(ctx(tmp_path), "records.dat", format="csv")
    assert list(ddf.compute()["id"]) == [1]


# -- validate --------------------------------------------------------------------------------

SCHEMA = {"id": {"dtype": "int64", "nullable": False}, "user": "string",
          "amount": "float64", "note": {"dtype": "str", "nullable": True}}


def validate(tmp_path, data, schema, chunk_size=100):
    ddf = data if not isinstance(data, pd.DataFrame) else dd.from_pandas(
        data, chunksize=chunk_size)
    return resolve("data.validate").func(ctx(tmp_path, chunk_size, data=ddf), schema)


def test_validate_passes_and_counts_records(tmp_path, csv):
    ddf = resolve("data.extract").func(ctx(tmp_path, 100), csv)
    effect = validate(tmp_path, ddf, SCHEMA)
    assert effect.output is ddf and effect.passthrough
    frames = pd.concat(dask.compute(*effect.chunks.to_delayed(), scheduler="sync"))
    assert frames["records"].sum() == ROWS
    assert effect.finish(frames) == {"records_in": ROWS, "records_out": ROWS}


def test_validate_reports_missing_column_with_suggestion(tmp_path):
    schema = {**SCHEMA, "amt": "float64", "optional": {"dtype": "int", "required": False}}
    with pytest.raises(SchemaError) as info:
        run(validate(tmp_path, records(), schema))
    assert str(info.value) == "column 'amt' is missing (did you mean 'amount'?)"
    [problem] = info.value.details["problems"]
    assert problem["column"] == "amt" and problem["kind"] == "missing"
    assert info.value.details["records"] == ROWS


def test_validate_reports_unparseable_strings_with_counts_and_examples(tmp_path):
    df = records().astype({"amount": "str"})
    df.loc[[5, 50, 500], "amount"] = ["oops", "—", "12,5"]
    path = tmp_path / "bad.csv"
    df.to_csv(path, index=False)
    ddf = resolve("data.extract").func(ctx(tmp_path, 100), path)
    with pytest.raises(SchemaError) as info:
        run(validate(tmp_path, ddf, SCHEMA))
    message = str(info.value)
    assert message.startswith("column 'amount': expected float64, found ")
    assert "3 of 1,000 rows don't parse (e.g. 'oops', '—', '12,5')" in message
    [problem] = info.value.details["problems"]
    assert problem["kind"] == "dtype" and problem["count"] == 3
    assert problem["examples"] == ["oops", "—", "12,5"]
    assert problem["chunks"][0] == 0 and len(problem["chunks"]) == 2  # rows 5 and 50 share one


def test_validate_int_column_read_as_float_counts_the_gaps(tmp_path):
    df = records().astype({"id": "float64"})
    df.loc[[3, 4, 999], "id"] = [np.nan, 2.5, np.nan]
    with pytest.raises(SchemaError) as info:
        run(validate(tmp_path, df, {"id": "int64"}))
    assert ("column 'id': expected int64, found float64 — 3 of 1,000 rows are empty or not "
            "whole numbers (e.g. empty, 2.5)") == str(info.value)


def test_validate_nulls_where_not_nullable_and_several_problems(tmp_path):
    df = records()
    df.loc[[10, 20], "id"] = None  # id becomes float64 with NaN: a dtype and a nulls problem
    df["user"] = np.arange(ROWS)
    with pytest.raises(SchemaError) as info:
        run(validate(tmp_path, df, SCHEMA))
    problems = info.value.details["problems"]
    assert [(p["column"], p["kind"], p["count"]) for p in problems] == [
        ("id", "dtype", 2), ("id", "nulls", 2), ("user", "dtype", ROWS)]
    lines = str(info.value).splitlines()
    assert lines[0] == "3 schema problems:"
    assert "column 'id': 2 of 1,000 rows are empty, but it is not nullable" in lines[2]
    assert "column 'user': expected string, found int64" in lines[3]


def test_validate_rejects_unknown_dtype_before_running(tmp_path):
    with pytest.raises(StepError, match="column 'id' has dtype 'integer'"):
        validate(tmp_path, records(), {"id": "integer"})


# -- load ------------------------------------------------------------------------------------

def source(chunk_size=100):
    return dd.from_pandas(records(), chunksize=chunk_size)


def test_load_parquet_writes_one_part_per_chunk(tmp_path):
    result = run(resolve("data.load").func(ctx(tmp_path, data=source()), "out/records.parquet"))
    dest = tmp_path / "out" / "records.parquet"
    parts = sorted(p.name for p in dest.iterdir())
    assert parts == [f"part-{i:05d}.parquet" for i in range(10)]
    assert result["records_out"] == ROWS and result["path"] == str(dest)
    assert result["bytes"] == sum(p.stat().st_size for p in dest.iterdir())
    pd.testing.assert_frame_equal(pd.read_parquet(dest), records(), check_dtype=False)


def test_parquet_sink_writes_empty_chunks_with_their_schema(tmp_path):
    ddf = source().map_partitions(lambda df: df[df["id"] <= 150])
    result = run(parquet_sink(ddf, tmp_path / "ck"))
    assert result["parts"] == 10 and result["records_out"] == 150
    empty = pq.read_table(tmp_path / "ck" / "part-00009.parquet")
    assert empty.num_rows == 0 and empty.column_names == list(records().columns)
    assert len(pd.read_parquet(tmp_path / "ck")) == 150


def test_load_csv_concatenates_parts_with_one_header(tmp_path):
    effect = resolve("data.load").func(ctx(tmp_path, data=source()), "out.csv")
    assert effect.output is None
    result = run(effect)
    text = (tmp_path / "out.csv").read_text()
    assert text.count('"id"') == 1
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "out.csv"), records())
    assert result["records_out"] == ROWS and result["bytes"] == len(text.encode())
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def snapshot(path: Path) -> dict[str, bytes]:
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return {f.name: f.read_bytes() for f in files}


def failing_source():
    def explode(df, partition_info=None):
        if partition_info and partition_info["number"] == 6:
            raise RuntimeError("disk full")
        return df
    return source().map_partitions(explode)


@pytest.mark.parametrize("name", ["out.parquet", "out.csv"])
def test_load_failure_leaves_old_output_and_abort_removes_parts(tmp_path, name):
    load = resolve("data.load").func
    run(load(ctx(tmp_path, data=source().head(5, npartitions=1, compute=False)), name))
    before = snapshot(tmp_path / name)
    effect = load(ctx(tmp_path, data=failing_source()), name)
    with pytest.raises(RuntimeError, match="disk full"):
        run(effect)
    assert list(tmp_path.glob(f"{name}.tmp-*"))  # parts of the failed run, not yet removed
    effect.abort()
    effect.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    assert snapshot(tmp_path / name) == before


def test_load_replaces_existing_dataset_and_finish_is_idempotent(tmp_path):
    load = resolve("data.load").func
    run(load(ctx(tmp_path, data=source(500)), "out"))
    effect = load(ctx(tmp_path, data=source(250)), "out")
    frames = pd.concat(dask.compute(*effect.chunks.to_delayed(), scheduler="sync"))
    first = effect.finish(frames)
    assert effect.finish(frames) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert len(list((tmp_path / "out").iterdir())) == 4
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "out"), records(), check_dtype=False)


def test_commit_failing_mid_swap_puts_the_old_dataset_back(tmp_path, monkeypatch):
    load = resolve("data.load").func
    run(load(ctx(tmp_path, data=source(500)), "out"))
    old = sorted(p.name for p in (tmp_path / "out").iterdir())
    effect = load(ctx(tmp_path, data=source(250)), "out")
    frames = pd.concat(dask.compute(*effect.chunks.to_delayed(), scheduler="sync"))
    rename = os.rename

    def failing_rename(src, dst):
        if ".tmp-" in str(src):
            raise OSError("device busy")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="device busy"):
        effect.finish(frames)
    monkeypatch.undo()
    effect.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == old == ["part-00000.parquet",
                                                                         "part-00001.parquet"]


def test_load_refuses_to_overwrite_when_told(tmp_path):
    (tmp_path / "out.csv").write_text("keep\n")
    with pytest.raises(StepError, match="overwrite is false"):
        resolve("data.load").func(ctx(tmp_path, data=source()), "out.csv", overwrite=False)
    assert (tmp_path / "out.csv").read_text() == "keep\n"



def tree(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.mark.parametrize("path, says", [
    (".", "is the working directory"),
    ("..", "is a folder above the working directory"),
    ("mine", "is a folder holding files that are not Parquet parts (notes.txt, sub/data.csv)"),
    ("mine/notes.txt", "is a file that is not Parquet"),
    ("mine/pipe", "is not a regular file or folder (a device, a pipe or a broken link)"),
])
def test_load_never_replaces_what_is_not_an_earlier_output(tmp_path, path, says):
    # the commit swaps the whole destination for the new data: a wrong path must lose nothing
    work = tmp_path / "work"
    (work / "mine" / "sub").mkdir(parents=True)
    (work / "mine" / "notes.txt").write_text("my notes\n")
    (work / "mine" / "sub" / "data.csv").write_text("id\n1\n")
    (work / "mine" / "p.parquet").write_bytes(b"PAR1")
    os.mkfifo(work / "mine" / "pipe")  # like /dev/null: replaced by a rename, it would be gone
    before = tree(tmp_path)
    step = StepContext(step=StepSpec("save", "data.load"), inputs={"up": source()}, chunk_size=100,
                       streaming=True, workdir=work)
    fmt = "csv" if path.endswith("pipe") else "parquet"
    with pytest.raises(StepError, match=f"{re.escape(says)}.*nothing was written — choose another path "
                                        rf"\(e.g. path: out/save.{fmt}\)"):
        resolve("data.load").func(step, path, format=fmt)
    if fmt == "parquet":
        with pytest.raises(StepError, match="nothing was written"):  # the pass's writer checks the same
            resolve("data.load").chunk_sink(path=path, format=fmt)(step)
    assert tree(tmp_path) == before and (work / "mine" / "pipe").is_fifo()


def test_load_replaces_a_dataset_another_tool_wrote(tmp_path):
    spark = tmp_path / "out"
    spark.mkdir()
    records().to_parquet(spark / "part-00000-1234.snappy.parquet")
    (spark / "_SUCCESS").touch()
    (spark / ".part-00000-1234.snappy.parquet.crc").write_bytes(b"crc")
    run(resolve("data.load").func(ctx(tmp_path, data=source(500)), "out"))
    assert sorted(p.name for p in spark.iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    with pytest.raises(StepError, match="'out' is a folder, and a CSV output is one file"):
        resolve("data.load").func(ctx(tmp_path, data=source(500)), "out", format="csv")


@pytest.mark.parametrize("second, says", [
    (pd.DataFrame({"id": [3]}), "chunk 1 has no 'amount' (chunk 0 has id, amount)"),
    (pd.DataFrame({"id": [3], "amount": ["x"]}), "column 'amount' is double in chunk 0 but string in chunk 1"),
    (pd.DataFrame({"id": [3.5], "amount": [1.0]}), "column 'id' is int64 in chunk 0 but double in chunk 1 "
                                                   "(whole numbers turn into floats"),
])
def test_chunks_with_other_columns_or_types_fail_the_commit(tmp_path, second, says):
    # read back as one dataset they would take chunk 0's schema, silently (nulls, casts)
    writer = AtomicWriter(tmp_path / "out", "arrow", {})
    writer.part(pd.DataFrame({"id": [1, 2], "amount": [1.5, 2.5]}), 0)
    writer.part(second, 1)
    with pytest.raises(StepError, match=re.escape(says)):
        writer.commit()
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_a_chunk_whose_column_is_all_missing_still_fits(tmp_path):
    writer = AtomicWriter(tmp_path / "out", "parquet", {"compression": "snappy"})
    writer.part(pd.DataFrame({"id": [1, 2], "note": pd.array(["a", "b"], dtype="string[pyarrow]")}), 0)
    writer.part(pd.DataFrame({"id": [3], "note": [None]}), 1)  # Arrow's null type
    writer.commit()
    assert pd.read_parquet(tmp_path / "out")["note"].isna().sum() == 1

# A writer killed outright (SIGKILL: no finally, no abort) in a real process, at two places
KILLED_WRITER = """
import os, signal, sys
import pandas as pd
from nbflow.actions.sinks import AtomicWriter
dest, where = sys.argv[1], sys.argv[2]
writer = AtomicWriter(dest, "parquet", {"compression": "snappy"})
writer.part(pd.DataFrame({"id": [3, 4]}), 0)
if where == "between-renames":
    rename = os.rename
    def rename_then_die(src, dst):
        rename(src, dst)
        if ".old-" in str(dst):
            os.kill(os.getpid(), signal.SIGKILL)
    os.rename = rename_then_die
    writer.commit()
elif where == "while-writing":
    os.kill(os.getpid(), signal.SIGKILL)
else:  # alive: still writing when the next writer comes
    print("written", flush=True)
    sys.stdin.read()
"""


def killed_writer(dest: Path, where: str):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(dest), where],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def old_dataset(dest: Path) -> None:
    dest.mkdir()
    pd.DataFrame({"id": [1, 2]}).to_parquet(dest / "part-00000.parquet")


@pytest.mark.parametrize("where", ["while-writing", "between-renames"])
def test_what_a_killed_writer_left_is_recovered_by_the_next(tmp_path, where):
    dest = tmp_path / "out"
    old_dataset(dest)
    proc = killed_writer(dest, where)
    assert proc.wait(timeout=60) == -9
    left = sorted(p.name for p in tmp_path.iterdir())
    if where == "between-renames":  # the old data moved aside, the new not yet in: no `out`
        assert "out" not in left and any(n.startswith("out.old-") for n in left)
    assert any(n.startswith("out.tmp-") for n in left) or where == "between-renames"
    removed = recover(dest)
    assert removed and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert pd.read_parquet(dest)["id"].tolist() == [1, 2]  # the old data, whole


def test_a_new_writer_recovers_first_and_a_live_writers_parts_are_left_alone(tmp_path):
    dest = tmp_path / "out"
    old_dataset(dest)
    dead = killed_writer(dest, "while-writing")
    assert dead.wait(timeout=60) == -9
    live = killed_writer(dest, "alive")
    try:
        assert live.stdout.readline() == "written\n"
        (live_tmp,) = [p for p in tmp_path.glob("out.tmp-*") if f"-{live.pid}-" in p.name]
        load = resolve("data.load").func
        run(load(ctx(tmp_path, data=source(500)), "out"))
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live_tmp.name])
        assert len(pd.read_parquet(dest)) == len(records())
    finally:
        live.communicate("", timeout=60)
    assert recover(dest) == [live_tmp]  # its process is gone without a commit: abandoned
    # a name without host and process (not nbflow's, or an older nbflow's) is never touched
    (tmp_path / "out.tmp-abc").mkdir()
    assert recover(dest) == []


# -- load from a checkpoint: parts copied, not re-encoded --------------------------------------

def checkpoint(tmp_path: Path, chunk_size: int = 250):
    """A committed checkpoint of records(), opened the way the executor opens a step's input."""
    from nbflow.engine.chunks import open_checkpoint
    from nbflow.store import CHECKPOINT_META, write_json_atomic

    folder = tmp_path / "checkpoint"
    run(parquet_sink(source(chunk_size), folder))
    write_json_atomic(folder / CHECKPOINT_META, {"step": "up", "key": "k"})
    return folder, open_checkpoint(str(folder), "up")


def test_load_copies_the_parts_of_an_unchanged_checkpoint(tmp_path):
    folder, ddf = checkpoint(tmp_path)
    result = run(resolve("data.load").func(ctx(tmp_path, data=ddf), "out"))
    parts = sorted((tmp_path / "out").iterdir())
    assert [p.name for p in parts] == [f"part-{i:05d}.parquet" for i in range(4)]
    assert [p.read_bytes() for p in parts] == [(folder / p.name).read_bytes() for p in parts]
    assert result["records_out"] == ROWS and result["bytes"] == sum(p.stat().st_size for p in parts)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "out"), records(), check_dtype=False)


def test_load_re_encodes_a_checkpoint_when_asked_for_other_options(tmp_path):
    folder, ddf = checkpoint(tmp_path)
    run(resolve("data.load").func(ctx(tmp_path, data=ddf), "out", compression="zstd"))
    meta = pq.read_metadata(tmp_path / "out" / "part-00000.parquet")
    assert meta.row_group(0).column(0).compression == "ZSTD"
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "out"), records(), check_dtype=False)


def test_load_writes_what_a_changed_checkpoint_holds(tmp_path):
    _, ddf = checkpoint(tmp_path)
    run(resolve("data.load").func(ctx(tmp_path, data=ddf[["id", "amount"]]), "out"))
    assert list(pd.read_parquet(tmp_path / "out").columns) == ["id", "amount"]


def test_checkpoint_column_selection_reads_only_those_columns(tmp_path, monkeypatch):
    _, ddf = checkpoint(tmp_path)
    asked = []
    read = pq.read_table

    def spy(path, *args, columns=None, **kwargs):
        asked.append(columns)
        return read(path, *args, columns=columns, **kwargs)

    monkeypatch.setattr(pq, "read_table", spy)
    got = ddf[["id", "user"]].compute(scheduler="sync")
    assert asked and all(c == ["id", "user"] for c in asked)
    pd.testing.assert_frame_equal(got.reset_index(drop=True), records()[["id", "user"]], check_dtype=False)
