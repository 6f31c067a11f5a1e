"""Resolution options for a diagnosed failure, each a concrete change with a computed estimate.

A fix that changes the workflow carries the corrected text (edited in place,
so only the lines that change differ) and its diff; a fix to the user's code
names the line and the change. Options are ranked by expected success.
"""
from __future__ import annotations

from typing import Any

from nbflow import yamledit
from nbflow.causes import DEFAULT_CHUNK, Context, parameter_types
from nbflow.diagnose import TARGET, Fix, corrected, nice_size_up, records
from nbflow.memorymodel import MemoryModel
from nbflow.units import format_size, parse_size

_SCHEMA_DTYPES = {"str": "string", "string": "string", "object": "string", "float64": "float64",
                  "float32": "float64", "int64": "int64", "int32": "int64", "bool": "bool",
                  "category": "category"}
_NUMERIC = ("int64", "int32", "int", "float64", "float")


def options(ctx: Context, model: MemoryModel | None) -> list[Fix]:
    found: list[Fix] = []
    for build in (_memory, _schema, _missing_input, _read_dtype, _bad_lines, _missing_column,
                  _parameter_type, _retries):
        try:
            found.extend(build(ctx, model) or [])
        except Exception:  # one broken builder must not cost the others
            continue
    if not found and ctx.error.get("location") and ctx.error_class not in ("RunInterrupted",):
        found.append(_at_location(ctx, 0.4, f"fix the {ctx.error_class} where it is raised"))
    return sorted(found, key=lambda f: -f.confidence)


def _fix(ctx: Context, edits: list[tuple] | None, *, overrides: dict | None = None, **fields) -> Fix:
    """A Fix, with the corrected workflow and its diff when ``edits`` apply cleanly."""
    workflow = diff = None
    if edits is not None:
        result = corrected(ctx.spec, edits, overrides={**ctx.overrides, **(overrides or {})},
                           namespace=ctx.namespace)
        if result is not None:
            workflow, diff = result
            changed = [line[1:].strip() for line in diff.splitlines()
                       if line.startswith("+") and not line.startswith("+++")]
            if changed and not fields.get("snippet"):
                fields["snippet"] = "\n".join(changed)
    fields.setdefault("snippet", "")
    return Fix(step=fields.pop("step", ctx.step), workflow=workflow, diff=diff,
               overrides=dict(overrides or {}), **fields)


def _at_location(ctx: Context, confidence: float, what: str) -> Fix:
    where = ctx.error.get("location") or "?"
    code = ctx.error.get("source_line") or ""
    return _fix(ctx, None, title=f"Fix what raises it at {where}", kind="code",
                snippet=code, estimate=what, confidence=confidence)


# -- memory -----------------------------------------------------------------------------------

def _memory(ctx: Context, model: MemoryModel | None) -> list[Fix]:
    if model is None or not model.budget:
        return []
    budget = model.budget
    found = []
    chunkable = ctx.kind == "chunk" and ctx.mode in ("in-memory", "chunked")
    current = ctx.rec.chunk_size or DEFAULT_CHUNK
    size = model.chunk_for(TARGET) if chunkable else None
    if size:
        peak = model.chunked(size)
        change: dict[str, Any] = {"chunk_size": size}
        if ctx.mode == "in-memory":
            change = {"streaming": True, "chunk_size": size}
        piece = min(size, model.part) if model.part else size
        found.append(_fix(
            ctx, [("setting", ctx.step, k, v) for k, v in change.items()], change=change,
            title=(f"Stream it in chunks of {size:,} records" if ctx.mode == "in-memory"
                   else f"Use chunks of {size:,} records"),
            kind="settings", estimated_peak=int(peak),
            estimate=(f"est. peak {format_size(peak)} of the {format_size(budget)} budget "
                      f"({peak / budget:.0%}): {model.in_flight} chunk(s) in flight × {piece:,} records × "
                      f"~{model.per_record(piece):,.0f} B/record ({model.source}), plus their data"),
            confidence=0.9 if not model.lower_bound else 0.65))
    if chunkable and ctx.mode == "in-memory" and (not size or size < min(current, model.part or current)):
        peak = model.chunked(current)
        share = peak / budget
        found.append(_fix(
            ctx, [("setting", ctx.step, "streaming", True)], change={"streaming": True},
            title=f"Stream it with the current chunk_size ({current:,})", kind="settings",
            estimated_peak=int(peak),
            estimate=f"est. peak {format_size(peak)} of the {format_size(budget)} budget ({share:.0%})",
            confidence=0.8 if share <= TARGET else 0.55 if share <= 0.85 else 0.25 if share <= 1 else 0.05))
    need = model.in_memory() if ctx.mode == "in-memory" else model.chunked(current)
    if need > 0:
        value = nice_size_up(need * 1.25)
        fits = ctx.available is None or parse_size(value) <= ctx.available
        free = f"; {format_size(ctx.available)} available now" if ctx.available else ""
        bound = "at least " if model.lower_bound else ""
        found.append(_fix(
            ctx, [("setting", ctx.step, "max_memory", value)], change={"max_memory": value},
            title=f"Raise its budget to run as is: max_memory: {value}", kind="settings",
            estimated_peak=int(need),
            estimate=(f"needs {bound}~{format_size(need)} ({model.source}){free}"
                      + ("" if fits else " — more than this machine has")),
            confidence=(0.45 if model.lower_bound else 0.6) if fits else 0.05))
    found += _dtype_fixes(ctx, model, need)
    return found


