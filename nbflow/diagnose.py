"""A failed step → RootCause: what happened, where, why (from measurements), and what to change.

``diagnose_step(run, step)`` reads the step's records, its failure event (with the
evidence the executor took from the live exception), the memory samples, its
inputs' checkpoints, the previous successful run of the workflow and, for a
memory failure, a probe of the step's function on a small sample. Rules turn
that evidence into contributing factors, each quoting its numbers; fixes are
concrete changes in the workflow's own terms (``chunk_size: 80000``,
``max_memory: 2.5GB``, a corrected path) ranked by how likely they are to work,
the top one applied to the workflow text as a ready-to-run corrected YAML.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from nbflow import evidence as _evidence
from nbflow.state import RunState, Status
from nbflow.units import format_size

#: what a fix aims for: the estimated peak at most this share of the budget (Dask workers' target)
TARGET = 0.6
PROBE_ROWS = (1000, 4000)
_NICE = (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8)
_COMPREHENSIONS = ("<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>")


def evidence(exc: BaseException) -> dict[str, Any]:
    """What only the live exception shows (columns, arguments, the failed allocation); JSON-able."""
    return _evidence.from_exception(exc)


@dataclass(frozen=True)
class Factor:
    """One contributing factor, stated with the evidence that made its rule fire."""

    rule: str
    text: str
    evidence: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Fix:
    """One resolution option: a concrete change and what it is expected to do."""

    title: str
    kind: str  # settings | parameters | schema | code | rerun
    snippet: str  # what to write, in the workflow's (or the code's) own terms
    estimate: str  # why it should work, from the measurements
    confidence: float  # expected success, 0..1: the options are ranked by it
    step: str = ""
    change: Mapping[str, Any] = field(default_factory=dict)
    estimated_peak: int | None = None
    workflow: str | None = None  # the full corrected workflow text
    diff: str | None = None  # unified diff against the original
    overrides: Mapping[str, Any] = field(default_factory=dict)  # parameters to pass with it


@dataclass(frozen=True)
class RootCause:
    step: str
    error_type: str
    message: str
    summary: str = ""
    location: Mapping[str, Any] | None = None  # where, file, line, function, code
    stack_trace: Mapping[str, Any] = field(default_factory=dict)
    memory_stats: Mapping[str, Any] = field(default_factory=dict)
    input: Mapping[str, Any] = field(default_factory=dict)
    processing_mode: str = ""  # in-memory | chunked | streaming
    upstream_status: Mapping[str, str] = field(default_factory=dict)
    contributing_factors: tuple[Factor, ...] = ()
    resolution_options: tuple[Fix, ...] = ()
    corrected_workflow: str | None = None
    workflow_diff: str | None = None
    blocked: tuple[str, ...] = ()  # dependents skipped because of this step
    attempts: int = 1
    run_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RootCause:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["contributing_factors"] = tuple(
            Factor(**_known(Factor, f)) for f in data.get("contributing_factors") or ())
        kwargs["resolution_options"] = tuple(
            Fix(**_known(Fix, f)) for f in data.get("resolution_options") or ())
        kwargs["blocked"] = tuple(data.get("blocked") or ())
        return cls(**kwargs)

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_text(self) -> str:
        from nbflow.ui.rootcause import render_text

        return render_text(self)

    def to_html(self) -> str:
        from nbflow.ui.rootcause import render_html

        return render_html(self)

    def _repr_html_(self) -> str:
        return self.to_html()

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(f"<RootCause {self.step}>" if cycle else self.to_text())


def _known(cls, data: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def render_text(rc: RootCause | Mapping[str, Any]) -> str:
    from nbflow.ui.rootcause import render_text as text

    return text(rc if isinstance(rc, RootCause) else RootCause.from_dict(rc))


def render_html(rc: RootCause | Mapping[str, Any]) -> str:
    from nbflow.ui.rootcause import render_html as html_

    return html_(rc if isinstance(rc, RootCause) else RootCause.from_dict(rc))


def render_json(rc: RootCause | Mapping[str, Any]) -> str:
    return (rc if isinstance(rc, RootCause) else RootCause.from_dict(rc)).to_json()


# -- numbers people write ----------------------------------------------------------------

def nice_down(x: float) -> int:
    """The largest of 1, 1.5, 2, 2.5, 3, 4, 5, 6, 8 × 10^k not above ``x`` (0 below 1)."""
    if x < 1:
        return 0
    scale = 10 ** math.floor(math.log10(x))
    return int(next(m * scale for m in reversed(_NICE) if m * scale <= x + 1e-9))


def nice_size_up(nbytes: float) -> str:
    """A budget people write, at least ``nbytes``: ``2.5GB``, ``600MB``."""
    scale = 10 ** math.floor(math.log10(max(nbytes, 1)))
    value = next(m * scale for m in (*_NICE, 10) if m * scale >= nbytes)
    if value >= 1e9:
        return f"{value / 1e9:g}GB"
    return f"{max(value / 1e6, 1):g}MB"


def records(n: float | None) -> str:
    return "?" if n is None else f"{int(n):,}"


# -- the diagnosis -------------------------------------------------------------------------

def diagnose_step(run, step: str, *, probe: bool = True) -> RootCause:
    """Diagnose a failed step of ``run`` (a ``nbflow.handle.Run``) from its records and measurements.

    ``probe``: for a memory failure, run the step's function on a small sample of
    its input to measure its memory per record (needs the live plan or namespace).
    """
    from nbflow import causes, fixes
    from nbflow.memorymodel import memory_model

    ctx = causes.Context.collect(run, step, probe=probe)
    model = memory_model(ctx)
    found = causes.factors(ctx, model)
    options = fixes.options(ctx, model)
    top = next((f for f in options if f.workflow is not None), None)
    state = ctx.state
    return RootCause(
        step=step, error_type=ctx.error_class or str(ctx.error.get("error_type")),
        message=str(ctx.error.get("message") or ""), summary=_summary(ctx, model),
        location=_location(ctx), stack_trace=_stack(ctx), memory_stats=_memory_stats(ctx),
        input=_input(ctx, model), processing_mode=ctx.mode,
        upstream_status={n: state.steps[n].status.value for n in _ancestors(ctx.spec, step)
                         if n in state.steps},
        contributing_factors=tuple(found), resolution_options=tuple(options),
        corrected_workflow=top.workflow if top else None, workflow_diff=top.diff if top else None,
        blocked=tuple(n for n in state.steps if n in _descendants(ctx.spec, step)),
        attempts=max(len(ctx.attempts), 1), run_id=state.run_id)


def _ancestors(spec, step: str) -> list[str]:
    found: list[str] = []
    frontier = list(spec.step(step).needs)
    while frontier:
        name = frontier.pop(0)
        if name not in found:
            found.append(name)
            frontier += list(spec.step(name).needs)
    return [s.name for s in spec.steps if s.name in found]


def _descendants(spec, step: str) -> set[str]:
    found: set[str] = set()
    frontier = {step}
    while frontier:
        frontier = {s.name for s in spec.steps if set(s.needs) & frontier and s.name not in found}
        found |= frontier
    return found


def _location(ctx) -> dict[str, Any] | None:
    from nbflow.tracebacks import cell_name

    frames = [f for f in ctx.evid.get("frames") or [] if f[4]]
    if frames:
        filename, line, function, code, _ = frames[-1]
        if function in _COMPREHENSIONS and len(frames) > 1 and frames[-2][0] == filename:
            function = frames[-2][2]  # a comprehension is part of the function that holds it
        cell = cell_name(filename)
        where = f"{cell}, line {line}" if cell else f"{filename}:{line}"
        # the event was named while the exception was live, in the kernel that ran it
        if ctx.error.get("location") and cell in (None, "a notebook cell"):
            where = ctx.error["location"]
        return {"where": where, "file": filename, "line": line, "function": function, "code": code}
    if ctx.error.get("location"):
        return {"where": ctx.error["location"], "code": ctx.error.get("source_line") or ""}
    if ctx.is_memory and ctx.kind != "step" and ctx.func is not None:
        # the budget tripped between the function's lines (in the engine or a library it called):
        # the step's function is still the code that held the memory
        return _defined_at(ctx.func)
    return None


def _defined_at(func) -> dict[str, Any] | None:
    import inspect
    import linecache

    from nbflow.tracebacks import cell_name

    code = getattr(inspect.unwrap(func), "__code__", None)
    if code is None:
        return None
    filename, line = code.co_filename, code.co_firstlineno
    text = linecache.getline(filename, line).strip()
    while text.startswith("@"):  # the decorators: show the def
        line += 1
        text = linecache.getline(filename, line).strip()
    cell = cell_name(filename)
    return {"where": f"{cell}, line {line}" if cell else f"{filename}:{line}", "file": filename,
            "line": line, "function": code.co_name, "code": text,
            "note": "the budget tripped outside this function's own lines; it is the step's function"}


def _where(filename: str, line: int) -> str:
    from nbflow.tracebacks import cell_name

    cell = cell_name(filename)
    return f"{cell}, line {line}" if cell else f"{filename}:{line}"


def _package(filename: str) -> str:
    path = filename.replace("\\", "/")
    if "/nbflow/" in path and "site-packages" not in path:
        return "nbflow"
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            return path.split(marker, 1)[1].split("/", 1)[0]
    return "python"


def _stack(ctx) -> dict[str, Any]:
    frames = ctx.evid.get("frames") or []
    if not frames:
        return {"frames": [], "library_frames": 0, "folded": {}}
    user = [{"where": _where(f[0], f[1]), "function": f[2], "code": f[3]} for f in frames if f[4]]
    folded: dict[str, int] = {}
    for f in frames:
        if not f[4]:
            folded[_package(f[0])] = folded.get(_package(f[0]), 0) + 1
    return {"frames": user, "library_frames": sum(folded.values()),
            "folded": dict(sorted(folded.items(), key=lambda kv: -kv[1]))}


def _memory_stats(ctx) -> dict[str, Any]:
    memory = ctx.memory
    if not memory and not ctx.samples:
        return {}
    baseline = memory.get("baseline")
    stats: dict[str, Any] = {
        "baseline": baseline, "peak": memory.get("peak"),
        "peak_above_baseline": ctx.details.get("peak") or memory.get("peak_above_baseline"),
        "budget": ctx.budget, "at_failure": memory.get("at_failure"),
        "at_failure_above_baseline": (memory["at_failure"] - baseline
                                      if memory.get("at_failure") and baseline else None),
        "tripped": bool(memory.get("tripped")), "samples": len(ctx.samples) or memory.get("samples"),
    }
    if len(ctx.samples) >= 2:
        (t0, r0), (t1, _) = ctx.samples[0], ctx.samples[-1]
        t_peak, r_peak = max(ctx.samples, key=lambda s: s[1])
        stats["seconds"] = round(t1 - t0, 2)
        if t_peak > t0:
            stats["growth_per_second"] = int((r_peak - r0) / (t_peak - t0))
    stats["human"] = {k: format_size(v) for k, v in stats.items()
                      if isinstance(v, int) and not isinstance(v, bool) and k not in ("samples",)}
    return stats


def _input(ctx, model) -> dict[str, Any]:
    out: dict[str, Any] = {"records": ctx.rec.records_in, "chunk_size": ctx.rec.chunk_size,
                           "streaming": ctx.rec.streaming}
    if ctx.inputs:
        facts = list(ctx.inputs.values())
        out.update(bytes=sum(f["bytes"] for f in facts), chunks=sum(f["chunks"] for f in facts),
                   records_per_chunk=max(f["chunk_records"]["max"] for f in facts),
                   bytes_per_record_in_memory=facts[0].get("bytes_per_record"))
        out["inputs"] = {k: {kk: vv for kk, vv in v.items() if kk != "rows_per_chunk"}
                         for k, v in ctx.inputs.items()}
    elif ctx.step_spec.params.get("path") is not None:
        out["path"] = str(ctx.step_spec.params.get("path"))
    if model is not None:
        out["chunks_in_flight"] = model.in_flight if ctx.mode != "in-memory" else 1
    if ctx.probe:
        out["probe"] = {k: v for k, v in ctx.probe.items() if k != "tables"}
    return out


def _summary(ctx, model) -> str:
    step, cls = ctx.step, ctx.error_class
    n = ctx.rec.records_in
    how = ""
    if ctx.mode == "in-memory":
        how = f" with all {records(n)} records in memory at once"
    elif ctx.mode == "chunked" and model is not None and model.n_failed:
        how = f" in chunks of up to {records(model.n_failed)} records, {model.in_flight} at a time"
    memory = ctx.memory
    if cls == "MemoryBudgetExceeded":
        peak = ctx.details.get("peak") or memory.get("peak_above_baseline")
        text = (f"{step} used {format_size(peak)} above its baseline, over its "
                f"{format_size(ctx.budget)} budget,{how}") if how else (
                f"{step} used {format_size(peak)} above its baseline, over its {format_size(ctx.budget)} budget")
    elif cls == "MemoryError":
        alloc = ctx.evid.get("allocation")
        text = (f"{step} could not allocate {format_size(alloc['bytes'])}{how}" if alloc
                else f"{step} ran out of memory{how}")
    elif cls == "SchemaError":
        problems = ctx.details.get("problems") or []
        text = f"{step}: the data does not match the schema ({len(problems)} problem{'s' if len(problems) != 1 else ''})"
    elif cls == "InputNotFound":
        text = f"{step}: the input '{ctx.step_spec.params.get('path')}' does not exist"
    elif ctx.evid.get("key_error"):
        where = (_location(ctx) or {}).get("function") or ctx.function
        text = f"{step}: {where}() asked for column {ctx.evid['key_error']['key']!r}, which the data lacks"
    else:
        first = (str(ctx.error.get("message") or "").strip().splitlines() or [""])[0]
        text = f"{step} failed: {cls}: {first}"
    if len(ctx.attempts) > 1:
        text += f" (all {len(ctx.attempts)} attempts)"
    return text


def diagnose_interrupted(state: RunState, spec=None) -> RootCause | None:
    """A cancelled run has no failed step: say what was cancelled, what is kept, and how to go on."""
    cancelled = [n for n, r in state.steps.items() if r.status is Status.CANCELLED]
    if not cancelled:
        return None
    running = [n for n in cancelled if state.steps[n].started is not None] or cancelled[:1]
    kept = [n for n, r in state.steps.items() if r.status.done]
    step = running[0]
    rec = state.steps[step]
    progress = (f" after {rec.chunks_done} of {rec.chunks_total} chunks ({rec.records_done:,} records)"
                if rec.chunks_total else "")
    factors = [Factor("cancelled", f"cancelled while {', '.join(running)} ran{progress}; "
                      "no checkpoint is written for an unfinished step",
                      {"running": running, "cancelled": cancelled, "chunks_done": rec.chunks_done,
                       "chunks_total": rec.chunks_total, "records_done": rec.records_done})]
    if kept:
        factors.append(Factor("kept", f"kept: {', '.join(kept)} (completed; a rerun reuses "
                              f"{'it' if len(kept) == 1 else 'them'})",
                              {"kept": kept}))
    text = getattr(spec, "text", None)
    fix = Fix(title="Rerun: continue from the kept steps", kind="rerun", snippet="run.rerun()",
              estimate=(f"reuses {', '.join(kept)}; runs {', '.join(cancelled)}" if kept
                        else f"runs {', '.join(cancelled)}"),
              confidence=0.9, step=step, workflow=text, diff="" if text is not None else None)
    return RootCause(step=step, error_type="RunInterrupted",
                     message=f"run {state.run_id} was cancelled ({', '.join(cancelled)} did not finish)",
                     summary=f"the run was cancelled while {', '.join(running)} ran{progress}",
                     processing_mode="", upstream_status={n: state.steps[n].status.value for n in kept},
                     contributing_factors=tuple(factors), resolution_options=(fix,),
                     corrected_workflow=text, workflow_diff="" if text is not None else None,
                     run_id=state.run_id, attempts=rec.attempt or 1)


def minimal(state: RunState, step: str, note: str = "") -> RootCause:
    """The failure as recorded, without analysis: what a diagnosis falls back to if it breaks."""
    rec = state.steps.get(step)
    error = (rec.error if rec is not None else None) or {}
    location = None
    if error.get("location"):
        location = {"where": error["location"], "code": error.get("source_line") or ""}
    factors = (Factor("diagnosis-failed", note, {}),) if note else ()
    return RootCause(step=step, error_type=str(error.get("error_type") or "unknown"),
                     message=str(error.get("message") or ""),
                     summary=f"{step} failed: {error.get('error_type')}", location=location,
                     contributing_factors=factors, run_id=state.run_id,
                     attempts=(rec.attempt if rec is not None else 1) or 1)


def _lines(text: str) -> list[str]:
    return [line if line.endswith("\n") else line + "\n" for line in text.splitlines(True)]


def corrected(spec, edits: list[tuple], *, overrides: Mapping[str, Any] | None = None,
              namespace: Mapping[str, Any] | None = None) -> tuple[str, str] | None:
    """Apply text edits to the workflow; (corrected text, unified diff), or None if it won't parse.

    ``edits``: ("setting", step, key, value) | ("replace", path, value) |
    ("set_key", path, key, value) | ("rename_key", path, old, new).
    """
    from nbflow import yamledit
    from nbflow.spec import parse

    text = spec.text
    try:
        for edit in edits:
            op, *args = edit
            if op == "setting":
                text = yamledit.set_step_setting(text, *args)
            elif op == "replace":
                text = yamledit.replace(text, *args)
            elif op == "set_key":
                text = yamledit.set_key(text, *args)
            elif op == "rename_key":
                text = yamledit.rename_key(text, *args)
        parse(text, filename=spec.filename, overrides=overrides, namespace=namespace)
    except Exception:  # an edit that does not fit this text: offer the fix without a workflow
        return None
    diff = "".join(difflib.unified_diff(_lines(spec.text), _lines(text),
                                        fromfile=spec.filename, tofile=f"{spec.filename} (fixed)"))
    return text, diff


__all__ = ["Factor", "Fix", "RootCause", "corrected", "diagnose_interrupted", "diagnose_step",
           "evidence", "minimal", "nice_down", "nice_size_up", "render_html", "render_json",
           "render_text"]
