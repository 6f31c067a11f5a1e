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
from graphlib import TopologicalSorter
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd

from nbflow import events as ev
from nbflow.actions.registry import Effect, StepContext
from nbflow.engine import chunks, fusion
from nbflow.engine.allocator import release_memory
from nbflow.engine.guard import reset_async_signal
from nbflow.engine.limits import auto_chunk_size
from nbflow.engine.outcome import Progress, StepFailed, explained, failure_event, jsonable
from nbflow.errors import RunInterrupted
from nbflow.parts import checkpoint_format
from nbflow.plan import Plan, PlannedStep
from nbflow.store import CHECKPOINT_META, RunDir, read_checkpoint_meta, write_json_atomic

Emit = Callable[[ev.Event], None]
log = logging.getLogger(__name__)


class _Stop:
    """When a step's chunks must stop: the run was cancelled or the step's budget tripped."""

    def __init__(self, cancel: threading.Event, guard):
        self.cancel, self.guard = cancel, guard

    def is_set(self) -> bool:
        return self.cancel.is_set() or self.guard.tripped is not None


class Executor(fusion.Passes):
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
                    except StepFailed:
                        pass  # which of the chain's steps failed: the first without an output
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
    def _run_step(self, p: PlannedStep, resume: fusion.Resume | None = None) -> None:
        """Run one step (with its retries); ``resume``: go on from its chunks done in a pass."""
        attempts = p.spec.retries + 1
        budget = p.spec.max_memory or self.default_budget
        for attempt in range(1, attempts + 1):
            if resume is not None:  # started with its pass: no second StepStarted
                started, progress, partial = resume.started, resume.progress, resume.partial
            else:
                started, progress, partial = time.time(), Progress(), None
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
                self.emit(failure_event(self.run_id, p.name, explained(p, exc, self.workdir), started,
                                         attempt, will_retry, progress.records, memory))
                del exc  # its traceback holds the failed chunk's frames: let them go
                if guard is not None:
                    release_memory()
                if will_retry:
                    continue
                raise StepFailed(p.name) from None
            info["memory"] = memory
            self._completed(p, info, started, progress)
            return

    def _started(self, p: PlannedStep, attempt: int, budget: int | None,
                 pass_with: tuple[str, ...] = ()) -> None:
        self.emit(ev.StepStarted(run_id=self.run_id, step=p.name, attempt=attempt,
                                 chunk_size=p.chunk_size if isinstance(p.chunk_size, int) else None,
                                 max_memory=budget, streaming=p.streaming,
                                 records_in=self._records_in(p), pass_with=pass_with))

    def _completed(self, p: PlannedStep, info: dict[str, Any], started: float, progress: Progress) -> None:
        self.outputs[p.name] = info["checkpoint"]
        self.records[p.name] = info.get("records_out")
        self.emit(ev.StepCompleted(
            run_id=self.run_id, step=p.name, duration=time.time() - started,
            records_in=info.get("records_in", self._records_in(p)),
            records_out=info.get("records_out"), chunks=progress.total or progress.done,
            bytes_out=info.get("bytes"), checkpoint=info["checkpoint"], cache_key=p.key,
            info={k: v for k, v in info.items() if k not in ("checkpoint", "records_out", "bytes")}))

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

    def _execute(self, p: PlannedStep, progress: Progress, guard, budget: int | None,
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

    def _chunk_done(self, p: PlannedStep, progress: Progress, guard, index: int, frame) -> None:
        n = int(frame["records"].sum()) if isinstance(frame, pd.DataFrame) and "records" in frame else 0
        progress.add(n)
        if guard is not None:
            guard.add_records(n)
        self.emit(ev.ChunkDone(run_id=self.run_id, step=p.name, chunk=index,
                               chunks_done=progress.done, chunks_total=progress.total,
                               records=n, records_done=progress.records))

    def _commit(self, p: PlannedStep, effect: Effect, result, info: dict[str, Any],
                progress: Progress) -> dict[str, Any]:
        """Mark the step's checkpoint complete (its parts are in place by now)."""
        dest = self.run_dir.checkpoint_dir(p.name, p.key)
        meta: dict[str, Any] = {"step": p.name, "key": p.key, "created": time.time(), **jsonable(info)}
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


__all__ = ["Executor", "read_checkpoint_meta"]