def _dtype_fixes(ctx: Context, model: MemoryModel, need: float) -> list[Fix]:
    tables = (ctx.probe or {}).get("tables") or ctx.evid.get("tables") or {}
    function = tables.get("function", ctx.function)
    found = []
    n = model.records if ctx.mode == "in-memory" else (model.n_failed or 0) * model.in_flight
    for column, info in (tables.get("object_columns") or {}).items():
        held, arrow = info["object_bytes_per_record"], info["arrow_bytes_per_record"]
        if held < 1.3 * arrow:
            continue
        saved = (held - arrow) * info["frames"] * (n or 0)
        after = max(need - saved, 0)
        found.append(_fix(
            ctx, None, title=f"Keep '{column}' as Arrow-backed strings in {function}", kind="code",
            snippet=f'{function}: .astype("string") rather than .astype(object) for \'{column}\'',
            estimate=(f"saves ~{held - arrow:,.0f} B/record in each of {info['frames']} frames: est. need "
                      f"{format_size(need)} → {format_size(after)} (budget {format_size(model.budget)})"),
            estimated_peak=int(after), confidence=0.45 if after <= 0.9 * model.budget else 0.2))
    holders = {k: v for k, v in (tables.get("holders") or {}).items() if v >= 3}
    if holders:
        name, count = max(holders.items(), key=lambda kv: kv[1])
        frames = tables["frames"]
        after = need * 2 / frames
        found.append(_fix(
            ctx, None, title=f"Don't keep every intermediate DataFrame in '{name}'", kind="code",
            snippet=f"{function}: keep only the latest frame instead of {count} in '{name}'",
            estimate=(f"{frames} copies alive → 2: est. need {format_size(need)} → ~{format_size(after)} "
                      f"(budget {format_size(model.budget)})"),
            estimated_peak=int(after), confidence=0.35 if after <= 0.9 * model.budget else 0.15))
    return found


# -- data and parameters -------------------------------------------------------------------

def _step_path(ctx: Context, step: str, *rest) -> tuple | None:
    index = yamledit.step_index(ctx.spec.text, step)
    return None if index is None else ("steps", index, *rest)


def _extract_ancestor(ctx: Context) -> str | None:
    frontier = list(ctx.step_spec.needs)
    while frontier:
        name = frontier.pop(0)
        spec = ctx.spec.step(name)
        if spec.action == "data.extract":
            return name
        frontier += list(spec.needs)
    return None


