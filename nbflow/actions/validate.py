"""``data.validate``: check columns, dtypes and nulls chunk by chunk, and fail with every
problem found (which column, expected against found, how many rows, a few examples).

Run alone it maps ``_check_chunk`` over its input's partitions; in a pass the
engine calls the same check on each chunk as it goes by (``chunk_check``). Either
way each chunk gives a small frame of problems and ``finish`` raises one
``SchemaError`` naming them all.
"""
from __future__ import annotations

import difflib
import json
from functools import partial
from typing import Any, Mapping

import pandas as pd
from pandas.api import types as pdt

from nbflow.actions.registry import Effect, StepContext, action
from nbflow.errors import SchemaError, StepError
from nbflow.yamlnodes import close_matches, did_you_mean

_FAMILIES = {"int64": "int", "int32": "int", "int": "int", "float64": "float", "float": "float",
             "string": "string", "str": "string", "bool": "bool", "datetime64": "datetime",
             "datetime": "datetime", "category": "category"}
_RULE_KEYS = ("dtype", "nullable", "required")
_PROBLEM_COLUMNS = ("chunk", "column", "kind", "expected", "found", "count", "examples", "records")
_PROBLEMS_META = pd.DataFrame({c: pd.Series(dtype="int64" if c in ("chunk", "count", "records")
                                            else "str") for c in _PROBLEM_COLUMNS})


def _validate_check(schema: Mapping[str, Any]) -> tuple:
    """data.validate as two functions: ``check(df, chunk)`` -> the chunk's problems, and
    ``finish(problems of every chunk)``, which raises SchemaError naming them all."""
    rules = _rules(schema)
    return partial(_check_one, rules=rules), partial(_finish_validate, rules)


