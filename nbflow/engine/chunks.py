"""How a step's data is read, transformed chunk by chunk, and checkpointed."""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping

import dask
import dask.dataframe as dd
import pandas as pd

from nbflow.actions.registry import Action, Effect, StepContext
from nbflow.errors import MemoryBudgetExceeded, StepError
from nbflow.parts import part_files, part_schema, read_part
from nbflow.store import read_checkpoint_meta
from nbflow.units import format_size

#: records per chunk used for ``chunk_size: auto`` until the first chunk is measured
DEFAULT_AUTO = 100_000
#: the attribute naming the step token of the chunk function an exception came out of
RAISED_IN = "_nbflow_raised_in"


def open_checkpoint(path: str | None, step: str) -> dd.DataFrame:
    """A completed step's output as a Dask DataFrame, one partition per part file."""
    meta = read_checkpoint_meta(path)
    if meta is None:
        raise StepError(f"the output of step '{step}' is missing or incomplete at {path}",
                        {"step": step, "checkpoint": path})
    while meta.get("alias"):
        path = meta["alias"]
        meta = read_checkpoint_meta(path)
    if meta.get("empty"):
        raise StepError(f"step '{step}' writes its data elsewhere and has no output for the "
                        "steps that need it", {"step": step})
    files = [str(f) for f in part_files(path)]
    if not files:
        raise StepError(f"the output of step '{step}' has no data files at {path}", {"step": step})
    empty = part_schema(files[0]).empty_table().to_pandas()
    ddf = dd.from_map(_read_part, files, meta=empty, enforce_metadata=False)
    register_sources(ddf, [partial(_read_part, f) for f in files], files=files)
    return ddf


@dataclass(frozen=True)
class _Source:
    #: one function per partition that reads it (no arguments, no Dask)
    readers: tuple[Callable[[], pd.DataFrame], ...]
    #: the part files, one per partition, when the collection is a checkpoint read as is
    files: tuple[str, ...] | None = None


#: collection name -> how its partitions are read, for collections that only read
_SOURCES: dict[str, _Source] = {}
_SOURCES_LOCK = threading.Lock()


def register_sources(ddf, readers: list[Callable[[], pd.DataFrame]], files: list[str] | None = None) -> None:
    """Note how each partition of ``ddf`` (a collection that only reads) is read, so a pass
    (engine/fusion.py) can call the readers itself instead of materialising Dask's graph,
    and a sink can copy a checkpoint's ``files`` instead of decoding them."""
    with _SOURCES_LOCK:  # steps open their inputs from several threads
        _SOURCES[ddf._name] = _Source(tuple(readers), tuple(files) if files is not None else None)
        while len(_SOURCES) > 256:  # names of collections long gone
            del _SOURCES[next(iter(_SOURCES))]


def partition_sources(ddf) -> tuple[Callable[[], pd.DataFrame], ...] | None:
    """The readers ``register_sources`` noted for this very collection (any operation on it
    gives a new name, so only the collection as read matches), else None."""
    source = _SOURCES.get(getattr(ddf, "_name", None))
    return source.readers if source is not None else None


def checkpoint_parts(ddf) -> tuple[str, ...] | None:
    """The part files of ``ddf``, one per partition, if it is a checkpoint read unchanged.

    Any operation on the collection (a column selection, a filter, a map) gives it
    a new name, so only the very collection ``open_checkpoint`` returned matches:
    a sink can then copy the files instead of decoding and re-encoding them.
    """
    source = _SOURCES.get(getattr(ddf, "_name", None))
    return source.files if source is not None else None


def _read_part(path: str, columns: list[str] | None = None) -> pd.DataFrame:
    # the columns parameter lets Dask push a column selection into the read
    return read_part(path, columns)


class ChunksCancelled(Exception):
    """Raised between two chunks of one partition once the run is cancelled; the
    executor, seeing its cancel event set, records the step as cancelled."""


class Tokenized:
    """A user function with the step's token and memory guard.

    Dask names tasks by hashing their arguments, and a closure over a lock or a
    notebook object may not hash: the step's token stands in. The guard (local
    backend only: it holds threads and locks) wraps each call where it runs, in
    the worker thread, so the step's budget can interrupt it. ``cancel`` (local
    too) lets a partition split into many chunks stop between them.
    """

    def __init__(self, func, token: str, guard=None, cancel: threading.Event | None = None):
        self.func = func
        self.token = token
        self.guard = guard
        self.cancel = cancel

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise ChunksCancelled("the run was cancelled: no new chunk starts")

    def __call__(self, *args, chunk: int | None = None, **kwargs):
        try:
            if self.guard is None:
                return self.func(*args, **kwargs)
            return self.guard.wrap(self.func, chunk=chunk)(*args, **kwargs)
        except Exception as err:
            # whose code raised: in a pass of several steps (engine/fusion.py) it tells them apart
            if getattr(err, RAISED_IN, None) is None:
                with contextlib.suppress(AttributeError, TypeError):
                    setattr(err, RAISED_IN, self.token)
            raise

    def __reduce__(self):  # to a worker process: the function travels, the guard stays
        return (Tokenized, (self.func, self.token))

    def __dask_tokenize__(self):
        return ("nbflow-step-function", self.token)

    @property
    def __name__(self) -> str:
        return getattr(self.func, "__name__", repr(self.func))


