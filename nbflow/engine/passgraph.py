"""How a pass's work is laid out as tasks (the executor's side is in fusion.py).

``build_lean`` makes one task per chunk that calls each step's chunk function in
turn: a source's readers (``chunks.register_sources``), ``apply_chunk`` for a
``chunk`` action, a check's ``chunk_check``, the checkpoint writers, and a sink's
``chunk_sink`` writer at the end. Where a step offers no such function, ``build``
makes a Dask graph of the steps' collections instead (no sink then). Either way
each step's chunk is computed once, and every step reports its chunks as they land.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import pandas as pd

from nbflow.actions.registry import Effect
from nbflow.actions.sinks import AtomicWriter
from nbflow.engine import chunks
from nbflow.errors import StepError
from nbflow.parts import part_name
from nbflow.plan import PlannedStep


class NotFusable(Exception):
    """A step's action built something a pass can't carry (a sink, a whole-collection result)."""


@dataclass
class Member:
    """One step of a pass: how its chunks are written or checked, and what they gave."""

    step: PlannedStep
    effect: Effect | None = None
    writer: AtomicWriter | None = None
    #: chunk index -> the frame its write or check returned, as the pass computes them
    frames: dict[int, pd.DataFrame] = field(default_factory=dict)
    chunks_total: int = 0
    #: the Dask DataFrame the step computed, when it computes one (not a check)
    result: Any = None
    #: a sink (data.load) ending the pass: it writes elsewhere, it has no checkpoint data
    sink: bool = False

    @property
    def complete(self) -> bool:
        return self.effect is not None and len(self.frames) == self.chunks_total


@dataclass
class Partial:
    """What a step did in a failed pass, handed to the step run on its own: the writer
    holding its written parts and the frames of the chunks already done."""

    writer: AtomicWriter | None
    frames: dict[int, pd.DataFrame]


#: ``Effect.chunks`` of a step whose chunks a pass computes itself (it has no graph of its own)
IN_PASS = "computed chunk by chunk in a pass"


@dataclass
class Lean:
    """What the executor gives ``build_lean``: how a step's chunk function, checkpoint
    writer and sink writer are made (``chunk_fn(member) -> f(df, chunk)``, ``writer(member)``,
    ``sink(member, make) -> make(the step's context)``)."""

    chunk_fn: Callable[[Member], Callable[[pd.DataFrame, int], pd.DataFrame]]
    writer: Callable[[Member], AtomicWriter]
    sink: Callable[[Member, Callable], AtomicWriter]


def build_lean(members: list[Member], first_inputs: dict[str, Any], make_result, lean: Lean, report
               ) -> tuple[list[tuple[None, int, Any]] | None, Any]:
    """The pass as one task per chunk: read it, then each step's work on it in turn.

    Each step's chunk function is called directly (``chunk`` actions through
    ``apply_chunk``, checks through their action's ``chunk_check``) and every step
    reports its chunk as it goes, so the tasks return nothing. This skips building
    and optimising a Dask collection per step (tens of ms) and ~12 tasks per chunk.
    Returns ``(tasks, None)``, or ``(None, head result)`` when a step can't be run
    this way (then ``build`` makes the graph, reusing the head's result if made).
    """
    import dask
    import dask.dataframe as dd

    if any(not lean_step(m.step, i) for i, m in enumerate(members)):
        return None, None
    head = members[0]
    if head.step.action.kind == "step" and head.step.action.chunk_check is None:
        result = make_result(head, first_inputs)  # a source (data.extract): its partitions
        if not isinstance(result, dd.DataFrame):
            return None, result
        source, stages = result, []
    else:
        (source,) = first_inputs.values()
        stages = []
    readers = chunks.partition_sources(source)
    parts = list(readers) if readers is not None else source.to_delayed()
    written: AtomicWriter | None = None  # the last checkpoint the chunk was written to
    for index, m in enumerate(members):
        m.chunks_total = len(parts)
        action = m.step.action
        if index and action.chunk_sink is not None:
            make = action.chunk_sink(**m.step.params)
            m.writer, m.sink = lean.sink(m, make), True
            # a sink has no data downstream: its result is its Effect (as the step alone gives)
            m.effect = m.result = Effect(chunks=IN_PASS, finish=m.writer.commit, abort=m.writer.abort)
            stages.append(partial(_sink_stage, index, written, m.writer, report))
            continue
        if action.chunk_check is not None:
            check, finish = action.chunk_check(**m.step.params)
            m.effect = Effect(chunks=IN_PASS, finish=finish, passthrough=True)
            stages.append(partial(_check_stage, index, check, finish, report))
            continue
        m.writer = written = lean.writer(m)
        m.effect = Effect(chunks=IN_PASS, finish=m.writer.commit, abort=m.writer.abort)
        fn = lean.chunk_fn(m) if action.kind == "chunk" else None
        stages.append(partial(_write_stage, index, fn, m.writer, report))
    stages = tuple(stages)
    return [(None, i, dask.delayed(_chunk_path, pure=False)(i, part, stages))
            for i, part in enumerate(parts)], None


def lean_step(p: PlannedStep, index: int) -> bool:
    action = p.action
    if action.kind == "chunk" or action.chunk_check is not None or index and action.chunk_sink:
        return len(p.spec.needs) == 1
    return index == 0 and action.kind == "step" and not p.spec.needs  # a source


def _chunk_path(chunk: int, part, stages) -> None:
    """Chunk ``chunk`` through every step of the pass (``part``: the frame, or its reader)."""
    df = part() if callable(part) else part
    for stage in stages:
        df = stage(df, chunk)


def _write_stage(index: int, fn, writer: AtomicWriter, report, df: pd.DataFrame, chunk: int):
    if fn is not None:
        df = fn(df, chunk)
    report(index, chunk, writer.part(df, chunk))
    return df


def _sink_stage(index: int, written: AtomicWriter | None, writer: AtomicWriter, report,
                df: pd.DataFrame, chunk: int):
    """Write the chunk to the sink: a copy of the part just checkpointed when the sink
    would encode it the same way (no second encoding), else the frame itself."""
    part = written.tmp / part_name(chunk, written.fmt) if written is not None else None
    if part is not None and writer.encodes_like(part):
        report(index, chunk, writer.copy(part, chunk))
    else:
        report(index, chunk, writer.part(df, chunk))
    return df


def _check_stage(index: int, check, finish, report, df: pd.DataFrame, chunk: int):
    frame = check(df, chunk)
    report(index, chunk, frame)
    return _passed(df, frame, finish)


def build(members: list[Member], first_inputs: dict[str, Any], make_result, make_effect, report,
          first_result: Any = None) -> list[tuple[int, int, Any]]:
    """Build the pass's graph: returns ``(member index, chunk, delayed frame)`` to compute.

    ``make_result(member, inputs)`` applies a step's action to its inputs (Dask
    DataFrames; ``first_result``: the first step's, already made); ``make_effect(member,
    result)`` wraps a computed DataFrame as its checkpoint sink. Each step's chunk i is
    computed once: the frame written as its part is the frame the next step reads. A
    step that writes reports each chunk through ``report(member index, chunk, frame)``
    as it is written (the returned tasks cover the other steps' chunks), which keeps a
    chunk's path one line of tasks.
    """
    import dask
    import dask.dataframe as dd

    tasks: list[tuple[int, int, Any]] = []
    inputs = first_inputs
    for index, member in enumerate(members):
        result = first_result if index == 0 and first_result is not None else make_result(member, inputs)
        last = index == len(members) - 1
        if isinstance(result, Effect):
            if not (result.passthrough and result.chunks is not None and result.output is not None):
                raise NotFusable(member.step.name)
            member.effect = result
            checks = result.chunks.to_delayed()
            source = result.output
            # the next step gets chunk i once the check passed it
            data = [dask.delayed(_passed, pure=False)(d, c, result.finish)
                    for d, c in zip(source.to_delayed(), checks, strict=True)]
            tasks += [(index, i, c) for i, c in enumerate(checks)]
            meta = source._meta
        elif isinstance(result, dd.DataFrame):
            effect = make_effect(member, result)
            member.effect, member.writer, member.result = effect, _writer_of(effect), result
            data = [dask.delayed(_write_and_carry, pure=False)(part, member.writer, i, index, report, last)
                    for i, part in enumerate(result.to_delayed())]
            if last:
                tasks += [(index, i, d) for i, d in enumerate(data)]
            meta = result._meta
        else:
            raise NotFusable(member.step.name)
        member.chunks_total = len(data)
        if not last:
            inputs = {member.step.name: dd.from_delayed(data, meta=meta, verify_meta=False)}
    return tasks


def _writer_of(effect: Effect) -> AtomicWriter:
    writer = getattr(effect.finish, "__self__", None)
    if not isinstance(writer, AtomicWriter):
        raise NotFusable("a checkpoint sink without its writer")
    return writer


def _write_and_carry(df: pd.DataFrame, writer: AtomicWriter, chunk: int, index: int, report, last: bool):
    """Write chunk ``chunk`` as a part and report it; hand the frame on to the next step."""
    summary = writer.part(df, chunk)
    report(index, chunk, summary)
    return None if last else df


class CheckFailed(StepError):
    """Internal: a check rejected a chunk inside a pass (the check, run on its own, reports it)."""


def _passed(df: pd.DataFrame, check: pd.DataFrame, finish) -> pd.DataFrame:
    try:
        finish(check)
    except Exception as err:  # noqa: BLE001 — whatever it says, the check run alone says it again
        raise CheckFailed(str(err)) from err
    return df


__all__ = ["IN_PASS", "Lean", "Member", "Partial", "NotFusable", "CheckFailed", "build", "build_lean",
           "lean_step"]
