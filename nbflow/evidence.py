"""Measurements a diagnosis stands on: the live exception, the step's input, a probe of its code.

- ``from_exception(exc)`` reads what only the live exception has (the frames'
  locals: a KeyError's available columns, the arguments a TypeError was raised
  with, the array a MemoryError could not allocate) into plain JSON-able data;
  the executor stores it in ``StepFailed.details["evidence"]``.
- ``input_facts(checkpoints)`` reads the inputs' Parquet footers (records, bytes,
  records per chunk) and a small sample (bytes per record in memory, dtypes).
- ``probe(func, params, sample)`` runs the step's function on two small samples
  under ``tracemalloc`` and measures how its memory grows with the records it gets.
"""
from __future__ import annotations

import difflib
import gc
import math
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable, Mapping

from nbflow.engine.guard import reset_async_signal
from nbflow.parts import part_files, part_rows, read_head
from nbflow.tracebacks import cell_name, is_user_file

_PROBE_LOCK = threading.Lock()  # tracemalloc and the profile hook are process-wide
MAX_FRAMES = 80


def public_name(exc_type: type) -> str:
    """``MemoryError`` for numpy's ``_ArrayMemoryError``: the first public class in the MRO."""
    for cls in exc_type.__mro__:
        if not cls.__name__.startswith("_"):
            return cls.__name__
    return exc_type.__name__


def _where(filename: str, line: int) -> str:
    cell = cell_name(filename)
    return f"{cell}, line {line}" if cell else f"{filename}:{line}"


def _tb_entries(exc: BaseException) -> list[tuple[Any, int]]:
    """(frame, line) of the traceback of the first exception in the chain that passed user code."""

    seen: set[int] = set()
    first: list[tuple[Any, int]] | None = None
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        entries = []
        tb = exc.__traceback__
        while tb is not None:
            entries.append((tb.tb_frame, tb.tb_lineno))
            tb = tb.tb_next
        first = entries if first is None else first
        if any(is_user_file(f.f_code.co_filename) for f, _ in entries):
            return entries
        exc = exc.__cause__ or exc.__context__
    return first or []


def from_exception(exc: BaseException) -> dict[str, Any]:
    """What the live exception shows beyond its message; JSON-able, never raises for a nicety."""
    import linecache

    entries = _tb_entries(exc)
    frames = []
    for frame, line in entries[-MAX_FRAMES:]:
        code = frame.f_code
        frames.append([code.co_filename, line, code.co_name,
                       linecache.getline(code.co_filename, line).strip(),
                       is_user_file(code.co_filename)])
    out: dict[str, Any] = {"error_class": public_name(type(exc)), "frames": frames}
    user = [(f, line) for f, line in entries if is_user_file(f.f_code.co_filename)]
    if isinstance(exc, KeyError):
        out["key_error"] = _key_error(exc, entries, user)
    if user and isinstance(exc, (TypeError, ValueError, AttributeError)):
        out["arguments"] = [_arguments(f, line) for f, line in reversed(user)][:3]
    if user:
        tables = _tables(user[-1][0].f_locals)
        if tables:
            out["tables"] = tables
    if isinstance(exc, MemoryError) and hasattr(exc, "shape") and hasattr(exc, "dtype"):
        shape = [int(n) for n in exc.shape]
        itemsize = int(getattr(exc.dtype, "itemsize", 8) or 8)
        out["allocation"] = {"shape": shape, "dtype": str(exc.dtype), "itemsize": itemsize,
                             "bytes": int(math.prod(shape)) * itemsize}
    return out


def _key_error(exc: KeyError, entries, user) -> dict[str, Any]:
    import pandas as pd

    key = exc.args[0] if exc.args else None
    columns: dict[str, list[str]] = {}
    for frame, _ in reversed(user):  # the user's own names first, innermost frame first
        for name, value in list(frame.f_locals.items()):
            if isinstance(value, pd.DataFrame) and name not in columns:
                columns[name] = [str(c) for c in value.columns][:200]
    if not columns:  # the frame pandas raised from holds the table as ``self``
        for frame, _ in reversed(entries):
            value = frame.f_locals.get("self")
            if isinstance(value, pd.DataFrame):
                columns["self"] = [str(c) for c in value.columns][:200]
                break
    names = sorted({c for cols in columns.values() for c in cols})
    close = difflib.get_close_matches(str(key), names, n=3, cutoff=0.6)
    return {"key": key if isinstance(key, (str, int, float)) else repr(key),
            "columns": columns, "close": close}


