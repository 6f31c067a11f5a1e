"""Execute a Plan: steps in dependency order (independent ones side by side), chunk by chunk.

Each step reads its inputs' checkpoints as Dask DataFrames (one partition per
checkpoint part file), applies its action, and writes its own checkpoint
atomically; downstream steps read that. Events report everything; the executor
keeps no state a view needs.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from graphlib import TopologicalSorter
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd

from nbflow import diagnose
from nbflow import events as ev
from nbflow.actions.registry import Effect, StepContext
from nbflow.engine import chunks, fusion
from nbflow.engine.limits import auto_chunk_size
from nbflow.engine.memory import release_memory, reset_async_signal
from nbflow.errors import MemoryBudgetExceeded, RunInterrupted, StepError
from nbflow.parts import checkpoint_format
from nbflow.plan import Plan, PlannedStep
from nbflow.store import CHECKPOINT_META, RunDir, read_checkpoint_meta, write_json_atomic
from nbflow.tracebacks import format_exception, user_frame

Emit = Callable[[ev.Event], None]
log = logging.getLogger(__name__)


class _Stop:
    """When a step's chunks must stop: the run was cancelled or the step's budget tripped."""

    def __init__(self, cancel: threading.Event, guard):
        self.cancel, self.guard = cancel, guard

    def is_set(self) -> bool:
        return self.cancel.is_set() or self.guard.tripped is not None


class _StepFailed(Exception):
    """Internal: a step failed for good (its events are already emitted)."""


@dataclass
class _Resume:
    """A step that started in a pass and goes on alone: when it started, its progress, its work."""

    started: float
    progress: _Progress
    partial: fusion.Partial


class Executor:
    def __init__(self, plan: Plan, run_dir: RunDir, backend, emit: Emit, *,
                 namespace: Mapping[str, Any] | None = None, workdir: Path | None = None,
                 monitor=None, default_budget: int | None = None, max_parallel_steps: int = 2,
                 cancel: threading.Event | None = None):
        self.plan = plan
        self.run_dir = run_dir
        self.backend = backend
        self.emit = emit
        self.namespace = namespace
        self.workdir = Path(workdir or Path.cwd())
        self.monitor = monitor
        self.default_budget = default_budget
        self.max_parallel_steps = max(1, max_parallel_steps)
        self.cancel = cancel or threading.Event()
        self.run_id = run_dir.run_id
        #: the checkpoint each finished step left (reused ones included)
        self.outputs: dict[str, str | None] = {}
        self.records: dict[str, int | None] = {}
        #: first step -> the steps run as one pass with it (nbflow/engine/fusion.py)
        self.chains = {chain[0]: chain for chain in fusion.chains(plan, backend.name)}

    # -- the run -------------------------------------------------------------
    def execute(self) -> str:
        """Run the plan; returns 'completed', 'failed' or 'cancelled'.

        KeyboardInterrupt cancels: no new chunk starts, in-flight chunks finish,
        no checkpoint is committed for an unfinished step; it is re-raised.
        """
        plan = self.plan
        for name in plan.reused:
            p = plan.steps[name]
            self.outputs[name] = p.checkpoint
            self.records[name] = p.records_out
            self.emit(ev.StepReused(run_id=self.run_id, step=name, records_out=p.records_out,
                                    checkpoint=p.checkpoint, cache_key=p.key))
        to_run = set(plan.to_run)
        sorter = TopologicalSorter({n: [d for d in plan.steps[n].spec.needs if d in to_run]
                                    for n in plan.order if n in to_run})
        sorter.prepare()
        failed: list[str] = []
        blocked: set[str] = set()
        stopped: set[str] = set()
        running: dict[Future, str] = {}
        interrupted = False
        pool = ThreadPoolExecutor(self.max_parallel_steps, thread_name_prefix="nbflow-step")
        try:
            ready = list(sorter.get_ready())
            while ready or running:
                for name in sorted(ready, key=plan.order.index):
                    if name in blocked:
                        continue
                    if self.cancel.is_set():
                        break
                    if name in self.chains:
                        running[pool.submit(self._run_chain, self.chains[name])] = name
                    else:
                        running[pool.submit(self._run_step, plan.steps[name])] = name
                ready = []
                if not running:
                    break
                try:
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                except KeyboardInterrupt:
                    interrupted = True
                    self.cancel.set()
                    continue
                for future in done:
                    name = running.pop(future)
                    chain = self.chains.get(name, (name,))
                    try:
                        future.result()
                    except RunInterrupted:
                        # their StepCancelled is already out
                        stopped.update(n for n in chain if n not in self.outputs)
                        continue
                    except _StepFailed as failure:
                        name = failure.args[0] if failure.args else name
                    # the steps of a pass finish in order: each one done lets the next out
                    released: list[str] = []
                    for member in chain:
                        if member not in self.outputs:
                            failed.append(member)
                            self._skip_dependents(member, blocked)
                            break
                        sorter.done(member)
                        released += sorter.get_ready()
                    ready.extend(n for n in released if n not in chain)
        finally:
            pool.shutdown(wait=True)
        cancelled = self.cancel.is_set()
        if cancelled:
            for name in plan.order:
                if (name in to_run and name not in self.outputs and name not in failed
                        and name not in blocked and name not in stopped):
                    self.emit(ev.StepCancelled(run_id=self.run_id, step=name))
        status = "cancelled" if cancelled else "failed" if failed else "completed"
        if interrupted:
            raise KeyboardInterrupt
        return status

    def _skip_dependents(self, root: str, blocked: set[str]) -> None:
        for name in self.plan.order:
            if name in self.plan.downstream(root) and name not in blocked:
                blocked.add(name)
                self.emit(ev.StepSkipped(run_id=self.run_id, step=name,
                                         reason=f"skipped: {root} failed", because_of=root))

    # -- one step ------------------------------------------------------------
    def _run_step(self, p: PlannedStep, resume: _Resume | None = None) -> None:
        """Run one step (with its retries); ``resume``: go on from its chunks done in a pass."""
        attempts = p.spec.retries + 1
        budget = p.spec.max_memory or self.default_budget
        for attempt in range(1, attempts + 1):
            if resume is not None:  # started with its pass: no second StepStarted
                started, progress, partial = resume.started, resume.progress, resume.partial
            else:
                started, progress, partial = time.time(), _Progress(), None
                self._started(p, attempt, budget)
            guard = self.monitor.guard(p.name, budget) if self.monitor is not None else None
            memory: dict[str, Any] = {}
            try:
                try:
                    info = self._execute(p, progress, guard, budget, partial)
                finally:
                    memory = self._release(guard)
            except RunInterrupted:
                self.emit(ev.StepCancelled(run_id=self.run_id, step=p.name,
                                           duration=time.time() - started))
                raise
            except Exception as exc:  # noqa: BLE001 — any error of the user's code fails the step
                if self.cancel.is_set():
                    self.emit(ev.StepCancelled(run_id=self.run_id, step=p.name,
                                               duration=time.time() - started))
                    raise RunInterrupted(self.run_id) from exc
                will_retry = attempt < attempts
                self.emit(_failure_event(self.run_id, p.name, exc, started, attempt, will_retry,
                                         progress.records, memory))
                del exc  # its traceback holds the failed chunk's frames: let them go
                if guard is not None:
                    release_memory()
                if will_retry:
                    continue
                raise _StepFailed(p.name) from None
            info["memory"] = memory
            self._completed(p, info, started, progress)
            return

    def _started(self, p: PlannedStep, attempt: int, budget: int | None,
                 pass_with: tuple[str, ...] = ()) -> None:
        self.emit(ev.StepStarted(run_id=self.run_id, step=p.name, attempt=attempt,
                                 chunk_size=p.chunk_size if isinstance(p.chunk_size, int) else None,
                                 max_memory=budget, streaming=p.streaming,
                                 records_in=self._records_in(p), pass_with=pass_with))

    def _completed(self, p: PlannedStep, info: dict[str, Any], started: float, progress: _Progress) -> None:
        self.outputs[p.name] = info["checkpoint"]
        self.records[p.name] = info.get("records_out")
        self.emit(ev.StepCompleted(
            run_id=self.run_id, step=p.name, duration=time.time() - started,
            records_in=info.get("records_in", self._records_in(p)),
            records_out=info.get("records_out"), chunks=progress.total or progress.done,
            bytes_out=info.get("bytes"), checkpoint=info["checkpoint"], cache_key=p.key,
            info={k: v for k, v in info.items() if k not in ("checkpoint", "records_out", "bytes")}))

    # -- a pass over a chain of steps --------------------------------------------
    def _run_chain(self, names: tuple[str, ...]) -> None:
        """Run ``names`` as one pass; the steps left unfinished go on one at a time.

        Raises _StepFailed(step) for the step that failed (those after it are left
        for the caller to skip) and RunInterrupted when the run was cancelled.
        """
        members = [fusion.Member(self.plan.steps[n]) for n in names]
        started, budgets, progress, guards = time.time(), {}, {}, {}
        for m in members:
            p = m.step
            budgets[p.name] = p.spec.max_memory or self.default_budget
            self._started(p, 1, budgets[p.name], tuple(n for n in names if n != p.name))
            progress[p.name] = _Progress()
            guards[p.name] = self.monitor.guard(p.name, budgets[p.name]) if self.monitor is not None else None

        tokens: dict[str, str] = {}

        def make_result(m: fusion.Member, inputs: dict[str, Any]):
            p = m.step
            tokens[p.name] = f"{p.key}-{secrets.token_hex(4)}"
            ctx = StepContext(step=p.spec, inputs=inputs, chunk_size=int(p.chunk_size), streaming=True,
                              workdir=self.workdir, namespace=self.namespace, token=tokens[p.name])
            return chunks.apply_action(p.action, ctx, p.params, self.backend, self.cancel, guards[p.name])

        def make_effect(m: fusion.Member, result) -> Effect:
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
            tasks = fusion.build(
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
            self.emit(_failure_event(self.run_id, m.step.name, error, started, 1, False,
                                     progress[m.step.name].records, memory))
            del error
            self._abort_pass(members[culprit:], guards)
            release_memory()
            raise _StepFailed(m.step.name)
        return None

    def _commit_member(self, members: list[fusion.Member], i: int, guards: dict, progress: _Progress,
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
            self.emit(_failure_event(self.run_id, p.name, exc, started, 1, False, progress.records, memory))
            self._abort_pass(members[i + 1:], guards)
            raise _StepFailed(p.name) from None
        info["memory"] = memory
        self._completed(p, info, started, progress)

    def _finish_alone(self, rest: list[fusion.Member], guards: dict, progress: dict, started: float,
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
                partial = fusion.Partial(None, {})
                progress[m.step.name] = _Progress()
            else:
                partial = fusion.Partial(m.writer, dict(m.frames))
            m.frames.clear()
            try:
                self._run_step(m.step, _Resume(started, progress[m.step.name], partial))
            except (_StepFailed, RunInterrupted):
                self._abort_pass(rest[i + 1:], guards)
                if self.cancel.is_set():
                    for later in rest[i + 1:]:
                        self.emit(ev.StepCancelled(run_id=self.run_id, step=later.step.name,
                                                   duration=time.time() - started))
                    raise RunInterrupted(self.run_id) from None
                raise _StepFailed(m.step.name) from None

    def _abort_pass(self, members: list[fusion.Member], guards: dict) -> None:
        for m in members:
            if m.writer is not None:
                m.writer.abort()
            guard = guards.get(m.step.name)
            if guard is not None:
                self.monitor.release(guard)
                guards[m.step.name] = None
            m.frames.clear()

    def _release(self, guard) -> dict[str, Any]:
        if guard is None:
            return {}
        guard.wait_idle(timeout=10)  # chunks still unwinding after the first failure
        stats = self.monitor.release(guard)
        if stats.tripped:
            reset_async_signal()
        return {"baseline": stats.baseline, "peak": stats.peak,
                "peak_above_baseline": stats.peak_above_baseline, "budget": stats.budget,
                "at_failure": stats.at_failure, "tripped": stats.tripped, "samples": stats.samples}

    def _records_in(self, p: PlannedStep) -> int | None:
        counts = [self.records.get(n) for n in p.spec.needs]
        return sum(counts) if counts and None not in counts else None

    def _execute(self, p: PlannedStep, progress: _Progress, guard, budget: int | None,
                 partial: fusion.Partial | None = None) -> dict[str, Any]:
        inputs = {name: chunks.open_checkpoint(self.outputs[name], name) for name in p.spec.needs}
        ctx = StepContext(step=p.spec, inputs=inputs, chunk_size=chunks.DEFAULT_AUTO,
                          streaming=p.streaming, workdir=self.workdir, namespace=self.namespace,
                          token=f"{p.key}-{secrets.token_hex(4)}")
        auto = None
        if p.chunk_size == "auto":
            ctx.chunk_size = auto = self._auto_chunk_size(p, ctx, budget)
        else:
            ctx.chunk_size = int(p.chunk_size)
        dest = self.run_dir.checkpoint_dir(p.name, p.key)
        # the memory guard holds threads and locks: it works where the chunks run in this process
        local_guard = guard if self.backend.name == "threads" else None
        # on a cluster the guard can't reach into the workers' threads: a trip stops the
        # step's chunks from the scheduler's side instead (no new chunk starts)
        stop = self.cancel if local_guard is not None or guard is None else _Stop(self.cancel, guard)
        result = chunks.apply_action(p.action, ctx, p.params, self.backend, stop, local_guard)
        effect = (result if isinstance(result, Effect)
                  else chunks.checkpoint_effect(result, dest, ctx.chunk_size, self._format_for(p),
                                                partial.writer if partial is not None else None))
        done = dict(partial.frames) if partial is not None else {}

        if effect.chunks is not None:
            progress.total = effect.chunks.npartitions
            if partial is None:
                self.emit(ev.StepPlanned(run_id=self.run_id, step=p.name, chunks_total=progress.total,
                                         chunk_size=auto))
        try:
            frames = []
            if effect.chunks is not None:
                parts = effect.chunks.to_delayed()
                todo = [i for i in range(len(parts)) if i not in done]
                computed = self.backend.compute_parts(
                    [parts[i] for i in todo],
                    lambda k, frame: self._chunk_done(p, progress, guard, todo[k], frame), stop)
                done.update(zip(todo, computed, strict=True))
                frames = [done[i] for i in range(len(parts))]
                del computed
            done.clear()
            if guard is not None and guard.tripped is not None:
                # a step whose work the guard could not interrupt (a long C call, a built-in)
                # still fails when its memory crossed the budget, before anything is committed
                raise guard.tripped
            results = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
            del frames
            info = dict(effect.finish(results) or {})
        except BaseException as exc:
            abort = getattr(effect, "abort", None)
            if abort is not None:
                abort()
            if isinstance(exc, RunInterrupted) and guard is not None and guard.tripped is not None \
                    and not self.cancel.is_set():
                raise guard.tripped from None  # stopped for its budget, not by the user
            raise
        return self._commit(p, effect, result, info, progress)

    def _chunk_done(self, p: PlannedStep, progress: _Progress, guard, index: int, frame) -> None:
        n = int(frame["records"].sum()) if isinstance(frame, pd.DataFrame) and "records" in frame else 0
        progress.add(n)
        if guard is not None:
            guard.add_records(n)
        self.emit(ev.ChunkDone(run_id=self.run_id, step=p.name, chunk=index,
                               chunks_done=progress.done, chunks_total=progress.total,
                               records=n, records_done=progress.records))

    def _commit(self, p: PlannedStep, effect: Effect, result, info: dict[str, Any],
                progress: _Progress) -> dict[str, Any]:
        """Mark the step's checkpoint complete (its parts are in place by now)."""
        dest = self.run_dir.checkpoint_dir(p.name, p.key)
        meta: dict[str, Any] = {"step": p.name, "key": p.key, "created": time.time(), **_jsonable(info)}
        if effect.passthrough:
            (source,) = [self.outputs[n] for n in p.spec.needs]
            meta["alias"] = str(source)
            dest.mkdir(parents=True, exist_ok=True)
        elif isinstance(result, Effect) or effect.chunks is None:
            # a sink (data.load) or an action that returned nothing: no data to read downstream
            dest.mkdir(parents=True, exist_ok=True)
            meta["empty"] = True
        meta.setdefault("records_out", info.get("records_out", progress.records))
        write_json_atomic(dest / CHECKPOINT_META, meta)
        self.run_dir.discard_stale_checkpoints(p.name, keep=dest)
        return {**info, "records_out": meta["records_out"], "checkpoint": str(dest)}

    def _format_for(self, p: PlannedStep) -> str:
        """The checkpoint format every step that reads ``p`` asks for, else the default.

        A step whose only reader is a data.load to Parquet checkpoints in Parquet, so
        the load copies its parts instead of decoding and encoding every value again.
        """
        readers = [self.plan.steps[s.name] for s in self.plan.workflow.steps
                   if p.name in s.needs and s.name in self.plan.steps]
        wanted = {r.action.input_format(r.params) if r.action.input_format else None for r in readers}
        if len(wanted) == 1 and None not in wanted:
            return wanted.pop()
        return checkpoint_format()

    def _auto_chunk_size(self, p: PlannedStep, ctx: StepContext, budget: int | None) -> int:
        """``chunk_size: auto``: records per chunk from the budget and a measured sample."""
        probe = 1_000
        if p.spec.needs:
            sample = next(iter(ctx.inputs.values())).partitions[0].compute(scheduler="sync").head(probe)
        else:
            ctx.chunk_size = probe
            probed = chunks.apply_action(p.action, ctx, p.params, self.backend, self.cancel)
            if isinstance(probed, Effect) or probed is None:
                return chunks.DEFAULT_AUTO
            sample = probed.partitions[0].compute(scheduler="sync") if hasattr(probed, "partitions") \
                else probed.head(probe)
        per_record = chunks.bytes_per_record(sample)
        if not budget or not per_record:
            return chunks.DEFAULT_AUTO
        return auto_chunk_size(budget, per_record, parallel=self.backend.parallelism)


