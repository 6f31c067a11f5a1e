"""The part files that hold a checkpoint's data: one file per chunk, Arrow IPC or Parquet.

Checkpoints are written as uncompressed Arrow IPC files (``part-00000.arrow``) by
default: a checkpoint is a cache the next step reads at once and a rerun reads
again, and in IPC writing 100,000 demo records takes ~14 ms against ~39 ms for
snappy Parquet, reading them ~2 ms against ~15-19 ms. The price is disk: about
the data's size in memory, ~6x snappy Parquet for the demo records (135 MB per
million). ``NBFLOW_CHECKPOINT_FORMAT=parquet`` trades that back. Readers accept
both, so checkpoints written either way stay usable.

Both formats keep the pandas metadata Arrow records, so a chunk reads back with
the dtypes it was written with.

A chunk is converted between pandas and Arrow on the thread that runs it
(``to_arrow``, ``to_frame``), as Dask's Parquet engine does: a pass already
keeps a chunk per core busy, and Arrow's default would start a Python thread
pool for every ``from_pandas`` call (48 pools, ~2,000 thread switches in the
demo's 1M-row pass) and hand columns to its own pool in ``to_pandas``.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

FORMATS = ("arrow", "parquet")
_SUFFIX = {"arrow": ".arrow", "parquet": ".parquet"}


def checkpoint_format() -> str:
    """The format new checkpoints are written in: ``$NBFLOW_CHECKPOINT_FORMAT`` or arrow."""
    fmt = os.environ.get("NBFLOW_CHECKPOINT_FORMAT", "arrow").strip().lower() or "arrow"
    if fmt not in FORMATS:
        raise ValueError(f"NBFLOW_CHECKPOINT_FORMAT={fmt!r}: use one of {', '.join(FORMATS)}")
    return fmt


def part_name(chunk: int, fmt: str) -> str:
    return f"part-{chunk:05d}{_SUFFIX[fmt]}"


def part_files(folder: str | Path) -> list[Path]:
    """A checkpoint folder's part files in chunk order (either format)."""
    folder = Path(folder)
    return sorted(p for p in folder.glob("part-*") if p.suffix in (".arrow", ".parquet"))


def format_of(path: str | Path) -> str:
    return "parquet" if str(path).endswith(".parquet") else "arrow"


def to_arrow(df: pd.DataFrame):
    """A chunk as an Arrow table (no index), converted on this thread."""
    import pyarrow as pa

    return pa.Table.from_pandas(df, preserve_index=False, nthreads=1)


def to_frame(table, **options) -> pd.DataFrame:
    """An Arrow table as pandas, converted on this thread (``options``: ``to_pandas``'s).

    Text comes back as it went in: pandas 3 restores its string dtypes from the
    metadata, but pandas 2 restores ``string`` columns as Python objects
    (``string[python]``, ~2.8x the memory of the demo records in Arrow). With
    Dask's ``dataframe.convert-string`` on (its default), text is read as
    ``string[pyarrow]`` there, as Dask and nbflow's CSV reader give it.
    """
    if "types_mapper" not in options and _pandas2_arrow_strings():
        options["types_mapper"] = _arrow_text
    return table.to_pandas(use_threads=False, **options)


_PANDAS2 = int(pd.__version__.split(".")[0]) < 3


def _pandas2_arrow_strings() -> bool:
    if not _PANDAS2:
        return False
    from dask.dataframe.utils import pyarrow_strings_enabled

    return bool(pyarrow_strings_enabled())


def _arrow_text(kind):
    import pyarrow as pa

    return pd.StringDtype("pyarrow") if kind in (pa.string(), pa.large_string()) else None


def write_part(df: pd.DataFrame, path: str | Path, fmt: str, **options) -> int:
    """Write one chunk; returns its size in bytes. ``options`` go to Parquet's writer."""
    import pyarrow as pa

    table = to_arrow(df)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, path, **options)
    else:
        from pyarrow import ipc

        with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    return Path(path).stat().st_size


def read_part(path: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """One chunk as pandas reads it (``columns``: only those)."""
    if format_of(path) == "parquet":
        import pyarrow.parquet as pq

        return to_frame(pq.read_table(path, columns=columns, use_threads=False))
    import pyarrow as pa
    from pyarrow import ipc

    with pa.OSFile(str(path), "rb") as source:
        table = ipc.open_file(source).read_all()
    if columns is not None:
        table = table.select(list(columns))
    return to_frame(table)


def part_schema(path: str | Path):
    """The Arrow schema of a part file, read from its footer."""
    import pyarrow as pa

    if format_of(path) == "parquet":
        import pyarrow.parquet as pq

        return pq.read_schema(path)
    from pyarrow import ipc

    with pa.memory_map(str(path)) as source:
        return ipc.open_file(source).schema


def part_rows(path: str | Path) -> int:
    """Records in a part file, without decoding its values."""
    import pyarrow as pa

    if format_of(path) == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    from pyarrow import ipc

    with pa.memory_map(str(path)) as source:  # mapped: a batch's header, not its data
        reader = ipc.open_file(source)
        return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))


def read_head(path: str | Path, rows: int) -> pd.DataFrame:
    """The first ``rows`` records of a part file."""
    if format_of(path) == "parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=max(1, rows)):
            return to_frame(batch)
        return part_schema(path).empty_table().to_pandas()
    return read_part(path).head(max(0, rows))
