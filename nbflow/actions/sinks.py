"""Writing chunked outputs atomically: every chunk into a temporary sibling, then one rename.

Used by ``data.load`` and by the engine for step checkpoints, so a failed or interrupted
run never leaves a half-written output: ``dest`` holds the complete old or new data.

A process killed outright (SIGKILL, the OOM killer) can't tidy up: it leaves its
``<dest>.tmp-*`` parts, or, killed between the two renames that swap a folder
in, its ``<dest>.old-*`` backup with ``dest`` missing. Those names carry the
writer's host and process id, and the next writer of ``dest`` puts such a backup
back and deletes the parts once that process is gone (``recover``); a live
writer's files, or another machine's, are left alone.
"""
from __future__ import annotations

import glob
import os
import shutil
import uuid
from pathlib import Path

import pandas as pd

from nbflow.actions.registry import Effect
from nbflow.errors import StepError
from nbflow.owner import gone, owner
from nbflow.parts import (
    checkpoint_format,
    format_of,
    part_name,
    part_rows,
    part_schema,
    read_part,
    to_arrow,
    write_part,
)

WRITE_META = pd.DataFrame({"chunk": pd.Series(dtype="int64"), "records": pd.Series(dtype="int64"),
                            "bytes": pd.Series(dtype="int64")})


def parquet_sink(ddf, dest: str | Path, *, compression: str = "snappy", **write_options) -> Effect:
    """Write ``ddf`` as ``dest/part-00000.parquet``, ... : all of it, or nothing.

    Parts go to a temporary sibling folder; ``finish`` swaps it in for ``dest`` and
    ``abort`` deletes it, so ``dest`` only ever holds a complete old or new dataset.
    """
    writer = AtomicWriter(Path(dest), "parquet", {"compression": compression, **write_options})
    return sink(ddf, writer)


def checkpoint_sink(ddf, dest: str | Path, fmt: str | None = None,
                    writer: AtomicWriter | None = None) -> Effect:
    """A step's checkpoint: ``ddf`` as part files in the checkpoint format, atomically
    (``writer``: one that already holds some of its parts)."""
    return sink(ddf, writer or checkpoint_writer(dest, fmt))


def checkpoint_writer(dest: str | Path, fmt: str | None = None) -> AtomicWriter:
    """The writer of a step's checkpoint parts (in the checkpoint format unless ``fmt``)."""
    fmt = fmt or checkpoint_format()
    return AtomicWriter(Path(dest), fmt, {"compression": "snappy"} if fmt == "parquet" else {})


def sink(ddf, writer: AtomicWriter) -> Effect:
    chunks = ddf.map_partitions(_write_chunk, writer, meta=WRITE_META)
    return Effect(chunks=chunks, finish=writer.commit, output=None, abort=writer.abort)


def _write_chunk(df: pd.DataFrame, writer: AtomicWriter, partition_info=None) -> pd.DataFrame:
    return writer.part(df, partition_info["number"] if partition_info else 0)


def copy_part(source: str, chunk: int, writer: AtomicWriter) -> pd.DataFrame:
    return writer.copy(source, chunk)