class _Progress:
    def __init__(self):
        self.done = 0
        self.total = 0
        self.records = 0
        self._lock = threading.Lock()

    def add(self, records: int) -> None:
        with self._lock:
            self.done += 1
            self.records += records


def _culprit(members: list[fusion.Member], tokens: dict[str, str], error: BaseException | None) -> int | None:
    """The step of a pass whose own code raised ``error`` (its chunk function tags it), else
    None: a memory error (the figures were the whole pass's) or an error of a built-in
    reader or check, which the step run alone meets again."""
    token = getattr(error, chunks.RAISED_IN, None)
    if token is None or isinstance(error, MemoryError):
        return None
    return next((i for i, m in enumerate(members) if tokens.get(m.step.name) == token), None)


def _failure_event(run_id: str, step: str, exc: BaseException, started: float, attempt: int,
                   will_retry: bool, records_done: int, memory: dict) -> ev.StepFailed:
    frame = user_frame(exc)
    details = dict(getattr(exc, "details", {}) or {}) if isinstance(exc, StepError) else {}
    if isinstance(exc, MemoryBudgetExceeded):
        details.update({"budget": exc.budget, "peak": exc.peak, "at_failure": exc.at_failure,
                        "records_done": exc.records_done, "chunk": exc.chunk})
        records_done = max(records_done, exc.records_done)
    if memory:
        details["memory"] = memory
    try:
        # only the live exception has the frames' locals: the diagnosis reads this later
        details["evidence"] = diagnose.evidence(exc)
    except Exception:  # noqa: BLE001 — evidence is a nicety; the failure is reported regardless
        log.debug("could not take evidence from %r", exc, exc_info=True)
    return ev.StepFailed(
        run_id=run_id, step=step, error_type=type(exc).__name__, message=str(exc),
        location=frame.where if frame else None, source_line=frame.source if frame else None,
        traceback=format_exception(exc), duration=time.time() - started, attempt=attempt,
        will_retry=will_retry, records_done=records_done, details=_jsonable(details))


def _jsonable(data: dict) -> dict:
    import json

    return json.loads(json.dumps(data, default=str))


__all__ = ["Executor", "read_checkpoint_meta"]
