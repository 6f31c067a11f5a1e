"""One pass over a chain of chunk-wise steps: chunk i goes through every step before chunk i+1.

Run one after another, each step of ``extract -> validate -> transform -> load``
waits for the whole of the step before it, then reads its checkpoint back from
disk. Fused, they are one pass: a chunk is parsed, written as extract's part,
checked, transformed, written as transform's part and copied into the load's
output while the next chunk is parsed, which is what a hand-written Dask pipeline
does. Every step still writes its own checkpoint (so a rerun reuses it) and
reports its own chunks. The pass saves the reads of each checkpoint by the next
step and the wait for each step's last chunk (figures in benchmarks/README.md).

A chain is a run of steps where each one after the first has a single input, the
step before it, which feeds nothing else; every step streams, is chunk-wise
(a ``chunk`` action or a ``step`` action registered ``chunkwise``: data.extract,
data.validate), has no retries and a fixed ``chunk_size``. A sink that takes its
input chunk by chunk (``chunk_sink``: data.load to Parquet) may end a chain.
Chains form on the threaded backend only (on a cluster the steps' memory guards
can't follow the chunks). ``NBFLOW_FUSE=0`` turns fusion off.

The pass's tasks are laid out in ``passgraph.py`` (one task per chunk where every
step offers its per-chunk work, else a Dask graph of the steps' collections); this
module finds the chains and runs them: commit, finish alone or fail their steps.

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
from dataclasses import dataclass
from functools import partial
from typing import Any

import pandas as pd

from nbflow import events as ev
from nbflow.actions.registry import Effect, StepContext
from nbflow.actions.sinks import AtomicWriter, checkpoint_writer
from nbflow.engine import chunks
from nbflow.engine.allocator import release_memory
from nbflow.engine.guard import reset_async_signal
from nbflow.engine.outcome import Progress, StepFailed, explained, failure_event
from nbflow.engine.passgraph import Lean, Member, Partial, build, build_lean, lean_step
from nbflow.errors import RunInterrupted
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

    def fusable(name: str, tail: bool = False) -> bool:
        p = plan.steps[name]
        return name in to_run and (_fusable(p) or tail and _sink(p))

    after: dict[str, str] = {}  # step -> the step it hands its chunks to in a pass
    for name in plan.order:
        needs = tuple(plan.steps[name].spec.needs)
        if (fusable(name, tail=True) and len(needs) == 1 and fusable(needs[0])
                and consumers[needs[0]] == [name]):
            after[needs[0]] = name
    found = []
    for head in (n for n in plan.order if n in after and n not in after.values()):
        chain = [head]
        while chain[-1] in after:
            chain.append(after[chain[-1]])
        if _sink(plan.steps[chain[-1]]) and not all(
                lean_step(plan.steps[n], i) for i, n in enumerate(chain)):
            chain.pop()  # only a pass run chunk by chunk (build_lean) feeds a sink
        if len(chain) > 1:
            found.append(tuple(chain))
    return found


def _fusable(p: PlannedStep) -> bool:
    return (p.streaming and p.spec.retries == 0 and isinstance(p.chunk_size, int)
            and (p.action.kind == "chunk" or p.action.chunkwise))


def _sink(p: PlannedStep) -> bool:
    """A sink that takes its input chunk by chunk: it may end a pass (it feeds no step)."""
    return (p.streaming and p.spec.retries == 0 and isinstance(p.chunk_size, int)
            and p.action.chunk_sink is not None and p.action.chunk_sink(**p.params) is not None)


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

        def token(p: PlannedStep) -> str:
            tokens[p.name] = f"{p.key}-{secrets.token_hex(4)}"
            return tokens[p.name]

        def make_result(m: Member, inputs: dict[str, Any]):
            p = m.step
            ctx = StepContext(step=p.spec, inputs=inputs, chunk_size=int(p.chunk_size), streaming=True,
                              workdir=self.workdir, namespace=self.namespace, token=token(p))
            return chunks.apply_action(p.action, ctx, p.params, self.backend, self.cancel, guards[p.name])

        def make_effect(m: Member, result) -> Effect:
            p = m.step
            return chunks.checkpoint_effect(result, self.run_dir.checkpoint_dir(p.name, p.key),
                                            int(p.chunk_size), self._format_for(p))

        def chunk_fn(m: Member):
            p = m.step
            return partial(chunks.apply_at, chunks.Tokenized(p.action.func, token(p), guards[p.name], self.cancel),
                           dict(p.params), int(p.chunk_size))

        def writer(m: Member) -> AtomicWriter:
            p = m.step
            return checkpoint_writer(self.run_dir.checkpoint_dir(p.name, p.key), self._format_for(p))

        def sink(m: Member, make) -> AtomicWriter:
            p = m.step
            return make(StepContext(step=p.spec, inputs={}, chunk_size=int(p.chunk_size), streaming=True,
                                    workdir=self.workdir, namespace=self.namespace, token=token(p)))

        def report(index: int, chunk: int, frame) -> None:
            m = members[index]
            m.frames[chunk] = frame
            self._chunk_done(m.step, progress[m.step.name], guards[m.step.name], chunk, frame)

        def on_part(k: int, frame) -> None:
            index, chunk, _ = tasks[k]
            # a writing step reported its chunk itself, as did every step of a lean pass (None)
            if index is not None and members[index].writer is None:
                report(index, chunk, frame)

        tasks: list = []
        first = members[0].step
        cancelled, error = False, None
        try:
            inputs = {n: chunks.open_checkpoint(self.outputs[n], n) for n in first.spec.needs}
            lean, head = build_lean(members, inputs, make_result, Lean(chunk_fn, writer, sink), report)
            tasks = lean if lean is not None else build(members, inputs, make_result, make_effect, report,
                                                        first_result=head)
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
            self.emit(failure_event(self.run_id, m.step.name, explained(m.step, error, self.workdir), started,
                                     1, False, progress[m.step.name].records, memory))
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
            self.emit(failure_event(self.run_id, p.name, explained(p, exc, self.workdir), started, 1, False,
                                     progress.records, memory))
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
            # a sink alone makes a writer of its own: the parts the pass gave it are dropped
            if (fresh or m.sink) and m.writer is not None:
                m.writer.abort()
            restart.append(fresh or m.sink)
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


__all__ = ["chains", "Member", "Partial", "Resume", "Passes"]
