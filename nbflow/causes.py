"""The evidence around a failed step, and the rules that name its causes.

``Context.collect`` gathers what a diagnosis may use (records, the failure event,
memory samples, input facts, a probe, the previous successful run); ``factors``
runs every rule and keeps those whose evidence is there, each stating its numbers.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from nbflow import evidence
from nbflow.diagnose import PROBE_ROWS, Factor, records
from nbflow.memorymodel import DATA_COPIES, MemoryModel
from nbflow.state import RunState, StepRecord
from nbflow.units import format_size

MEMORY_ERRORS = ("MemoryBudgetExceeded", "MemoryError")
DEFAULT_CHUNK = 100_000


@dataclass
class Context:
    run_id: str
    step: str
    spec: Any  # WorkflowSpec
    step_spec: Any  # StepSpec
    state: RunState
    rec: StepRecord
    error: dict
    details: dict
    evid: dict
    error_class: str
    mode: str  # in-memory | chunked | streaming
    kind: str  # chunk | whole | step
    function: str
    params: dict
    inputs: dict
    samples: list = field(default_factory=list)  # (time, rss) while the step ran
    attempts: list = field(default_factory=list)  # the step's StepFailed events this attempt
    previous: dict | None = None
    probe: dict | None = None
    parallel: int = 2
    available: int | None = None
    overrides: dict = field(default_factory=dict)
    namespace: Mapping[str, Any] | None = None
    func: Callable | None = None  # the step's function, when it resolves

    @property
    def memory(self) -> dict:
        return self.details.get("memory") or {}

    @property
    def budget(self) -> int | None:
        return self.details.get("budget") or self.memory.get("budget") or self.rec.max_memory

    @property
    def is_memory(self) -> bool:
        return self.error_class in MEMORY_ERRORS or self.error.get("error_type") in MEMORY_ERRORS

    def line(self, key: str) -> str:
        """``workflow.yaml line 19`` for a step setting or param, or where it came from."""
        lines = self.step_spec.lines
        number = lines.get(key) or lines.get(f"params.{key}")
        if number:
            return f"{self.spec.filename} line {number}"
        return "from defaults:" if key in (self.spec.defaults or {}) else "the engine default"

    @classmethod
    def collect(cls, run, step: str, *, probe: bool = True) -> Context:
        state, spec = run.state, run.spec
        rec = state.steps[step]
        error = dict(rec.error or {})
        details = dict(error.get("details") or {})
        evid = dict(details.get("evidence") or {})
        step_spec = spec.step(step)
        func, kind, function, params, streaming = _action(run, step_spec)
        if rec.streaming is not None:
            streaming = rec.streaming
        mode = ("streaming" if kind == "step" else "in-memory" if streaming is False
                else "chunked" if kind == "chunk" else "streaming")
        checkpoints = {n: state.steps[n].checkpoint for n in step_spec.needs if n in state.steps}
        ctx = cls(run_id=state.run_id, step=step, spec=spec, step_spec=step_spec, state=state, rec=rec,
                  error=error, details=details, evid=evid,
                  error_class=evid.get("error_class") or str(error.get("error_type") or ""),
                  mode=mode, kind=kind, function=function, params=params,
                  inputs=_quietly(lambda: evidence.input_facts(checkpoints), {}),
                  overrides=dict(getattr(run, "overrides", {}) or {}),
                  namespace=getattr(run, "namespace", None), func=func)
        ctx.samples = _quietly(lambda: _samples(run, rec, step), [])
        ctx.attempts = _quietly(lambda: _attempts(run, step), [])
        ctx.previous = _quietly(lambda: _previous_success(run, step), None)
        ctx.parallel = _parallelism(getattr(run, "backend", None))
        ctx.available = _quietly(_available, None)
        if probe and ctx.is_memory and func is not None and kind in ("chunk", "whole") \
                and (kind == "chunk" or mode == "in-memory") and checkpoints:
            files = evidence.checkpoint_files(next(iter(checkpoints.values())))
            sample = _quietly(lambda: evidence.read_sample(files, PROBE_ROWS[1]), None)
            if sample is not None:
                ctx.probe = evidence.probe(func, params, sample, PROBE_ROWS)
        return ctx


def _quietly(fn: Callable, default):
    try:
        return fn()
    except Exception:  # one missing measurement must not cost the whole diagnosis
        return default


def _action(run, step_spec) -> tuple:
    """(function, kind, name, params, streaming) of the step, from the live plan when there is one."""
    from nbflow.plan import TRANSFORMS, resolve_step_action

    planned = run.plan.steps.get(step_spec.name) if getattr(run, "plan", None) is not None else None
    if planned is not None:
        return (planned.action.func, planned.action.kind, planned.action.name, dict(planned.params),
                planned.streaming)
    try:
        action, params, forced = resolve_step_action(step_spec, getattr(run, "namespace", None))
        streaming = forced if forced is not None else (
            step_spec.streaming if step_spec.streaming is not None else action.streaming)
        return action.func, action.kind, action.name, params, streaming
    except Exception:  # a notebook function after a restart: describe it from the spec alone
        name = step_spec.params.get("function") if step_spec.action in TRANSFORMS else step_spec.action
        kind = "step" if str(step_spec.action).startswith("data.") and name == step_spec.action else "chunk"
        return None, kind, str(name), dict(step_spec.params), step_spec.streaming


def _samples(run, rec: StepRecord, step: str) -> list[tuple[float, int]]:
    start, end = rec.started or 0, rec.ended or time.time()
    return [(s.time, s.rss) for s in run.run_dir.read_memory()
            if start <= s.time <= end and step in s.steps]


def _attempts(run, step: str) -> list[dict]:
    from nbflow import events as ev

    found: list[dict] = []
    for event in run.run_dir.read_events():
        if isinstance(event, ev.RunStarted):
            found = []
        elif isinstance(event, ev.StepFailed) and event.step == step:
            found.append({"attempt": event.attempt, "error_type": event.error_type,
                          "message": event.message, "time": event.time, "duration": event.duration})
    return found


def _previous_success(run, step: str, limit: int = 50) -> dict | None:
    """The latest other run of this workflow in which ``step`` completed."""
    from nbflow.store import RunStore

    store = RunStore(run.run_dir.path.parent.parent)
    workflow = run.state.workflow
    for summary in list(reversed(store.summaries()))[:limit]:
        if summary["workflow"] != workflow or summary["run_id"] == run.run_id:
            continue
        data = store.open(summary["run_id"]).read_run()
        rec = (data.get("steps") or {}).get(step) or {}
        if rec.get("status") == "completed" and rec.get("records_in") is not None:
            memory = (rec.get("info") or {}).get("memory") or {}
            return {"run_id": summary["run_id"], "records_in": rec["records_in"],
                    "peak": memory.get("peak_above_baseline"), "ended": rec.get("ended"),
                    "chunk_size": rec.get("chunk_size"), "streaming": rec.get("streaming")}
    return None


def _parallelism(backend) -> int:
    value = getattr(backend, "parallelism", None)
    if isinstance(value, int) and value > 0:
        return value
    return os.cpu_count() or 2


def _available() -> int:
    from nbflow.engine.limits import available_memory

    return available_memory()


# -- the rules -------------------------------------------------------------------------------

def factors(ctx: Context, model: MemoryModel | None) -> list[Factor]:
    found: list[Factor] = []
    for rule in (_in_memory, _input_too_large, _chunk_too_large, _allocation, _objects, _copies,
                 _skew, _more_records, _schema, _missing_input, _dtype_drift, _ragged_line, _missing_column,
                 _parameter_type, _retries):
        result = _quietly(lambda rule=rule: rule(ctx, model), None)
        if isinstance(result, Factor):
            found.append(result)
        elif result:
            found.extend(result)
    return found


def _in_memory(ctx: Context, model) -> Factor | None:
    if not ctx.is_memory:
        return None
    n = ctx.rec.records_in
    if ctx.mode == "in-memory":
        parts = sum(f["chunks"] for f in ctx.inputs.values())
        return Factor("in-memory", f"streaming: false ({ctx.line('streaming')}): all {records(n)} records"
                      f"{f' ({parts} chunks)' if parts else ''} were concatenated into one DataFrame "
                      f"before {ctx.function} ran", {"streaming": False, "records": n, "chunks": parts})
    if ctx.kind == "whole":
        return Factor("whole-collection", f"{ctx.function} is a whole-collection action (kind='whole'): "
                      f"it gets all {records(n)} records at once, not chunk by chunk",
                      {"kind": "whole", "records": n})
    return None


def _input_too_large(ctx: Context, model: MemoryModel | None) -> Factor | None:
    if model is None or ctx.mode != "in-memory" or not model.budget:
        return None
    need = model.in_memory()
    if need <= model.budget:
        return None
    per = model.per_record(model.records)
    data = need - model.cost(model.records)
    return Factor("input-exceeds-budget",
                  f"the input is too large to process in memory: {records(model.records)} records × "
                  f"~{per:,.0f} B/record ({model.source}) + {format_size(data)} for the data itself "
                  f"(input and output, {DATA_COPIES} copies) ≈ {format_size(need)}, "
                  f"{need / model.budget:.1f}× the {format_size(model.budget)} budget",
                  {"records": model.records, "bytes_per_record": round(per, 1), "input_bytes_per_record":
                   model.b_in, "estimate": int(need), "budget": model.budget, "source": model.source})


def _chunk_too_large(ctx: Context, model: MemoryModel | None) -> Factor | None:
    if model is None or ctx.mode != "chunked" or not model.budget or not model.n_failed:
        return None
    n = model.n_failed
    per_chunk = model.chunked(n) / model.in_flight
    chunk = ctx.rec.chunk_size
    return Factor("chunk-too-large",
                  f"a chunk of {records(n)} records (chunk_size: {records(chunk)}, {ctx.line('chunk_size')}) "
                  f"needs ~{format_size(per_chunk)} ({model.source}); {model.in_flight} in flight "
                  f"≈ {format_size(per_chunk * model.in_flight)} against the {format_size(model.budget)} budget",
                  {"chunk_size": chunk, "records_per_chunk": n, "peak_per_chunk": int(per_chunk),
                   "chunks_in_flight": model.in_flight, "budget": model.budget, "source": model.source})


def _allocation(ctx: Context, model) -> Factor | None:
    alloc = ctx.evid.get("allocation")
    if not alloc:
        return None
    dims = " × ".join(f"{d:,}" for d in alloc["shape"])
    grows = ""
    if model is not None and model.n_failed and not model.lower_bound and model.k >= 1:
        power = {1: "", 2: " with the square of", 3: " with the cube of"}.get(int(model.k), " with")
        grows = f"; it grows{power or ' with'} the {records(model.n_failed)} records in memory"
    free = f"; {format_size(ctx.available)} is available" if ctx.available else ""
    return Factor("allocation-failed", f"an array of {dims} {alloc['dtype']} "
                  f"({format_size(alloc['bytes'])}) could not be allocated{grows}{free}",
                  {**alloc, "available": ctx.available})


def _tables(ctx: Context) -> dict:
    return (ctx.probe or {}).get("tables") or ctx.evid.get("tables") or {}


def _objects(ctx: Context, model) -> list[Factor]:
    found = []
    tables = _tables(ctx)
    for column, info in (tables.get("object_columns") or {}).items():
        held, arrow = info["object_bytes_per_record"], info["arrow_bytes_per_record"]
        if held < 1.3 * arrow:
            continue
        found.append(Factor("object-dtype", f"column '{column}' is held as Python objects in "
                            f"{tables.get('function', ctx.function)}: {held:,.0f} B/record vs {arrow:,.0f} "
                            f"B/record Arrow-backed ({held / arrow:.1f}×), in {info['frames']} DataFrame(s) "
                            f"alive at once", {"column": column, **info}))
    return found


def _copies(ctx: Context, model) -> Factor | None:
    tables = _tables(ctx)
    holders = {k: v for k, v in (tables.get("holders") or {}).items() if v >= 3}
    if not ctx.is_memory or not holders:
        return None
    name, count = max(holders.items(), key=lambda kv: kv[1])
    return Factor("copies-alive", f"{tables.get('function', ctx.function)} keeps {tables['frames']} "
                  f"DataFrames of its input alive at once ({count} in '{name}'): its memory grows with "
                  "every copy", {"frames": tables["frames"], "holder": name, "count": count})


def _skew(ctx: Context, model) -> Factor | None:
    if not ctx.is_memory:
        return None
    for step, facts in ctx.inputs.items():
        sizes = facts.get("chunk_records") or {}
        if sizes and sizes["median"] and sizes["max"] >= 3 * sizes["median"]:
            rows = facts.get("rows_per_chunk") or []
            biggest = rows.index(sizes["max"]) if sizes["max"] in rows else None
            failed = ctx.details.get("chunk")
            at = f"; the step failed in chunk {failed}" if failed is not None else ""
            return Factor("skewed-chunks", f"{step}'s chunks are uneven: chunk {biggest} holds "
                          f"{sizes['max']:,} records, {sizes['max'] / sizes['median']:.0f}× the median "
                          f"{sizes['median']:,}{at}",
                          {"input": step, "largest_chunk": biggest, "max": sizes["max"],
                           "median": sizes["median"], "failed_chunk": failed})
    return None


def _more_records(ctx: Context, model) -> Factor | None:
    prev, now = ctx.previous, ctx.rec.records_in
    if not prev or not now or now < 1.5 * prev["records_in"]:
        return None
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(prev["ended"])) if prev.get("ended") else "earlier"
    peak = f", peaking at {format_size(prev['peak'])}" if prev.get("peak") else ""
    return Factor("more-records", f"{records(now)} records now vs {records(prev['records_in'])} when run "
                  f"{prev['run_id']} completed this step ({when}{peak}): "
                  f"{now / prev['records_in']:.1f}× the records",
                  {"records": now, "previous_records": prev["records_in"], "previous_run": prev["run_id"],
                   "previous_peak": prev.get("peak")})


def _schema(ctx: Context, model) -> list[Factor]:
    found = []
    total = ctx.details.get("records")
    for p in ctx.details.get("problems") or []:
        if p["kind"] == "missing":
            near = f" (closest: {', '.join(map(repr, p['examples']))})" if p.get("examples") else ""
            text = f"column '{p['column']}' is missing from the data{near}"
        elif p["kind"] == "nulls":
            text = (f"column '{p['column']}': {p['count']:,} of {records(total)} records are empty, "
                    "but the schema says nullable: false")
        else:
            shown = ", ".join(map(repr, p.get("examples") or []))
            text = (f"column '{p['column']}': expected {p['expected']}, found {p['found']} — "
                    f"{p['count']:,} of {records(total)} records don't fit" + (f" (e.g. {shown})" if shown else ""))
        found.append(Factor("schema-mismatch", text, {**p, "records": total}))
    return found


def _missing_input(ctx: Context, model) -> Factor | None:
    if ctx.error_class != "InputNotFound" and ctx.error.get("error_type") != "InputNotFound":
        return None
    near = ctx.details.get("near") or []
    close = f"; nearest existing: {', '.join(near)}" if near else "; nothing with a similar name is there"
    return Factor("missing-input", f"no file matches '{ctx.step_spec.params.get('path')}' "
                  f"({ctx.details.get('path')}){close}", {"path": ctx.details.get("path"), "near": near})


def _dtype_drift(ctx: Context, model) -> Factor | None:
    """A column read as one dtype from the file's first rows holds other values further on."""
    column = ctx.details.get("column")
    if ctx.step_spec.action != "data.extract" or not column or "expected" not in ctx.details:
        return None
    offset = ctx.details.get("offset") or 0
    return Factor("dtype-drift",
                  f"column '{column}' was read as {ctx.details['expected']} from the first rows of "
                  f"{ctx.details.get('path')}; from byte {offset:,} on it has {ctx.details.get('found')}",
                  {k: ctx.details.get(k) for k in ("column", "expected", "found", "offset", "path")})


