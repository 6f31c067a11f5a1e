"""One pass over a chain of chunk-wise steps: chunk i goes through every step before chunk i+1.

Run one after another, each step of ``extract -> validate -> transform`` waits for
the whole of the step before it, then reads its checkpoint back from disk. Fused,
the three are one Dask graph: a chunk is parsed, written as extract's part, checked,
transformed and written as transform's part while the next chunk is parsed, which
is what a hand-written Dask pipeline does. Every step still writes its own
checkpoint (so a rerun reuses it) and reports its own chunks. The pass saves the
reads of each checkpoint by the next step and the wait for each step's last chunk
(figures in benchmarks/README.md).

A chain is a run of steps where each one after the first has a single input, the
step before it, which feeds nothing else; every step streams, is chunk-wise
(a ``chunk`` action or a ``step`` action registered ``chunkwise``: data.extract,
data.validate), has no retries and a fixed ``chunk_size``. Chains form on the
threaded backend only (on a cluster the steps' memory guards can't follow the
chunks). ``NBFLOW_FUSE=0`` turns fusion off.

Steps in a pass run at once, so they share the memory figures: each step's
budget applies to the growth of the whole pass. When the pass fails (an error,
a budget, a check that rejects a chunk), the steps whose chunks all finished are
committed, and the rest continue one at a time from the chunks they had done
(``Partial``): the failure is then met again, and reported, by the step it
belongs to, exactly as without fusion. Only an error raised by a step's own chunk
function is reported at once, as that step's failure: running it again would call
the user's function twice on a chunk.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from nbflow.actions.registry import Effect
from nbflow.actions.sinks import AtomicWriter
from nbflow.errors import StepError
from nbflow.plan import Plan, PlannedStep


def chains(plan: Plan, backend_name: str) -> list[tuple[str, ...]]:
    """The chains of two or more steps of ``plan`` to run as single passes."""
    if backend_name != "threads" or os.environ.get("NBFLOW_FUSE", "1").strip() in ("0", "false", "no"):
        return []
    to_run = set(plan.to_run)
    consumers: dict[str, list[str]] = {n: [] for n in plan.order}
    for step in plan.workflow.steps:
        for need in step.needs:
            consumers.setdefault(need, []).append(step.name)
    found, current = [], []
    for name in plan.order:
        p = plan.steps[name]
        if not (name in to_run and _fusable(p)):
            current = []
            continue
        prev = current[-1] if current else None
        if prev is not None and tuple(p.spec.needs) == (prev,) and consumers[prev] == [name]:
            current.append(name)
        else:
            current = [name]
        if len(current) == 2:
            found.append(current)
    return [tuple(c) for c in found]


def _fusable(p: PlannedStep) -> bool:
    return (p.streaming and p.spec.retries == 0 and isinstance(p.chunk_size, int)
            and (p.action.kind == "chunk" or p.action.chunkwise))


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

    @property
    def complete(self) -> bool:
        return self.effect is not None and len(self.frames) == self.chunks_total


@dataclass
class Partial:
    """What a step did in a failed pass, handed to the step run on its own: the writer
    holding its written parts and the frames of the chunks already done."""

    writer: AtomicWriter | None
    frames: dict[int, pd.DataFrame]


def build(members: list[Member], first_inputs: dict[str, Any], make_result, make_effect, report
          ) -> list[tuple[int, int, Any]]:
    """Build the pass's graph: returns ``(member index, chunk, delayed frame)`` to compute.

    ``make_result(member, inputs)`` applies a step's action to its inputs (Dask
    DataFrames); ``make_effect(member, result)`` wraps a computed DataFrame as its
    checkpoint sink. Each step's chunk i is computed once: the frame written as its
    part is the frame the next step reads. A step that writes reports each chunk
    through ``report(member index, chunk, frame)`` as it is written (the returned
    tasks cover the other steps' chunks), which keeps a chunk's path one line of
    tasks.
    """
    import dask
    import dask.dataframe as dd

    tasks: list[tuple[int, int, Any]] = []
    inputs = first_inputs
    for index, member in enumerate(members):
        result = make_result(member, inputs)
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


__all__ = ["chains", "build", "Member", "Partial", "NotFusable", "CheckFailed"]