def _describe(value: Any) -> dict[str, Any]:
    import pandas as pd

    if isinstance(value, pd.DataFrame):
        return {"type": "DataFrame", "value": f"{len(value):,} rows × {len(value.columns)} columns"}
    text = repr(value)
    return {"type": type(value).__name__, "value": text if len(text) <= 60 else text[:59] + "…"}


def _arguments(frame, line: int) -> dict[str, Any]:
    code = frame.f_code
    count = code.co_argcount + code.co_kwonlyargcount
    names = list(code.co_varnames[:count])
    if code.co_flags & 0x08:  # **kwargs: the params that arrived by keyword
        names.append(code.co_varnames[count + bool(code.co_flags & 0x04)])
    local = frame.f_locals
    args: dict[str, Any] = {}
    for name in names:
        if name not in local:
            continue
        value = local[name]
        if isinstance(value, dict) and code.co_flags & 0x08 and name == names[-1]:
            args.update((k, _describe(v)) for k, v in value.items())
        else:
            args[name] = _describe(value)
    return {"function": code.co_name, "where": _where(code.co_filename, line), "arguments": args}


def _tables(local: Mapping[str, Any], rows: int | None = None) -> dict[str, Any]:
    """DataFrames a frame holds (directly or in a list/tuple/dict): count, object columns."""
    import pandas as pd

    found: dict[int, tuple[str, Any]] = {}
    for name, value in list(local.items()):
        items = value if isinstance(value, (list, tuple)) else (
            list(value.values()) if isinstance(value, dict) else [value])
        for item in list(items)[:1000]:
            if isinstance(item, pd.DataFrame) and id(item) not in found:
                found[id(item)] = (name, item)
    if not found:
        return {}
    holders: dict[str, int] = {}
    for name, _ in found.values():
        holders[name] = holders.get(name, 0) + 1
    objects: dict[str, dict[str, Any]] = {}
    for name, df in found.values():
        for column in df.columns:
            if df[column].dtype == object and len(df):
                entry = objects.setdefault(str(column), {"frames": 0, "held_in": name})
                entry["frames"] += 1
                if "object_bytes_per_record" not in entry:
                    entry.update(_object_cost(df[column]))
    return {"frames": len(found), "holders": holders,
            "largest": max(len(df) for _, df in found.values()),
            "object_columns": {k: v for k, v in objects.items() if "arrow_bytes_per_record" in v}}


def _object_cost(series) -> dict[str, Any]:
    """Bytes per record of an object column, as held and as Arrow-backed strings."""
    sample = series.iloc[:5000]
    held = float(sample.memory_usage(deep=True, index=False)) / len(sample)
    try:
        arrow = float(sample.astype("string[pyarrow]").memory_usage(deep=True, index=False)) / len(sample)
    except Exception:  # not text: no Arrow form to compare with
        return {"object_bytes_per_record": round(held, 1)}
    return {"object_bytes_per_record": round(held, 1), "arrow_bytes_per_record": round(arrow, 1)}


# -- the step's input -----------------------------------------------------------------------

def checkpoint_files(path: str | None) -> list[Path]:
    from nbflow.store import read_checkpoint_meta

    meta = read_checkpoint_meta(path)
    while meta is not None and meta.get("alias"):
        path = meta["alias"]
        meta = read_checkpoint_meta(path)
    if meta is None or meta.get("empty"):
        return []
    return part_files(path)