def _schema(ctx: Context, model) -> list[Fix]:
    problems = ctx.details.get("problems") or []
    if not problems:
        return []
    found = []
    schema = ctx.step_spec.params.get("schema") or {}
    words = sorted({str(e) for p in problems if p["kind"] == "dtype" and p["expected"] in _NUMERIC
                    for e in p.get("examples") or [] if isinstance(e, str)})
    source = _extract_ancestor(ctx)
    if words and source:
        columns = [p["column"] for p in problems if p["kind"] == "dtype" and p["expected"] in _NUMERIC]
        nullable = all(_rule(schema, c).get("nullable", True) for c in columns)
        count = sum(p["count"] for p in problems if p["column"] in columns and p["kind"] == "dtype")
        path = _step_path(ctx, source, "params")
        found.append(_fix(
            ctx, [("set_key", path, "na_values", words)] if path else None, step=source,
            change={"na_values": words}, kind="parameters",
            title=f"Read {', '.join(map(repr, words))} as empty in {source}",
            estimate=(f"the {count:,} records with {', '.join(map(repr, words))} in "
                      f"{', '.join(columns)} become empty"
                      + (", which the schema allows" if nullable else ", but the schema says nullable: false")),
            confidence=0.75 if nullable else 0.3))
    for p in problems[:4]:
        column = p["column"]
        path = _step_path(ctx, ctx.step, "params", "schema")
        rule = _rule(schema, column)
        if p["kind"] == "missing" and p.get("examples"):
            near = p["examples"][0]
            found.append(_fix(ctx, [("rename_key", path, column, near)] if path else None, kind="schema",
                              change={"schema": {near: rule}}, title=f"Validate '{near}' instead of '{column}'",
                              estimate=f"the data has '{near}', not '{column}'", confidence=0.7))
        elif p["kind"] == "nulls":
            edit = _schema_edit(path, schema, column, {"nullable": True})
            found.append(_fix(ctx, edit, kind="schema", change={"schema": {column: {"nullable": True}}},
                              title=f"Allow empty values in '{column}'",
                              estimate=f"the {p['count']:,} empty records pass", confidence=0.55))
        elif p["kind"] == "dtype" and p["found"] in _SCHEMA_DTYPES:
            dtype = _SCHEMA_DTYPES[p["found"]]
            edit = _schema_edit(path, schema, column, {"dtype": dtype})
            found.append(_fix(ctx, edit, kind="schema", change={"schema": {column: {"dtype": dtype}}},
                              title=f"Declare '{column}' as {dtype}, as the data has it",
                              estimate=f"all {records(ctx.details.get('records'))} records pass; steps after "
                                       f"it get {dtype} values in '{column}'", confidence=0.45))
    return found


def _rule(schema: Any, column: str) -> dict:
    rule = schema.get(column) if isinstance(schema, dict) else None
    return {"dtype": rule} if isinstance(rule, str) else dict(rule or {})


def _schema_edit(path, schema, column, changes: dict) -> list[tuple] | None:
    if path is None or column not in (schema or {}):
        return None
    rule = schema[column]
    if isinstance(rule, dict):
        return [("set_key", (*path, column), k, v) for k, v in changes.items()]
    if "dtype" in changes and len(changes) == 1:
        return [("replace", (*path, column), changes["dtype"])]
    return [("replace", (*path, column), {"dtype": rule, **changes})]


def _missing_input(ctx: Context, model) -> list[Fix]:
    near = ctx.details.get("near") or []
    if ctx.error_class != "InputNotFound" or not near:
        return []
    target = near[0]
    raw = yamledit.node_at(ctx.spec.text, _step_path(ctx, ctx.step, "params", "path") or ())
    written = getattr(raw, "value", None)
    placeholder = written[1:-1] if isinstance(written, str) and written.startswith("{") \
        and written.endswith("}") and written[1:-1].isidentifier() else None
    confidence = 0.8 if len(near) == 1 else 0.6
    title = f"Read '{target}' instead"
    estimate = f"'{target}' exists next to where '{ctx.step_spec.params.get('path')}' was looked for"
    if placeholder and placeholder in ctx.overrides:
        return [_fix(ctx, [], overrides={placeholder: target}, kind="parameters",
                     change={placeholder: target}, snippet=f"-p {placeholder}={target}", title=title,
                     estimate=estimate, confidence=confidence)]
    if placeholder and placeholder in ctx.spec.parameters:
        edits = [("replace", ("parameters", placeholder), target)]
        change = {placeholder: target}
    else:
        edits = [("replace", _step_path(ctx, ctx.step, "params", "path"), target)]
        change = {"path": target}
    return [_fix(ctx, edits, kind="parameters", change=change, title=title, estimate=estimate,
                 confidence=confidence)]


