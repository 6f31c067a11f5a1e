"""The built-in ``data.*`` actions that read and write chunked tables.

``data.extract`` returns a Dask DataFrame whose partitions hold about
``chunk_size`` records; ``data.load`` returns an ``Effect`` (a small pandas frame
per chunk, then one ``finish``). ``data.validate`` is in validate.py;
``data.transform`` and ``data.transform_streaming`` belong to the engine.
"""
from __future__ import annotations

import difflib
import glob
import inspect
import math
import re
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from nbflow.actions import csvread
from nbflow.actions.registry import Effect, StepContext, action, in_workdir
from nbflow.actions.sinks import WRITE_META, AtomicWriter, copy_part, sink
from nbflow.errors import InputNotFound, StepError
from nbflow.parts import to_frame

FORMATS = ("csv", "tsv", "parquet", "jsonl")
_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet",
             ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}
_ALIASES = {"json": "jsonl", "ndjson": "jsonl", "pq": "parquet", "text": "csv"}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip")


# -- data.extract -------------------------------------------------------------------------

@action("data.extract", kind="step", chunkwise=True, options=lambda params: _extract_options(params),
        param_check=lambda params: _path_problems(params, "data/records.csv"),
        explain=lambda error, params, workdir: _explain_extract(error, params, workdir))
def extract(ctx: StepContext, path: str, format: str | None = None,
            columns: list[str] | None = None, **read_kwargs) -> Any:
    """Read CSV/TSV, Parquet or JSON Lines (a file, a directory or a glob) in chunks.

    Partitions hold at most ``chunk_size`` records for Parquet (cut from row groups),
    compressed files (cut after counting lines) and ``streaming: false``; CSV and JSONL
    are cut in byte ranges sized from the first 64 KB's row length with a 10% margin,
    so about 85-90% of ``chunk_size``, more only where rows are >10% shorter than the
    sample. CSV is parsed by Arrow where that gives what pandas would (``csvread.py``),
    else by pandas through Dask. Either way dtypes come from the first 256 KB: a column
    that turns out otherwise later fails the read, naming the ``dtype`` that fixes it.
    """
    import dask.dataframe as dd

    files = _resolve(ctx.workdir, path)
    fmt = _input_format(path, files, format)
    empty = [f for f in files if f.is_file() and f.stat().st_size == 0]
    if empty and fmt != "parquet":
        names = ", ".join(_display(f, ctx.workdir) for f in empty[:3]) + (", ..." if len(empty) > 3 else "")
        raise StepError(f"data.extract: {names} {'is' if len(empty) == 1 else 'are'} empty (0 bytes): no "
                        "header to read the columns from — leave it out of the input, or check that "
                        "whatever writes it finished", {"path": str(path), "empty": [str(f) for f in empty]})
    if fmt == "tsv":
        read_kwargs.setdefault("sep", "\t")
    if fmt == "parquet":
        if read_kwargs:
            raise StepError(f"data.extract: Parquet takes no options besides columns, got "
                            f"{sorted(read_kwargs)}", {"path": str(path), "options": sorted(read_kwargs)})
        files = _parquet_files(files)
    if columns is not None and fmt in ("csv", "tsv"):
        read_kwargs["usecols"] = list(columns)
    chunk = max(1, int(ctx.chunk_size))

    if not ctx.streaming:  # the naive mode: everything in memory first
        if fmt == "parquet":
            df = pd.concat([pd.read_parquet(f, columns=columns) for f in files], ignore_index=True)
        elif fmt == "jsonl":
            df = pd.concat([pd.read_json(f, lines=True, **read_kwargs) for f in files],
                           ignore_index=True)
        else:
            df = pd.concat([pd.read_csv(f, **read_kwargs) for f in files], ignore_index=True)
        if columns is not None and fmt == "jsonl":
            df = df[list(columns)]
        return dd.from_pandas(df, chunksize=chunk)

    if fmt == "parquet":
        return _read_parquet(files, columns, chunk)
    names = [str(f) for f in files]
    if any(f.name.lower().endswith(_COMPRESSED) for f in files):
        # a compressed file can't be split by byte ranges: read each whole, then cut it in
        # even pieces; counting its lines first bounds every piece by chunk_size
        lines = max(csvread.count_lines(f) for f in files)
        reader = dd.read_json if fmt == "jsonl" else dd.read_csv
        kwargs = {"lines": True} if fmt == "jsonl" else {}
        ddf = reader(names, blocksize=None, **kwargs, **read_kwargs)
        ddf = ddf.repartition(npartitions=len(files) * max(1, math.ceil(lines / chunk)))
    else:
        blocksize = csvread.blocksize_for(files, chunk, header=fmt != "jsonl")
        if fmt == "jsonl":
            ddf = dd.read_json(names, lines=True, blocksize=blocksize, **read_kwargs)
        else:  # Arrow's parser where it gives what pandas' would, else pandas' through Dask
            ddf = csvread.read_csv(files, blocksize, read_kwargs)
            if ddf is None:
                ddf = dd.read_csv(names, blocksize=blocksize, **read_kwargs)
    if columns is not None and fmt == "jsonl":
        ddf = ddf[list(columns)]
    return ddf


