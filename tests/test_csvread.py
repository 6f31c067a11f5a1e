"""data.extract's CSV reader: Arrow's parser where it gives exactly what Dask's pandas path gives."""
from __future__ import annotations

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

from nbflow.actions import csvread
from nbflow.errors import StepError

#: pandas 2's default float parser is not correctly rounded (pandas 3's is, like Arrow's)
PANDAS2 = int(pd.__version__.split(".")[0]) < 3


def messy(rows: int = 3000, ratio_digits: int | None = None) -> pd.DataFrame:
    rng = np.random.default_rng(7)
    ratio = rng.random(rows) / 3  # floats that need all 17 digits
    return pd.DataFrame({
        "id": np.arange(rows),
        "price": np.round(rng.normal(100, 40, rows), 4),
        "ratio": ratio if ratio_digits is None else np.round(ratio, ratio_digits),
        "flag": rng.choice([True, False], rows),
        "day": pd.date_range("2026-01-01", periods=rows, freq="h").strftime("%Y-%m-%d"),
        "at": pd.date_range("2026-01-01", periods=rows, freq="min").strftime("%Y-%m-%dT%H:%M:%S"),
        "city": rng.choice(["Berlin", "São Paulo", 'say "hi"', "a,b", "NA", "", "None", "null"], rows),
        "count": np.where(rng.random(rows) < 0.1, np.nan, rng.integers(0, 9, rows)),
    })


def through_dask(path, **kwargs) -> pd.DataFrame:
    return dd.read_csv(str(path), blocksize=20_000, **kwargs).compute(scheduler="sync").reset_index(drop=True)


def through_us(path, blocksize=20_000, **kwargs) -> pd.DataFrame:
    ddf = csvread.read_csv([path], blocksize, kwargs)
    assert ddf is not None, "the fast path was not taken"
    assert ddf.npartitions > 1
    return ddf.compute(scheduler="sync").reset_index(drop=True)


@pytest.mark.parametrize("convert_string", [True, False])
def test_gives_what_dask_read_csv_gives_value_for_value(tmp_path, convert_string):
    path = tmp_path / "messy.csv"
    messy().to_csv(path, index=False)
    if PANDAS2:  # it reads some 17-digit values 1 ulp off Arrow's: those files take Dask's path
        assert csvread.read_csv([path], 20_000, {}) is None
        messy(ratio_digits=12).to_csv(path, index=False)
    with dask.config.set({"dataframe.convert-string": convert_string}):
        ours, theirs = through_us(path), through_dask(path)
    pd.testing.assert_frame_equal(ours, theirs, check_exact=True)
    assert ours["day"].iloc[0] == "2026-01-01" and ours["at"].iloc[0] == "2026-01-01T00:00:00"
    assert ours["city"].isna().sum() == theirs["city"].isna().sum() > 0  # NA, "", None, null


def test_tsv_columns_dtype_crlf_and_a_bom(tmp_path):
    path = tmp_path / "data.tsv"
    text = messy(2000).to_csv(sep="\t", index=False, lineterminator="\r\n")
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    kwargs = {"sep": "\t", "usecols": ["id", "city", "count"], "dtype": {"id": "float64"}}
    ours, theirs = through_us(path, **kwargs), through_dask(path, **kwargs)
    pd.testing.assert_frame_equal(ours, theirs, check_exact=True)
    assert list(ours.columns) == ["id", "city", "count"] and ours["id"].dtype == "float64"


def test_blocks_cover_every_record_once(tmp_path):
    path = tmp_path / "ids.csv"
    pd.DataFrame({"id": np.arange(10_007), "x": "v"}).to_csv(path, index=False)
    for blocksize in (997, 5_000, 40_000, 10**9):
        ids = csvread.read_csv([path], blocksize, {}).compute(scheduler="sync")["id"]
        assert ids.tolist() == list(range(10_007)), blocksize


def test_pandas_options_it_does_not_know_go_to_pandas(tmp_path):
    path = tmp_path / "m.csv"
    messy(500).to_csv(path, index=False)
    assert csvread.read_csv([path], 10_000, {"parse_dates": ["day"]}) is None
    assert csvread.read_csv([path], 10_000, {"sep": ";;"}) is None
    assert csvread.read_csv([path], 10_000, {"dtype": {"id": "Int32"}}) is None


@pytest.mark.parametrize("header, body", [
    ("a,a,b", "1,2,3\n"),        # pandas renames the second a to a.1
    ("a,,b", "1,2,3\n"),         # and the blank one to "Unnamed: 1"
    ("a,b", ",\n,\n"),           # every value empty in the sample: pandas picks the dtype
    ("a,b", "1,2\n"),            # the header is all there is besides one row: fine
])
def test_samples_arrow_cannot_match_go_to_pandas(tmp_path, header, body):
    path = tmp_path / "odd.csv"
    path.write_text(f"{header}\n{body}")
    fast = csvread.read_csv([path], 10_000, {})
    if header == "a,b" and body == "1,2\n":
        assert fast is not None
        pd.testing.assert_frame_equal(fast.compute(), through_dask(path))
    else:
        assert fast is None


def test_a_block_arrow_cannot_convert_is_parsed_by_pandas(tmp_path, monkeypatch):
    # "+42" far into the file: Arrow's integer parser says no, pandas' reads 42
    rows = ["id,code"] + [f"{i},{i % 100}" for i in range(40_000)] + ["40000,+42"]
    path = tmp_path / "codes.csv"
    path.write_text("\n".join(rows) + "\n")
    by_pandas = []
    real = csvread._pandas_block
    monkeypatch.setattr(csvread, "_pandas_block", lambda *a: by_pandas.append(a[3]) or real(*a))
    ours, theirs = through_us(path, blocksize=50_000), through_dask(path)
    pd.testing.assert_frame_equal(ours, theirs, check_exact=True)
    assert ours["code"].iloc[-1] == 42 and len(by_pandas) == 1  # only the block that needed it


def test_a_gap_in_whole_numbers_after_the_sample_names_the_column_and_the_fix(tmp_path):
    rows = ["id,qty"] + [f"{i},{i % 7}" for i in range(40_000)] + ["40000,"]
    path = tmp_path / "qty.csv"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(StepError) as err:
        through_us(path, blocksize=60_000)
    assert "column 'qty'" in str(err.value) and "dtype: {qty: float64}" in str(err.value)
    assert err.value.details["fix"] == {"dtype": {"qty": "float64"}}


def test_text_after_the_sample_in_a_number_column_says_what_it_found(tmp_path):
    rows = ["id,amount"] + [f"{i},{i * 1.5}" for i in range(40_000)] + ["40000,n/a-ish"]
    path = tmp_path / "amounts.csv"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(StepError, match=r"column 'amount' .* values like 'n/a-ish' .* dtype: \{amount: string\}"):
        through_us(path, blocksize=60_000)