def schema_problems(params: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """Each problem of ``params.schema`` as (param, message, hint): checked when the workflow
    is planned, so a misspelt dtype or rule fails before the steps before it run."""
    schema = params.get("schema")
    if not isinstance(schema, Mapping) or not schema:
        return [("schema", "schema must map column names to dtypes",
                 "e.g. schema: {id: int64, amount: {dtype: float64, nullable: true}}")]
    found = []
    for column, spec in schema.items():
        spec = {"dtype": spec} if isinstance(spec, str) else spec if spec is not None else {}
        if not isinstance(spec, Mapping):
            found.append(("schema", f"column '{column}' has {type(spec).__name__} {spec!r} for its rule",
                          f"write {column}: int64, or {column}: {{dtype: int64, nullable: false}}"))
            continue
        for key in spec:
            if key not in _RULE_KEYS:
                found.append(("schema", f"column '{column}' has unknown key '{key}'",
                              did_you_mean(close_matches(key, _RULE_KEYS))
                              or f"a column's rule takes {', '.join(_RULE_KEYS)}"))
        dtype = str(spec.get("dtype", "")).lower()
        if dtype not in _FAMILIES:
            found.append(("schema", f"column '{column}' has dtype {spec.get('dtype')!r}" if "dtype" in spec
                          else f"column '{column}' has no dtype",
                          did_you_mean(close_matches(dtype, _FAMILIES)) or f"use one of {', '.join(_FAMILIES)}"))
        for flag in ("nullable", "required"):
            if flag in spec and not isinstance(spec[flag], bool):
                found.append(("schema", f"column '{column}': {flag} must be true or false, not {spec[flag]!r}",
                              f"write {flag}: true or {flag}: false"))
    return found


@action("data.validate", kind="step", chunkwise=True, chunk_check=_validate_check,
        param_check=schema_problems)
def validate(ctx: StepContext, schema: Mapping[str, Any]) -> Effect:
    """Check columns, dtypes and nulls chunk by chunk; fail with every problem found."""
    rules = _rules(schema)
    chunks = ctx.input.map_partitions(_check_chunk, rules, meta=_PROBLEMS_META)
    return Effect(chunks=chunks, finish=partial(_finish_validate, rules), output=ctx.input,
                  passthrough=True)


def _check_one(df: pd.DataFrame, chunk: int, rules: dict) -> pd.DataFrame:
    return _check_chunk(df, rules, {"number": chunk})


def _rules(schema: Mapping[str, Any]) -> dict[str, dict]:
    if problems := schema_problems({"schema": schema}):
        _, message, hint = problems[0]
        raise StepError(f"data.validate: {message} — {hint}", {"schema": schema})
    rules = {}
    for column, spec in schema.items():
        spec = {"dtype": spec} if isinstance(spec, str) else dict(spec or {})
        dtype = str(spec["dtype"]).lower()
        rules[str(column)] = {"dtype": dtype, "family": _FAMILIES[dtype],
                              "nullable": spec.get("nullable", True), "required": spec.get("required", True)}
    return rules


def _check_chunk(df: pd.DataFrame, rules: dict, partition_info=None) -> pd.DataFrame:
    chunk = partition_info["number"] if partition_info else 0
    rows = [(chunk, "", "records", "", "", 0, "[]", len(df))]
    for column, rule in rules.items():
        if column not in df.columns:
            if rule["required"]:
                near = difflib.get_close_matches(column, [str(c) for c in df.columns], n=3)
                rows.append((chunk, column, "missing", rule["dtype"], "", len(df), json.dumps(near), 0))
            continue
        series = df[column]
        bad = _offenders(series, rule["family"])
        if bad is not None:
            rows.append((chunk, column, "dtype", rule["dtype"], str(series.dtype), int(bad.sum()),
                         _examples(series[bad]), 0))
        if not rule["nullable"]:
            nulls = int(series.isna().sum())
            if nulls:
                rows.append((chunk, column, "nulls", rule["dtype"], str(series.dtype), nulls, "[]", 0))
    return pd.DataFrame(rows, columns=list(_PROBLEM_COLUMNS)).astype(_PROBLEMS_META.dtypes.to_dict())


def _offenders(s: pd.Series, family: str) -> pd.Series | None:
    """None when ``s``'s dtype fits ``family``, else a mask of the values that don't."""
    dtype = s.dtype
    textual = pdt.is_string_dtype(dtype) or pdt.is_object_dtype(dtype)
    numeric = pdt.is_numeric_dtype(dtype) and not pdt.is_bool_dtype(dtype)
    if family == "int":
        if pdt.is_integer_dtype(dtype) and not pdt.is_bool_dtype(dtype):
            return None
        if pdt.is_float_dtype(dtype):
            return ~(s.notna() & (s == s.round()))
        if textual:
            number = pd.to_numeric(s, errors="coerce")
            return s.notna() & ~(number.notna() & (number == number.round()))
    elif family == "float":
        if numeric:
            return None
        if textual:
            return s.notna() & pd.to_numeric(s, errors="coerce").isna()
    elif family in ("string", "category"):
        if textual or (family == "category" and isinstance(dtype, pd.CategoricalDtype)):
            return None
    elif family == "bool":
        if pdt.is_bool_dtype(dtype):
            return None
        if textual:
            return s.notna() & ~s.astype("str").str.strip().str.lower().isin(["true", "false"])
        if numeric:
            return s.notna() & ~s.isin([0, 1])
    elif family == "datetime":
        if pdt.is_datetime64_any_dtype(dtype):
            return None
        if textual:
            return s.notna() & _to_datetime(s).isna()
    return s.notna()


def _to_datetime(s: pd.Series) -> pd.Series:
    """Parse with the format of the first value (never per value: that is ~1000x slower)."""
    from pandas.tseries.api import guess_datetime_format

    first = s.dropna().head(1).tolist()
    fmt = guess_datetime_format(str(first[0])) if first else None
    return pd.to_datetime(s, format=fmt or "ISO8601", errors="coerce")


def _examples(values: pd.Series) -> str:
    seen: list = []
    for value in values.head(100).tolist():
        if pd.isna(value):
            value = None
        elif not isinstance(value, (bool, int, float)):
            value = str(value) if len(str(value)) <= 40 else str(value)[:39] + "…"
        if value not in seen:
            seen.append(value)
            if len(seen) == 3:
                break
    return json.dumps(seen, ensure_ascii=False)


def _finish_validate(rules: dict, results: pd.DataFrame) -> dict:
    if results is None or "records" not in results:
        results = _PROBLEMS_META
    records = int(results["records"].sum())
    if (results["kind"] == "records").all():  # no problem in any chunk (the common case, fast)
        return {"records_in": records, "records_out": records}
    found = results[results["kind"] != "records"].sort_values("chunk", kind="stable")
    order = {c: i for i, c in enumerate(rules)}
    problems = []
    for (column, kind, expected, dtype), group in found.groupby(
            ["column", "kind", "expected", "found"], sort=False):
        examples: list = []
        for text in group["examples"]:
            examples += [v for v in json.loads(text) if v not in examples]
        hit = group[group["count"] > 0] if (group["count"] > 0).any() else group
        problems.append({"column": column, "kind": kind, "expected": expected, "found": dtype,
                         "count": int(group["count"].sum()), "examples": examples[:3],
                         "chunks": sorted(set(hit["chunk"].tolist()))[:3]})
    if not problems:
        return {"records_in": records, "records_out": records}
    problems.sort(key=lambda p: (order.get(p["column"], len(order)),
                                 ("missing", "dtype", "nulls").index(p["kind"])))
    lines = [_describe(p, records) for p in problems]
    head = "" if len(lines) == 1 else f"{len(lines)} schema problems:\n  "
    raise SchemaError(head + "\n  ".join(lines), {"problems": problems, "records": records})


def _describe(p: dict, records: int) -> str:
    shown = ", ".join("empty" if v is None else repr(v) if isinstance(v, str) else str(v)
                      for v in p["examples"])
    example = f" (e.g. {shown})" if shown else ""
    where = f"column '{p['column']}'"
    if p["kind"] == "missing":
        near = f" (did you mean {' or '.join(repr(v) for v in p['examples'])}?)" if shown else ""
        return f"{where} is missing{near}"
    if p["kind"] == "nulls":
        return f"{where}: {p['count']:,} of {records:,} rows are empty, but it is not nullable"
    head = f"{where}: expected {p['expected']}, found {p['found']} — "
    family = _FAMILIES[p["expected"]]
    if p["count"] == 0:
        read = (f"parse_dates: [{p['column']}]" if family == "datetime"
                else f"dtype: {{{p['column']}: {p['expected']}}}")
        return head + (f"every value fits {p['expected']}: convert the column, or give "
                       f"data.extract {read}")
    if pdt.is_float_dtype(p["found"]) and family == "int":
        what = "are empty or not whole numbers"
    elif p["found"] in ("str", "string", "object") and family in ("int", "float", "datetime", "bool"):
        what = "don't parse"
    else:
        what = f"hold {p['found']} values"
    return head + f"{p['count']:,} of {records:,} rows {what}{example}"