def _resolve(workdir: Path, path: str | Path) -> list[Path]:
    target = in_workdir(workdir, path)
    text = str(target)
    if glob.has_magic(text):
        matches = sorted(Path(p) for p in glob.glob(text, recursive=True))
    else:
        matches = [target] if target.exists() else []
    if matches:
        return matches
    near = _near(target, Path(workdir))
    shown = [_display(p, Path(workdir)) for p in near]
    hint = (f"did you mean {' or '.join(repr(s) for s in shown)}?" if shown
            else f"check the path; it is read relative to {workdir}")
    raise InputNotFound(f"input '{path}' not found: nothing matches {target} — {hint}",
                        {"path": str(target), "near": shown})


def _near(target: Path, workdir: Path) -> list[Path]:
    """Up to three existing paths closest to ``target``: by name in its folder and the
    working directories, or by path one level down when the folder itself is mistyped."""
    by_path = not target.parent.is_dir()
    folders = [target.parent, workdir, Path.cwd()]
    if by_path and workdir.is_dir():
        folders += sorted(p for p in workdir.iterdir() if p.is_dir())[:50]
    candidates: dict[str, Path] = {}
    for folder in folders:
        if folder.is_dir():
            for entry in sorted(folder.iterdir())[:2000]:
                if not entry.name.startswith("."):
                    candidates.setdefault(_display(entry, workdir) if by_path else entry.name, entry)
    key = _display(target, workdir) if by_path else target.name
    return [candidates[m] for m in difflib.get_close_matches(key, list(candidates), n=3, cutoff=0.6)]


def _display(path: Path, workdir: Path) -> str:
    try:
        return str(path.relative_to(workdir))
    except ValueError:
        return str(path)


def _input_format(path: str | Path, files: list[Path], explicit: str | None) -> str:
    if explicit is not None:
        fmt = _ALIASES.get(str(explicit).lower(), str(explicit).lower())
        if fmt not in FORMATS:
            raise StepError(f"data.extract: unknown format {explicit!r}; use one of {', '.join(FORMATS)}",
                            {"format": explicit})
        return fmt
    for candidate in (Path(path), files[0]):
        if candidate.is_dir():
            return "parquet"
        if fmt := _format_by_name(candidate):
            return fmt
    raise StepError(f"data.extract: can't tell the format of '{path}' from its name; "
                    f"add format: ({' | '.join(FORMATS)})", {"path": str(path)})


def _format_by_name(path: str | Path) -> str | None:
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in _COMPRESSED:
        suffixes.pop()
    return _SUFFIXES.get(suffixes[-1]) if suffixes else None


def _named_options(func, *skip: str) -> list[str]:
    return [name for name, p in inspect.signature(func).parameters.items()
            if name not in skip and p.kind is not inspect.Parameter.VAR_KEYWORD]


def _path_problems(params: Mapping[str, Any], example: str) -> list[tuple[str, str, str]]:
    """``path`` (data.extract's, data.load's) as (param, message, hint) when it names nothing."""
    path = params.get("path")
    if "path" not in params or (isinstance(path, str) and path.strip()):
        return []
    what = "path is empty" if path is None or isinstance(path, str) else \
        f"path must be text, not {type(path).__name__}"
    return [("path", what, f"e.g. path: {example}")]


def _extract_options(params: Mapping[str, Any]) -> list[str] | None:
    """The read options data.extract passes on (pandas' for CSV and JSON Lines; none for
    Parquet), by the format its path or format: names; None when that isn't known yet."""
    explicit = params.get("format")
    fmt = (_ALIASES.get(str(explicit).lower(), str(explicit).lower()) if explicit
           else _format_by_name(str(params.get("path") or "")))
    if fmt in ("csv", "tsv"):
        return _named_options(pd.read_csv, "filepath_or_buffer")
    if fmt == "jsonl":
        return _named_options(pd.read_json, "path_or_buf", "lines")
    return [] if fmt == "parquet" else None