class AtomicWriter:
    """Part files in ``<dest>.tmp-<owner>-<id>``, committed by a rename (or a concatenation
    for CSV). What a killed writer left beside ``dest`` is recovered first (``recover``).

    ``fmt``: ``parquet`` or ``arrow`` (a folder of part files), or ``csv`` (one file).
    """

    def __init__(self, dest: Path, fmt: str, options: dict, columns: list[str] | None = None,
                 *, overwrite: bool = True):
        self.dest = Path(dest)
        self.fmt = fmt
        self.options = dict(options)
        self.columns = columns
        recover(self.dest)
        self.tmp = self.dest.with_name(f"{self.dest.name}.tmp-{owner()}-{uuid.uuid4().hex[:12]}")
        self.overwrite = bool(overwrite)
        self._result: dict | None = None

    def __dask_tokenize__(self):
        return ("nbflow-atomic-writer", str(self.dest), str(self.tmp), self.fmt, repr(self.options))

    def part(self, df: pd.DataFrame, chunk: int) -> pd.DataFrame:
        self.tmp.mkdir(parents=True, exist_ok=True)
        if self.fmt == "csv":
            import pyarrow.csv as pacsv

            path = self.tmp / f"part-{chunk:05d}.csv"
            # pyarrow writes CSV ~15x faster than DataFrame.to_csv
            table = to_arrow(df)
            pacsv.write_csv(table, path, self._csv_options(include_header=False))
            size = path.stat().st_size
        else:
            size = write_part(df, self.tmp / part_name(chunk, self.fmt), self.fmt, **self.options)
        return pd.DataFrame({"chunk": [chunk], "records": [len(df)], "bytes": [size]})

    @property
    def _suffix(self) -> str:
        return "csv" if self.fmt == "csv" else part_name(0, self.fmt).rsplit(".", 1)[1]

    def copy(self, source: str | Path, chunk: int) -> pd.DataFrame:
        """Part ``chunk`` from a checkpoint's part file: copied as is when it is encoded
        the way this writer would encode it (same format and compression, no other
        options), else read and written again. The copy saves decoding and
        re-encoding every value."""
        if not self.encodes_like(source):
            return self.part(read_part(source), chunk)
        self.tmp.mkdir(parents=True, exist_ok=True)
        path = self.tmp / part_name(chunk, self.fmt)
        shutil.copyfile(source, path)  # a copy, not a link: the checkpoint stays the cache's own
        return pd.DataFrame({"chunk": [chunk], "records": [part_rows(path)], "bytes": [path.stat().st_size]})

    def encodes_like(self, source: str | Path) -> bool:
        """True if the part file ``source`` is what this writer would write for its data."""
        if self.fmt == "csv" or format_of(source) != self.fmt:
            return False
        if self.fmt == "arrow":
            return not self.options
        if set(self.options) - {"compression"}:
            return False
        import pyarrow.parquet as pq

        meta = pq.read_metadata(source)
        codec = str(self.options.get("compression") or "none").upper()
        codec = "UNCOMPRESSED" if codec == "NONE" else codec
        return all(meta.row_group(g).column(c).compression == codec
                   for g in range(meta.num_row_groups) for c in range(meta.num_columns))

    def commit(self, results: pd.DataFrame | None = None) -> dict:
        if self._result is not None:  # finish may be called again after a retry
            return self._result
        parts = sorted(self.tmp.glob(f"part-*.{self._suffix}")) if self.tmp.is_dir() else []
        expected = len(results) if results is not None else len(parts)
        if len(parts) != expected:
            self.abort()
            raise StepError(f"data.load: {len(parts)} of {expected} parts were written to "
                            f"{self.tmp}; '{self.dest}' was left unchanged", {"path": str(self.dest)})
        if not self.overwrite and self.dest.exists():
            self.abort()
            raise StepError(f"data.load: '{self.dest}' appeared while the step ran and overwrite "
                            "is false; it was left unchanged", {"path": str(self.dest)})
        if self.fmt != "csv" and (mismatch := schema_mismatch(parts)):
            self.abort()
            problem, details = mismatch
            raise StepError(f"its chunks came out with different columns or types: {problem} — a step "
                            "must give every chunk the same columns, with the same types",
                            {"path": str(self.dest), **details})
        records = int(results["records"].sum()) if results is not None else None
        if self.fmt != "csv":
            size = sum(p.stat().st_size for p in parts)
            self._swap_in()
        else:
            size = self._concatenate(parts)
        self._result = {"records_out": records, "bytes": size, "path": str(self.dest),
                        "parts": len(parts)}
        return self._result

    def _swap_in(self) -> None:
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        if not self.tmp.is_dir():  # no chunk at all: still leave a (empty) dataset folder
            self.tmp.mkdir(parents=True)
        if not (self.dest.exists() or self.dest.is_symlink()):
            os.rename(self.tmp, self.dest)
            return
        backup = self.dest.with_name(f"{self.dest.name}.old-{owner()}-{uuid.uuid4().hex[:12]}")
        os.rename(self.dest, backup)
        try:
            os.rename(self.tmp, self.dest)
        except BaseException:
            os.rename(backup, self.dest)
            raise
        _remove(backup)

    def _concatenate(self, parts: list[Path]) -> int:
        import pyarrow as pa
        import pyarrow.csv as pacsv

        target = self.tmp.with_name(self.tmp.name + ".csv")
        try:
            header = pa.table({c: pa.array([], pa.string()) for c in self.columns or []})
            with open(target, "wb") as out:
                pacsv.write_csv(header, out, self._csv_options(include_header=True))
                for part in parts:
                    with open(part, "rb") as f:
                        shutil.copyfileobj(f, out, 1 << 20)
            size = target.stat().st_size
            os.replace(target, self.dest)
        finally:
            target.unlink(missing_ok=True)
        _remove(self.tmp)
        return size

    def _csv_options(self, include_header: bool):
        import pyarrow.csv as pacsv

        options = dict(self.options)
        if "sep" in options:
            options["delimiter"] = options.pop("sep")
        return pacsv.WriteOptions(include_header=include_header, **options)

    def abort(self) -> None:
        """Delete what the chunks wrote; ``dest`` is untouched. Safe to call twice."""
        if self._result is None:
            _remove(self.tmp)
            self.tmp.with_name(self.tmp.name + ".csv").unlink(missing_ok=True)