def apply_chunk(df: pd.DataFrame, func: Tokenized, params: Mapping[str, Any], chunk_size: int,
                partition_info=None) -> pd.DataFrame:
    """Apply a chunk-wise function to at most ``chunk_size`` records at a time."""
    chunk = partition_info["number"] if partition_info else None
    if len(df) <= chunk_size:
        return _checked(func(df, chunk=chunk, **params), func)
    pieces = []
    for i in range(0, len(df), chunk_size):
        if isinstance(func, Tokenized):  # a partition of many chunks stops between them
            func.check_cancel()
        pieces.append(_checked(func(df.iloc[i:i + chunk_size], chunk=chunk, **params), func))
    return pd.concat(pieces, ignore_index=True)


def apply_at(func: Tokenized, params: Mapping[str, Any], chunk_size: int, df: pd.DataFrame,
             chunk: int) -> pd.DataFrame:
    """``apply_chunk`` on chunk number ``chunk`` (as a pass calls it, outside Dask)."""
    return apply_chunk(df, func, params, chunk_size, {"number": chunk})


def _checked(result, func) -> pd.DataFrame:
    if not isinstance(result, pd.DataFrame):
        name = getattr(func, "__name__", repr(func))
        raise TypeError(f"{name}() returned {type(result).__name__}, not a pandas DataFrame — "
                        "a chunk-wise action must return the transformed chunk")
    return result


def _in_memory(func, params: Mapping[str, Any], kind: str, names: list[str], *parts_per_input):
    """The naive mode: every chunk of the input concatenated into one frame, one call."""
    frames = {name: pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
              for name, parts in zip(names, parts_per_input, strict=True)}
    data = next(iter(frames.values())) if len(frames) == 1 else frames
    result = func(data, **params)
    return _checked(result, func) if kind == "chunk" else result


def apply_action(action: Action, ctx: StepContext, params: Mapping[str, Any], backend,
                 cancel: threading.Event | None = None, guard=None):
    """Call the action the way its kind asks; returns a Dask/pandas DataFrame, an Effect or None."""
    func = action.func
    if action.kind == "step":
        return func(ctx, **params)
    if ctx.streaming:
        if action.kind == "chunk":
            source = ctx.input
            return source.map_partitions(apply_chunk, Tokenized(func, ctx.token, guard, cancel), dict(params),
                                         ctx.chunk_size, meta=source._meta, enforce_metadata=False,
                                         token=f"nbflow-{ctx.step.name}-{ctx.token}")
        data = ctx.input if len(ctx.inputs) == 1 else dict(ctx.inputs)
        return func(data, **params)
    names = list(ctx.inputs)
    # the concatenation is part of the naive mode's cost: it runs inside the guard too
    in_memory = Tokenized(_in_memory, ctx.token, guard)
    task = dask.delayed(in_memory, pure=False)(
        func, dict(params), action.kind, names, *[ctx.inputs[n].to_delayed() for n in names],
        chunk=0)
    try:
        return backend.compute(task, cancel)
    except MemoryBudgetExceeded as err:
        # one call on all the data: "in chunk 0, after 0 records" would say nothing true
        err.message = (f"step '{err.step}' used {format_size(err.peak)} above its baseline, over its "
                       f"max_memory budget of {format_size(err.budget)}, with all its input in memory "
                       "at once (streaming: false)")
        raise


def bytes_per_record(frame: pd.DataFrame) -> float:
    """In-memory bytes per record of a sample (strings and objects counted deeply)."""
    if len(frame) == 0:
        return 0.0
    return float(frame.memory_usage(deep=True, index=False).sum()) / len(frame)


def checkpoint_effect(result, dest: Path, chunk_size: int, fmt: str | None = None,
                      writer=None) -> Effect:
    """Write a step's output as its checkpoint: part files, committed atomically."""
    from nbflow.actions.sinks import checkpoint_sink

    if result is None:
        return Effect(chunks=None, finish=lambda _results: {"records_out": 0})
    if isinstance(result, pd.DataFrame):
        result = dd.from_pandas(result, chunksize=max(1, chunk_size), sort=False)
    if not isinstance(result, dd.DataFrame):
        raise TypeError(f"the action returned {type(result).__name__}; return a pandas or Dask DataFrame "
                        "(or None for an action that only writes)")
    return checkpoint_sink(result, dest, fmt, writer)