def _explain_extract(error: BaseException, params: Mapping[str, Any], workdir: Path) -> StepError | None:
    """A CSV line with more fields than the header, read by pandas through Dask: pandas counted its
    line from the start of Dask's block; find it in the file and name it."""
    ragged = isinstance(error, pd.errors.ParserError) and "fields in line" in str(error)
    if not (ragged or isinstance(error, ValueError)):
        return None
    path = params.get("path")
    files = _resolve(workdir, path)
    fmt = _input_format(path, files, params.get("format"))
    if not ragged and fmt != "jsonl":  # (JSON Lines: pandas gives a position in Dask's block)
        return None
    sep = params.get("sep") or params.get("delimiter") or ("\t" if fmt == "tsv" else ",")
    for file in files:
        if file.is_file() and not file.name.lower().endswith(_COMPRESSED):
            found = csvread.first_ragged_line(file, sep) if ragged else _first_bad_json_line(file)
            if found is not None:
                return found
    return None


def _first_bad_json_line(path: Path) -> StepError | None:
    import json

    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            text = line.rstrip("\r\n")
            try:
                if text.strip():
                    json.loads(text)
            except json.JSONDecodeError as err:
                return StepError(
                    f"data.extract: line {number:,} of {path.name} is not valid JSON ({err.msg}, column "
                    f"{err.colno}): {text[:120]!r} — correct that line: each line of a JSON Lines file "
                    "is one whole JSON object", {"path": str(path), "line": number, "text": text[:200]})
    return None


def _parquet_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(f for f in path.rglob("*") if f.is_file()
                            and not f.name.startswith((".", "_")) and ".tmp-" not in str(f))
        else:
            files.append(path)
    return files


def _read_parquet(files: list[Path], columns: list[str] | None, chunk: int):
    """One task reads a row group, then even slices of it become the partitions.

    Row counts come from the files' footers, so every partition holds at most
    ``chunk`` rows and a large row group is decoded once, not once per slice.
    """
    import dask.dataframe as dd
    import pyarrow.parquet as pq
    from dask.base import tokenize
    from dask.task_spec import Task, TaskRef

    columns = list(columns) if columns is not None else None
    token = tokenize([str(f) for f in files], [f.stat().st_mtime_ns for f in files], columns, chunk)
    read_name, name = f"nbflow-read-parquet-{token}", f"nbflow-parquet-{token}"
    layer: dict = {}
    keys = []
    schema = None
    for path in files:
        meta = pq.ParquetFile(path).metadata
        schema = schema or meta.schema.to_arrow_schema()
        groups = [(g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)] or [(None, 0)]
        for group, rows in groups:
            read_key = (read_name, len(layer))
            layer[read_key] = Task(read_key, _read_row_group, str(path), group, columns)
            pieces = max(1, math.ceil(rows / chunk))
            for j in range(pieces):
                key = (name, len(keys))
                layer[key] = Task(key, _slice_table, TaskRef(read_key), j, pieces)
                keys.append(key)
    empty = schema.empty_table()
    meta_df = empty.select(columns).to_pandas() if columns is not None else empty.to_pandas()
    return dd.from_graph(layer, meta_df, (None,) * (len(keys) + 1), keys, "nbflow-parquet")


def _read_row_group(path: str, group: int | None, columns: list[str] | None):
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path)
    if group is None:
        return file.schema_arrow.empty_table().select(columns) if columns else file.schema_arrow.empty_table()
    return file.read_row_group(group, columns=columns)


def _slice_table(table, j: int, pieces: int) -> pd.DataFrame:
    start, stop = j * table.num_rows // pieces, (j + 1) * table.num_rows // pieces
    return to_frame(table.slice(start, stop - start))


# -- data.load (the writers are in sinks.py) ----------------------------------------------------------------------------

def _output_format(path: str | Path, format: str | None) -> str | None:
    suffix = Path(str(path)).suffix.lower()
    return _ALIASES.get(str(format).lower(), str(format).lower()) if format else (
        "csv" if suffix == ".csv" else "parquet" if suffix in ("", ".parquet", ".pq") else None)


def _load_input_format(params: Mapping[str, Any]) -> str | None:
    """Parquet written with data.load's defaults: its input's parts can be copied as they are."""
    plain = not set(params) - {"path", "format", "overwrite"}
    return "parquet" if plain and _output_format(params.get("path", ""), params.get("format")) == "parquet" \
        else None


def _load_chunk_sink(path: str = "", format: str | None = None, overwrite: bool = True,
                     **write_kwargs):
    """A Parquet load takes its input chunk by chunk (in a pass with the steps before it);
    a CSV one needs its input's columns first."""
    if _output_format(path, format) != "parquet":
        return None
    return partial(_parquet_writer, path=path, overwrite=overwrite, write_kwargs=write_kwargs)


