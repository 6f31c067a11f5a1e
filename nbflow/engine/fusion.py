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

import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from nbflow import events as ev
from nbflow.actions.registry import Effect, StepContext
from nbflow.actions.sinks import AtomicWriter
from nbflow.engine import chunks
from nbflow.engine.allocator import release_memory
from nbflow.engine.memory import reset_async_signal
from nbflow.engine.outcome import Progress, StepFailed, failure_event
from nbflow.errors import RunInterrupted, StepError
from nbflow.plan import Plan, PlannedStep

log = logging.getLogger(__name__)


def chains(plan: Plan, backend_name: str) -> list[tuple[str, ...]]:
    """The chains of two or more steps of ``plan`` to run as single passes."""
    if backend_name != "threads" or os.environ.get("NBFLOW_FUSE", "1").strip() in ("0", "false", "no"):
        return []
    to_run = set(plan.to_run)
    consumers: dict[str, list[str]] = {n: [] for n in plan.order}
    for step in plan.workflow.steps:
        for need in step.needs:
            consumers.setdefault(need, []).append(step.name)

    def fusable(name: str) -> bool:
        return name in to_run and _fusable(plan.steps[name])

    after: dict[str, str] = {}  # step -> the step it hands its chunks to in a pass
    for name in plan.order:
        needs = tuple(plan.steps[name].spec.needs)
        if fusable(name) and len(needs) == 1 and fusable(needs[0]) and consumers[needs[0]] == [name]:
            after[needs[0]] = name
    found = []
    for head in (n for n in plan.order if n in after and n not in after.values()):
        chain = [head]
        while chain[-1] in after:
            chain.append(after[chain[-1]])
        found.append(tuple(chain))
    return found


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


@dataclass
class Resume:
    """A step that started in a pass and goes on alone: when it started, its progress, its work."""

    started: float
    progress: Progress
    partial: Partial