def input_facts(checkpoints: Mapping[str, str | None], sample_rows: int = 2000) -> dict[str, Any]:
    """Per input step: records, bytes on disk, chunks and their sizes, bytes per record in memory."""
    facts: dict[str, Any] = {}
    for step, path in checkpoints.items():
        files = checkpoint_files(path)
        if not files:
            continue
        rows, size = [], 0
        for f in files:
            rows.append(part_rows(f))
            size += f.stat().st_size
        entry: dict[str, Any] = {"records": sum(rows), "bytes": size, "chunks": len(rows),
                                 "chunk_records": {"max": max(rows), "median": sorted(rows)[len(rows) // 2],
                                                   "min": min(rows)},
                                 "rows_per_chunk": rows[:500]}
        sample = read_sample(files, sample_rows)
        if sample is not None and len(sample):
            entry["bytes_per_record"] = round(float(sample.memory_usage(deep=True, index=False).sum())
                                              / len(sample), 1)
            entry["dtypes"] = {str(c): str(t) for c, t in sample.dtypes.items()}
        facts[step] = entry
    return facts


def read_sample(files: list[Path], rows: int):
    """Up to ``rows`` records from the first part files, as pandas reads them for a chunk."""
    import pandas as pd

    frames, got = [], 0
    for f in files:
        frame = read_head(f, rows - got)
        frames.append(frame)
        got += len(frame)
        if got >= rows:
            break
    if not frames:
        return None
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


# -- the probe ---------------------------------------------------------------------------------

def probe(func: Callable, params: Mapping[str, Any], sample, sizes: tuple[int, int] = (1000, 4000),
          cap: int = 64_000_000, time_limit: float = 10.0) -> dict[str, Any] | None:
    """Run ``func`` on two samples and measure its peak memory; None when it can't be measured.

    The peak is what ``tracemalloc`` saw (Python objects and NumPy buffers) plus
    what Arrow's pool grew by (pandas' strings). Two sizes give the growth: an
    exponent near 1 is linear in the records, near 2 quadratic. The second sample
    is only as large as keeps the probe under ``cap`` bytes even if it is quadratic.
    """
    if len(sample) < 40:
        return None
    n1 = max(min(sizes[0], len(sample) // 8), 5)
    with _PROBE_LOCK:
        try:
            started = time.monotonic()
            p1, _ = _measure(func, params, sample.iloc[:n1].copy())
            n2 = int(min(sizes[1], len(sample), n1 * math.sqrt(cap / max(p1, 1.0))))
            if n2 < 1.5 * n1 or time.monotonic() - started > time_limit / 4:
                return None
            p2, out2 = _measure(func, params, sample.iloc[:n2].copy())
            tables = _capture(func, params, sample.iloc[:n1].copy())
        except Exception:  # the function fails on the sample: nothing measured
            return None
    exponent = math.log(max(p2, 1) / max(p1, 1)) / math.log(n2 / n1)
    return {"rows": [n1, n2], "peaks": [int(p1), int(p2)], "exponent": round(exponent, 2),
            "output_bytes_per_record": out2, "seconds": round(time.monotonic() - started, 2),
            "tables": tables}


def _measure(func: Callable, params: Mapping[str, Any], df) -> tuple[float, float | None]:
    import pandas as pd
    import pyarrow as pa

    gc.collect()
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        arrow = pa.total_allocated_bytes()
        out = func(df, **params)
        _, peak = tracemalloc.get_traced_memory()
        grown = max(0, pa.total_allocated_bytes() - arrow)
    finally:
        if not tracing:
            tracemalloc.stop()
    per_record = None
    if isinstance(out, pd.DataFrame) and len(out):
        per_record = round(float(out.memory_usage(deep=True, index=False).sum()) / len(out), 1)
    return float(peak - base + grown), per_record


def _capture(func: Callable, params: Mapping[str, Any], df) -> dict[str, Any]:
    """The DataFrames alive in the user's frames as they return: copies kept, object columns."""
    best: dict[str, Any] = {}
    seen = [0]

    def hook(frame, event, _arg):
        if event != "return" or not is_user_file(frame.f_code.co_filename):
            return
        count = _count_tables(frame.f_locals)
        if count > seen[0]:
            seen[0] = count
            best.clear()
            best.update(_tables(frame.f_locals), function=frame.f_code.co_name)

    reset_async_signal()
    previous = sys.getprofile()
    sys.setprofile(hook)
    try:
        func(df, **params)
    finally:
        sys.setprofile(previous)
    return best


def _count_tables(local: Mapping[str, Any]) -> int:
    import pandas as pd

    ids = set()
    for value in list(local.values()):
        items = value if isinstance(value, (list, tuple)) else [value]
        ids.update(id(i) for i in list(items)[:1000] if isinstance(i, pd.DataFrame))
    return len(ids)
