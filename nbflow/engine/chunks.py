"""How a step's data is read, transformed chunk by chunk, and checkpointed."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Mapping

import dask
import dask.dataframe as dd
import pandas as pd
import pyarrow.parquet as pq

from nbflow.actions.registry import Action, Effect, StepContext
from nbflow.errors import StepError
from nbflow.store import read_checkpoint_meta

#: records per chunk used for ``chunk_size: auto`` until the first chunk is measured
DEFAULT_AUTO = 100_000


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
    files = sorted(str(f) for f in Path(path).glob("part-*.parquet"))
    if not files:
        raise StepError(f"the output of step '{step}' has no data files at {path}", {"step": step})
    empty = pq.read_schema(files[0]).empty_table().to_pandas()
    return dd.from_map(_read_part, files, meta=empty, enforce_metadata=False)


def _read_part(path: str) -> pd.DataFrame:
    return pd.read_parquet(path, engine="pyarrow")


class Tokenized:
    """A user function with the step's token: Dask names tasks by hashing their
    arguments, and a closure over a lock or a notebook object may not hash."""

    def __init__(self, func, token: str):
        self.func = func
        self.token = token

    def __call__(self, *args, **kwargs):
        return self.func(*args, **kwargs)

    def __dask_tokenize__(self):
        return ("nbflow-step-function", self.token)

    @property
    def __name__(self) -> str:
        return getattr(self.func, "__name__", repr(self.func))


def apply_chunk(df: pd.DataFrame, func, params: Mapping[str, Any], chunk_size: int) -> pd.DataFrame:
    """Apply a chunk-wise function to at most ``chunk_size`` records at a time."""
    if len(df) <= chunk_size:
        return _checked(func(df, **params), func)
    pieces = [_checked(func(df.iloc[i:i + chunk_size], **params), func)
              for i in range(0, len(df), chunk_size)]
    return pd.concat(pieces, ignore_index=True)


def _checked(result, func) -> pd.DataFrame:
    if not isinstance(result, pd.DataFrame):
        name = getattr(func, "__name__", repr(func))
        raise TypeError(f"{name}() returned {type(result).__name__}, not a pandas DataFrame — "
                        "a chunk-wise action must return the transformed chunk")
    return result


def _in_memory(func, params: Mapping[str, Any], kind: str, names: list[str], *parts_per_input):
    """The naive mode: every chunk of the input concatenated into one frame, one call."""
    frames = {name: pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
              for name, parts in zip(names, parts_per_input)}
    data = next(iter(frames.values())) if len(frames) == 1 else frames
    result = func(data, **params)
    return _checked(result, func) if kind == "chunk" else result


def apply_action(action: Action, ctx: StepContext, params: Mapping[str, Any], backend,
                 cancel: threading.Event | None = None, wrap=None):
    """Call the action the way its kind asks; returns a Dask/pandas DataFrame, an Effect or None.

    ``wrap`` (the memory guard's) wraps the user's function where it runs, in the
    worker thread, so the step's budget can interrupt it.
    """
    func = wrap(action.func) if wrap is not None else action.func
    if action.kind == "step":
        return func(ctx, **params)
    if ctx.streaming:
        if action.kind == "chunk":
            source = ctx.input
            return source.map_partitions(apply_chunk, Tokenized(func, ctx.token), dict(params),
                                         ctx.chunk_size, meta=source._meta, enforce_metadata=False,
                                         token=f"nbflow-{ctx.step.name}-{ctx.token}")
        data = ctx.input if len(ctx.inputs) == 1 else dict(ctx.inputs)
        return func(data, **params)
    names = list(ctx.inputs)
    task = dask.delayed(_in_memory, pure=False)(
        func, dict(params), action.kind, names, *[ctx.inputs[n].to_delayed() for n in names])
    return backend.compute(task, cancel)


def checkpoint_effect(result, dest: Path, chunk_size: int) -> Effect:
    """Write a step's output as its checkpoint: Parquet parts, committed atomically."""
    from nbflow.actions.data import parquet_sink

    if result is None:
        return Effect(chunks=None, finish=lambda _results: {"records_out": 0})
    if isinstance(result, pd.DataFrame):
        result = dd.from_pandas(result, chunksize=max(1, chunk_size), sort=False)
    if not isinstance(result, dd.DataFrame):
        raise TypeError(f"the action returned {type(result).__name__}; return a pandas or Dask DataFrame "
                        "(or None for an action that only writes)")
    return parquet_sink(result, dest)