def schema_mismatch(parts: list[Path]) -> tuple[str, dict] | None:
    """How a part's columns or types differ from the first part's, in words (and, for whole
    numbers become floats, the dtype that reads them all); None if none does.

    A column of nulls only (Arrow's ``null`` type: a chunk where it was all missing) fits any
    type, and ``large_string`` is ``string``. Read as one dataset, parts that differ come back
    with the first part's schema, silently: missing columns as nulls, text cast to numbers.
    """
    import pyarrow as pa

    def kinds(path: Path) -> dict[str, pa.DataType]:
        fields = part_schema(path)
        return {f.name: pa.string() if f.type == pa.large_string() else f.type for f in fields}

    if len(parts) < 2:
        return None
    first = kinds(parts[0])
    for part in parts[1:]:
        other = kinds(part)
        chunk = int(part.name.split("-")[1].split(".")[0])
        missing, extra = [c for c in first if c not in other], [c for c in other if c not in first]
        if missing or extra:
            bits = ([f"no {', '.join(map(repr, missing))}"] if missing else []) + \
                ([f"{', '.join(map(repr, extra))} more"] if extra else [])
            return f"chunk {chunk} has {' and '.join(bits)} (chunk 0 has {', '.join(first)})", {}
        for name, kind in first.items():
            if kind != other[name] and pa.null() not in (kind, other[name]):
                ints, floats = (sum(f(t) for t in (kind, other[name]))
                                for f in (pa.types.is_integer, pa.types.is_floating))
                mixed = ints == floats == 1
                text = f"column '{name}' is {kind} in chunk 0 but {other[name]} in chunk {chunk}"
                if not mixed:
                    return text, {"column": name}
                return (f"{text} (whole numbers turn into floats in a chunk with missing values: give the "
                        f"column one type, e.g. .astype('float64'), or read it with dtype: {{{name}: float64}})",
                        {"column": name, "fix": {"dtype": {name: "float64"}}})
    return None


def recover(dest: str | Path) -> list[Path]:
    """Tidy what a killed writer left beside ``dest``; returns the paths removed.

    Only files of a writer on this machine whose process is gone are touched: a
    ``<dest>.old-*`` backup is put back in place if ``dest`` is missing (the writer
    died between the two renames of a commit; its run never recorded the new
    data), else deleted, and its ``<dest>.tmp-*`` parts are deleted.
    """
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    name = glob.escape(dest.name)
    backups = sorted((p for p in dest.parent.glob(f"{name}.old-*") if _orphaned(p, dest.name, "old")),
                     key=lambda p: p.stat().st_mtime)
    if backups and not (dest.exists() or dest.is_symlink()):
        os.rename(backups.pop(), dest)
    removed = []
    for leftover in [*(p for p in dest.parent.glob(f"{name}.tmp-*") if _orphaned(p, dest.name, "tmp")),
                     *backups]:
        _remove(leftover)
        removed.append(leftover)
    return removed


def _orphaned(path: Path, dest_name: str, kind: str) -> bool:
    """True if ``path`` (``<dest_name>.<kind>-<host>-<pid>-<id>``) was left by a process of
    this machine that no longer runs."""
    tag = path.name[len(dest_name) + len(kind) + 2:].rsplit("-", 1)[0]
    return gone(tag)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