def _parquet_writer(ctx: StepContext, path: str, overwrite: bool, write_kwargs: dict) -> AtomicWriter:
    dest = ctx.path(path)
    _check_dest(ctx, dest, path, overwrite, "parquet")
    return AtomicWriter(dest, "parquet", {"compression": "snappy", **write_kwargs}, overwrite=overwrite)


def _load_options(params: Mapping[str, Any]) -> list[str] | None:
    """The write options data.load passes on: Arrow's Parquet writer's, or its CSV WriteOptions'."""
    fmt = _output_format(str(params.get("path") or ""), params.get("format"))
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return _named_options(pq.write_table, "table", "where", "filesystem")
    if fmt == "csv":
        import pyarrow.csv as pacsv

        return ["sep"] + [name for name in dir(pacsv.WriteOptions())
                          if not name.startswith("_") and name not in ("include_header", "validate")]
    return None


#: what a Parquet dataset folder holds (nbflow's, Dask's, Spark's): data.load may replace it
_DATASET_FILE = re.compile(r".+\.(parquet|pq|crc)|_metadata|_common_metadata|_SUCCESS", re.IGNORECASE)


def _check_dest(ctx: StepContext, dest: Path, path: str, overwrite: bool, fmt: str) -> None:
    """Refuse a destination whose replacement would lose what is not an earlier output:
    the working directory or a folder above it, a folder of other files, a non-Parquet
    file in place of a dataset. (A commit swaps the whole of ``dest`` for the new data.)"""
    if not (dest.exists() or dest.is_symlink()):
        return
    if not overwrite:
        raise StepError(f"data.load: '{path}' exists and overwrite is false; remove it or set "
                        "overwrite: true", {"path": str(dest)})
    where, home = dest.resolve(), Path(ctx.workdir).resolve()
    example = f"e.g. path: out/{ctx.step.name}.{'csv' if fmt == 'csv' else 'parquet'}"
    problem = None
    if where == home or where in home.parents:
        problem = (f"'{path}' is {'the working directory' if where == home else 'a folder above the working directory'}"
                   f" ({where}): writing there would replace everything in it")
    elif not (dest.is_dir() or dest.is_file()):
        problem = f"'{path}' is not a regular file or folder (a device, a pipe or a broken link)"
    elif dest.is_dir() and fmt == "csv":
        problem = f"'{path}' is a folder, and a CSV output is one file"
    elif dest.is_dir():
        others = sorted(str(f.relative_to(dest)) for f in dest.rglob("*")
                        if f.is_file() and not _DATASET_FILE.fullmatch(f.name))
        if others:
            problem = (f"'{path}' is a folder holding files that are not Parquet parts "
                       f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}): the output "
                       "replaces the whole folder, so it is written only over a Parquet dataset")
    elif fmt == "parquet" and not _is_parquet_file(dest):
        problem = f"'{path}' is a file that is not Parquet: the output (a folder of parts) would replace it"
    if problem:
        raise StepError(f"data.load: {problem}; nothing was written — choose another path ({example}) "
                        "or move what is there", {"path": str(dest)})


def _is_parquet_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PAR1"
    except OSError:
        return False


@action("data.load", kind="step", input_format=_load_input_format, chunk_sink=_load_chunk_sink,
        options=_load_options, param_check=lambda params: _path_problems(params, "out/clean.parquet"))
def load(ctx: StepContext, path: str, format: str | None = None, overwrite: bool = True,
         **write_kwargs) -> Effect:
    """Write a Parquet dataset (a folder of part files) or one CSV file, atomically."""
    dest = ctx.path(path)
    fmt = _output_format(dest, format)
    if fmt not in ("csv", "parquet"):
        raise StepError(f"data.load: can't write '{path}': use a .csv file, a .parquet folder, "
                        "or add format: (csv | parquet)", {"path": str(dest), "format": format})
    if fmt == "parquet":
        writer = _parquet_writer(ctx, path, overwrite, write_kwargs)
        from nbflow.engine.chunks import checkpoint_parts

        parts = checkpoint_parts(ctx.input)
        if parts and writer.encodes_like(parts[0]):
            # the upstream checkpoint as is, already encoded as the output would be: copy it
            import dask.dataframe as dd

            chunks = dd.from_map(copy_part, list(parts), list(range(len(parts))), args=[writer],
                                 meta=WRITE_META, enforce_metadata=False, label="nbflow-copy-parts")
            return Effect(chunks=chunks, finish=writer.commit, output=None, abort=writer.abort)
    else:
        _check_dest(ctx, dest, path, overwrite, "csv")
        writer = AtomicWriter(dest, "csv", write_kwargs, [str(c) for c in ctx.input.columns],
                               overwrite=overwrite)
    return sink(ctx.input, writer)