def _read_dtype(ctx: Context, model) -> list[Fix]:
    """data.extract found values its sampled dtype can't hold: read the column as one that can."""
    wanted = (ctx.details.get("fix") or {}).get("dtype")
    if ctx.step_spec.action != "data.extract" or not isinstance(wanted, dict) or not wanted:
        return []
    current = ctx.step_spec.params.get("dtype")
    dtype = {**(current if isinstance(current, dict) else {}), **wanted}
    path = _step_path(ctx, ctx.step, "params")
    (column, kind), = wanted.items()
    return [_fix(ctx, [("set_key", path, "dtype", dtype)] if path else None, kind="parameters",
                 change={"dtype": dtype}, title=f"Read '{column}' as {kind}",
                 estimate=(f"every value of '{column}' fits {kind}"
                           + (" (its gaps become NaN)" if kind == "float64" else "")),
                 confidence=0.85)]


def _bad_lines(ctx: Context, model) -> list[Fix]:
    """data.extract met a line with more or fewer fields than the header: pandas can skip such lines."""
    if ctx.step_spec.action != "data.extract" or (ctx.details.get("fix") or {}).get("on_bad_lines") != "skip":
        return []
    path = _step_path(ctx, ctx.step, "params")
    return [_fix(ctx, [("set_key", path, "on_bad_lines", "skip")] if path else None, kind="parameters",
                 change={"on_bad_lines": "skip"}, title="Leave out lines with the wrong number of fields",
                 estimate=(f"line {ctx.details.get('line', 0):,} and any other line whose fields don't match the "
                           "header are skipped without a word: correcting the file keeps them"),
                 confidence=0.5)]


def _missing_column(ctx: Context, model) -> list[Fix]:
    info = ctx.evid.get("key_error")
    if not info or not info.get("columns"):
        return []
    key, close = info["key"], info.get("close") or []
    named_by = [p for p, v in ctx.step_spec.params.items() if v == key and isinstance(v, str)]
    if named_by and close:
        param = named_by[0]
        return [_fix(ctx, [("replace", _step_path(ctx, ctx.step, "params", param), close[0])],
                     kind="parameters", change={param: close[0]},
                     title=f"Set {param}: {close[0]}", estimate=f"'{close[0]}' is a column of the data; "
                     f"'{key}' is not", confidence=0.85)]
    frame = next(iter(info["columns"]))
    where = (ctx.error.get("location") or "?")
    if close:
        return [_fix(ctx, None, kind="code", title=f"Use '{close[0]}' instead of {key!r} at {where}",
                     snippet=f"{where}: {frame}[{close[0]!r}] instead of {frame}[{key!r}]",
                     estimate=f"'{close[0]}' is a column of '{frame}'; {key!r} is not", confidence=0.8)]
    columns = ", ".join(next(iter(info["columns"].values()))[:12])
    return [_fix(ctx, None, kind="code", title=f"Use one of the columns that exist at {where}",
                 snippet=f"{where}: {frame} has {columns}", estimate=f"{key!r} is not among them",
                 confidence=0.4)]


def _parameter_type(ctx: Context, model) -> list[Fix]:
    found = []
    for p in parameter_types(ctx):
        path = _step_path(ctx, ctx.step, "params", p["param"])
        kind = "a number" if not isinstance(p["meant"], bool) else "true/false"
        found.append(_fix(ctx, [("replace", path, p["meant"])], kind="parameters",
                          change={p["param"]: p["meant"]},
                          title=f"Make '{p['param']}' {kind}: {p['param']}: {p['meant']}",
                          estimate=f"{p['function']}() gets {p['meant']!r} instead of the text {p['value']!r}",
                          confidence=0.85))
    return found


def _retries(ctx: Context, model) -> list[Fix]:
    attempts = ctx.attempts
    if ctx.step_spec.retries <= 0 or len(attempts) < 2 or ctx.is_memory:
        return []
    if len({(a["error_type"], a["message"]) for a in attempts}) == 1:
        return [_at_location(ctx, 0.5, f"the same error {len(attempts)} times in a row is not transient: "
                                       "more retries won't help")]
    more = ctx.step_spec.retries * 2 + 1
    return [_fix(ctx, [("setting", ctx.step, "retries", more)], kind="settings", change={"retries": more},
                 title=f"Allow more attempts: retries: {more}",
                 estimate=f"{len(attempts)} attempts failed with different errors: they look transient",
                 confidence=0.35)]
