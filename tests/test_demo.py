"""The demo data and the demo transforms."""
from __future__ import annotations

import tracemalloc

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

from nbflow.actions import StepContext, resolve
from nbflow.demo import CLEAN_COLUMNS, DEMO_SCHEMA, RATES, clean_records, enrich_in_memory, generate_records
from nbflow.spec import StepSpec

ROWS = 20_000


@pytest.fixture(scope="module")
def demo_csv(tmp_path_factory):
    return generate_records(tmp_path_factory.mktemp("demo") / "records.csv", rows=ROWS, chunk=7_000)


@pytest.fixture(scope="module")
def raw(demo_csv) -> pd.DataFrame:
    return pd.read_csv(demo_csv)


def test_same_seed_same_bytes_other_seed_differs(tmp_path, demo_csv):
    again = generate_records(tmp_path / "a.csv", rows=ROWS, chunk=7_000)
    other = generate_records(tmp_path / "b.csv", rows=ROWS, seed=1, chunk=7_000)
    assert again.read_bytes() == demo_csv.read_bytes()
    assert other.read_bytes() != demo_csv.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "b.csv"]  # no temp files


def test_records_have_the_promised_shape(raw):
    assert list(raw.columns) == list(DEMO_SCHEMA)
    assert list(raw["id"]) == list(range(1, ROWS + 1))
    assert raw["timestamp"].is_monotonic_increasing
    stamps = pd.to_datetime(raw["timestamp"], format="ISO8601")
    assert stamps.min().year == 2025 and (stamps.max() - stamps.min()).days >= 360
    assert 0.02 < raw["country"].isna().mean() < 0.04
    assert 0.01 < raw["amount"].isna().mean() < 0.03
    assert 0.035 < (raw["amount"] < 0).mean() < 0.065
    assert set(raw["category"]) == set(RATES)
    assert raw["user"].str.fullmatch(r"user_\d{5}").all()
    notes = raw["note"]
    assert 30 < notes.str.len().mean() < 60
    assert notes.str.contains("\t").any() and notes.str.contains("  ").any()
    assert (notes != notes.str.strip()).any() and notes.str.contains("[A-Z]").any()


def test_demo_schema_validates_the_generated_file(tmp_path, demo_csv):
    ctx = StepContext(step=StepSpec("extract", "data.extract"), inputs={}, chunk_size=5_000,
                      streaming=True, workdir=tmp_path)
    data = resolve("data.extract").func(ctx, demo_csv)
    ctx.inputs = {"extract": data}
    effect = resolve("data.validate").func(ctx, DEMO_SCHEMA)
    frames = dask.compute(*effect.chunks.to_delayed(), scheduler="sync")
    assert effect.finish(pd.concat(frames)) == {"records_in": ROWS, "records_out": ROWS}


def check_clean(out: pd.DataFrame, raw: pd.DataFrame) -> None:
    assert tuple(out.columns) == CLEAN_COLUMNS
    kept = raw[raw["amount"].notna()].reset_index(drop=True)
    assert list(out["id"]) == list(kept["id"])
    assert out["amount"].notna().all()
    assert (out["refund"] == (out["amount"] < 0)).all() and out["refund"].any()
    assert out["country"].notna().all() and (out["country"] == "??").any()
    assert out["country"].str.fullmatch(r"[A-Z]{2}|\?\?").all()
    assert not out["note"].str.contains("[A-Z\t]").any()
    assert (out["note"] == out["note"].str.strip()).all()
    assert pd.api.types.is_datetime64_any_dtype(out["timestamp"])
    expected = (kept["amount"] * kept["category"].map(RATES)).round(2)
    np.testing.assert_allclose(out["amount_eur"], expected)


def test_clean_records(raw):
    check_clean(clean_records(raw), raw)


def test_clean_records_on_chunks_dask_reads(demo_csv, raw):
    # dask reads strings as string[pyarrow] (NA, not NaN, for missing values)
    ddf = dd.read_csv(demo_csv, blocksize=300_000)
    assert ddf.npartitions > 1
    check_clean(ddf.map_partitions(clean_records).compute().reset_index(drop=True), raw)
    assert resolve("demo.clean_records").kind == "chunk"


def test_enrich_in_memory_returns_what_clean_records_does(raw):
    pd.testing.assert_frame_equal(enrich_in_memory(raw.head(3_000)), clean_records(raw.head(3_000)))
    assert resolve("demo.enrich_in_memory").kind == "chunk"


def test_enrich_in_memory_keeps_every_copy_alive(raw):
    def peak(copies: int) -> int:
        tracemalloc.start()
        try:
            enrich_in_memory(raw.head(2_000), copies=copies)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    # memory grows pass by pass (so an in-process guard can stop it between two): each pass
    # keeps a new note of ~50+ bytes per row alive
    one, four, twelve = peak(1), peak(4), peak(12)
    assert one < four < twelve and twelve - one > 11 * 2_000 * 50