def _ragged_line(ctx: Context, model) -> Factor | None:
    """A line of the input with more or fewer fields than its header."""
    if ctx.step_spec.action != "data.extract" or not {"line", "text", "expected"} <= set(ctx.details):
        return None
    d = ctx.details
    return Factor("ragged-line", f"line {d['line']:,} of {d.get('path')} has {d.get('found')} fields where "
                  f"the header has {d.get('expected')}: {d['text'][:120]!r}",
                  {k: d.get(k) for k in ("path", "line", "expected", "found", "text")})


def _missing_column(ctx: Context, model) -> Factor | None:
    info = ctx.evid.get("key_error")
    if not info or not info.get("columns"):
        return None
    name, columns = next(iter(info["columns"].items()))
    close = f" (closest: '{info['close'][0]}')" if info.get("close") else ""
    return Factor("missing-column", f"column {info['key']!r} is not in '{name}', which has "
                  f"{', '.join(columns[:12])}{'…' if len(columns) > 12 else ''}{close}",
                  {"key": info["key"], "frame": name, "columns": columns, "close": info.get("close") or []})


def numeric_text(value: Any) -> int | float | bool | None:
    """The number (or boolean) a quoted parameter was meant to be, else None."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            continue
    return None


def parameter_types(ctx: Context) -> list[dict]:
    """Step params that reached the failing code as text although they read as numbers."""
    if ctx.error_class not in ("TypeError", "ValueError") and "TypeError" not in ctx.error_class:
        return []
    seen: dict[str, dict] = {}
    for frame in ctx.evid.get("arguments") or []:
        for name, arg in frame["arguments"].items():
            value = ctx.step_spec.params.get(name)
            if arg["type"] == "str" and numeric_text(value) is not None and name not in seen:
                seen[name] = {"param": name, "value": value, "meant": numeric_text(value),
                              "function": frame["function"], "where": frame["where"]}
    return list(seen.values())


def _parameter_type(ctx: Context, model) -> list[Factor]:
    found = []
    for p in parameter_types(ctx):
        found.append(Factor("parameter-type", f"parameter '{p['param']}' is the text {p['value']!r} "
                            f"({ctx.line(p['param'])}), and {p['function']}() can't use text there: "
                            f"{ctx.error_class}: {_first_line(ctx.error.get('message'))}",
                            {**p, "type": "str", "error": ctx.error_class}))
    return found


def _retries(ctx: Context, model) -> Factor | None:
    attempts = ctx.attempts
    if ctx.step_spec.retries <= 0 or len(attempts) < 2:
        return None
    kinds = {(a["error_type"], a["message"]) for a in attempts}
    span = attempts[-1]["time"] - attempts[0]["time"] + attempts[0].get("duration", 0)
    same = len(kinds) == 1
    what = (f"each with the same {attempts[0]['error_type']}: {_first_line(attempts[0]['message'])}"
            if same else "with " + "; ".join(sorted({a["error_type"] for a in attempts})))
    return Factor("retries-exhausted", f"retries exhausted: {len(attempts)} attempts (retries: "
                  f"{ctx.step_spec.retries}) failed in {span:.1f} s, {what}",
                  {"attempts": len(attempts), "retries": ctx.step_spec.retries, "same_error": same,
                   "errors": [f"{a['error_type']}: {_first_line(a['message'])}" for a in attempts],
                   "seconds": round(span, 2)})


def _first_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0] if lines else ""


__all__ = ["Context", "factors", "numeric_text", "parameter_types"]