class Passes:
    """The executor's side of passes (mixed into ``Executor``, whose step methods it uses):
    run a chain as one pass, then commit, finish alone or fail its steps."""

    def _run_chain(self, names: tuple[str, ...]) -> None:
        """Run ``names`` as one pass; the steps left unfinished go on one at a time.

        Raises StepFailed(step) for the step that failed (those after it are left
        for the caller to skip) and RunInterrupted when the run was cancelled.
        """
        members = [Member(self.plan.steps[n]) for n in names]
        started, budgets, progress, guards = time.time(), {}, {}, {}
        for m in members:
            p = m.step
            budgets[p.name] = p.spec.max_memory or self.default_budget
            self._started(p, 1, budgets[p.name], tuple(n for n in names if n != p.name))
            progress[p.name] = Progress()
            guards[p.name] = self.monitor.guard(p.name, budgets[p.name]) if self.monitor is not None else None

        tokens: dict[str, str] = {}

        def make_result(m: Member, inputs: dict[str, Any]):
            p = m.step
            tokens[p.name] = f"{p.key}-{secrets.token_hex(4)}"
            ctx = StepContext(step=p.spec, inputs=inputs, chunk_size=int(p.chunk_size), streaming=True,
                              workdir=self.workdir, namespace=self.namespace, token=tokens[p.name])
            return chunks.apply_action(p.action, ctx, p.params, self.backend, self.cancel, guards[p.name])

        def make_effect(m: Member, result) -> Effect:
            p = m.step
            return chunks.checkpoint_effect(result, self.run_dir.checkpoint_dir(p.name, p.key),
                                            int(p.chunk_size), self._format_for(p))

        def report(index: int, chunk: int, frame) -> None:
            m = members[index]
            m.frames[chunk] = frame
            self._chunk_done(m.step, progress[m.step.name], guards[m.step.name], chunk, frame)

        def on_part(k: int, frame) -> None:
            index, chunk, _ = tasks[k]
            if members[index].writer is None:  # a writing step reported its chunk itself
                report(index, chunk, frame)

        tasks: list = []
        first = members[0].step
        cancelled, error = False, None
        try:
            tasks = build(
                members, {n: chunks.open_checkpoint(self.outputs[n], n) for n in first.spec.needs},
                make_result, make_effect, report)
            for m in members:
                progress[m.step.name].total = m.chunks_total
                self.emit(ev.StepPlanned(run_id=self.run_id, step=m.step.name, chunks_total=m.chunks_total))
            self.backend.compute_parts([t[2] for t in tasks], on_part, self.cancel)
        except BaseException as exc:  # noqa: BLE001 — sorted out below, step by step
            log.debug("pass %s stopped: %r", "+".join(names), exc)
            cancelled = self.cancel.is_set() or not isinstance(exc, Exception)
            error = None if cancelled else exc
        finally:
            tasks.clear()  # the graph holds the last chunks' frames
        culprit = _culprit(members, tokens, error)
        end = len(members) if culprit is None else culprit
        # in order: a step whose every chunk is done (within budget) is complete; the first
        # one that isn't, and those after it up to the culprit, go on alone
        for i in range(end):
            m, guard = members[i], guards[members[i].step.name]
            if m.complete and (guard is None or guard.tripped is None):
                self._commit_member(members, i, guards, progress[m.step.name], started)
                continue
            if cancelled:
                self._abort_pass(members[i:], guards)
                for rest in members[i:]:
                    self.emit(ev.StepCancelled(run_id=self.run_id, step=rest.step.name,
                                               duration=time.time() - started))
                raise RunInterrupted(self.run_id)
            self._finish_alone(members[i:], guards, progress, started, count=end - i)
            break
        if culprit is not None:
            # the step's own code raised: that is its failure (running it again would call
            # the user's function twice on a chunk, and a flaky one could pass unnoticed)
            m = members[culprit]
            memory = self._release(guards[m.step.name])
            self.emit(failure_event(self.run_id, m.step.name, error, started, 1, False,
                                     progress[m.step.name].records, memory))
            del error
            self._abort_pass(members[culprit:], guards)
            release_memory()
            raise StepFailed(m.step.name)
        return None

    def _commit_member(self, members: list[Member], i: int, guards: dict, progress: Progress,
                       started: float) -> None:
        """Commit a step whose every chunk was done in its pass."""
        m = members[i]
        p = m.step
        memory = self._release(guards[p.name])
        try:
            results = pd.concat([m.frames[c] for c in range(m.chunks_total)], ignore_index=True) \
                if m.chunks_total else pd.DataFrame()
            m.frames.clear()
            info = self._commit(p, m.effect, m.result, dict(m.effect.finish(results) or {}), progress)
        except Exception as exc:  # noqa: BLE001 — e.g. a check that fails on all chunks together
            self.emit(failure_event(self.run_id, p.name, exc, started, 1, False, progress.records, memory))
            self._abort_pass(members[i + 1:], guards)
            raise StepFailed(p.name) from None
        info["memory"] = memory
        self._completed(p, info, started, progress)

    def _finish_alone(self, rest: list[Member], guards: dict, progress: dict, started: float,
                      count: int) -> None:
        """Run the first ``count`` steps of ``rest`` (the unfinished part of a pass) one at a
        time, from the chunks they had done (from scratch after a step that crossed its budget
        in the pass). If one fails or the run is cancelled, the rest are dropped."""
        fresh, restart = False, []
        for m in rest[:count]:
            guard = guards[m.step.name]
            if guard is not None:
                fresh = fresh or guard.tripped is not None
                self.monitor.release(guard)  # shared figures: the step alone measures its own
                guards[m.step.name] = None
                if guard.tripped is not None:
                    reset_async_signal()
            if fresh and m.writer is not None:
                m.writer.abort()
            restart.append(fresh)
        for i, m in enumerate(rest[:count]):
            if restart[i]:
                partial = Partial(None, {})
                progress[m.step.name] = Progress()
            else:
                partial = Partial(m.writer, dict(m.frames))
            m.frames.clear()
            try:
                self._run_step(m.step, Resume(started, progress[m.step.name], partial))
            except (StepFailed, RunInterrupted):
                self._abort_pass(rest[i + 1:], guards)
                if self.cancel.is_set():
                    for later in rest[i + 1:]:
                        self.emit(ev.StepCancelled(run_id=self.run_id, step=later.step.name,
                                                   duration=time.time() - started))
                    raise RunInterrupted(self.run_id) from None
                raise StepFailed(m.step.name) from None

    def _abort_pass(self, members: list[Member], guards: dict) -> None:
        for m in members:
            if m.writer is not None:
                m.writer.abort()
            guard = guards.get(m.step.name)
            if guard is not None:
                self.monitor.release(guard)
                guards[m.step.name] = None
            m.frames.clear()


def _culprit(members: list[Member], tokens: dict[str, str], error: BaseException | None) -> int | None:
    """The step of a pass whose own code raised ``error`` (its chunk function tags it), else
    None: a memory error (the figures were the whole pass's) or an error of a built-in
    reader or check, which the step run alone meets again."""
    token = getattr(error, chunks.RAISED_IN, None)
    if token is None or isinstance(error, MemoryError):
        return None
    return next((i for i, m in enumerate(members) if tokens.get(m.step.name) == token), None)


__all__ = ["chains", "build", "Member", "Partial", "Resume", "Passes", "NotFusable", "CheckFailed"]
