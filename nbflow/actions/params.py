"""A step's params checked against its action's signature when the workflow is planned.

A misspelt, missing or empty parameter is a workflow error pointing at its line
(``SpecError``, exit 2 from the CLI) before anything runs, not a ``TypeError``
from inside the run once the steps before it have done their work.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nbflow.actions.registry import Action, in_workdir
from nbflow.errors import Problem
from nbflow.yamlnodes import close_matches, did_you_mean

_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)

#: what a hint suggests for a built-in's parameter
EXAMPLES = {("data.extract", "path"): "data/records.csv", ("data.load", "path"): "out/clean.parquet",
            ("data.validate", "schema"): "{id: int64, amount: float64}"}
#: names people write for an option that pandas or Arrow spells otherwise
SYNONYMS = {"separator": "sep", "seperator": "sep", "delim": "delimiter", "encode": "encoding",
            "header_row": "header", "compress": "compression"}


def param_problems(step, action: Action, params: Mapping[str, Any]) -> list[Problem]:
    """What is wrong with ``params`` (the step's, settings and ``function`` taken out) for
    ``action`` (for data.transform, the function it applies); [] if nothing or unknowable."""
    try:
        signature = inspect.signature(action.func)
    except (TypeError, ValueError):  # a builtin or C callable: nothing to check against
        return []
    parameters = list(signature.parameters.values())
    if parameters and parameters[0].kind in (inspect.Parameter.POSITIONAL_ONLY, _NAMED[0]):
        parameters = parameters[1:]  # the data (chunk, whole) or the StepContext (step)
    named = [p.name for p in parameters if p.kind in _NAMED]
    takes_more = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    if takes_more and action.options is not None and (more := action.options(params)) is not None:
        named, takes_more = named + [m for m in more if m not in named], False
    label = f"step '{step.name}': {action.name}"
    at_params = step.lines.get("params", step.lines.get("action", step.line))
    problems = []
    for p in parameters:
        if p.kind in _NAMED and p.default is inspect.Parameter.empty and p.name not in params:
            example = EXAMPLES.get((action.name, p.name), "...")
            misspelt = close_matches(p.name, [k for k in params if k not in named])
            problems.append(Problem(
                f"{label} needs the parameter '{p.name}'",
                line=step.lines.get(f"params.{misspelt[0]}", at_params) if misspelt else at_params,
                hint=f"did you mean '{p.name}' where it says '{misspelt[0]}'?" if misspelt
                else f"add it under params:, e.g. params: {{{p.name}: {example}}}"))
    if not takes_more:
        for key in params:
            if key not in named:
                takes = (f"it takes {', '.join(named[:12])}{', ...' if len(named) > 12 else ''}"
                         if named else "it takes no parameters")
                problems.append(Problem(f"{label} has no parameter '{key}'",
                                        line=step.lines.get(f"params.{key}", at_params),
                                        hint=did_you_mean(_meant(key, named)) or takes))
    if not problems and action.param_check is not None:
        problems += [Problem(f"{label}: {message}", line=step.lines.get(f"params.{key}", at_params), hint=hint)
                     for key, message, hint in action.param_check(params)]
    return problems


def _meant(key: str, named: list[str]) -> list[str]:
    synonym = SYNONYMS.get(key.lower())
    return [synonym] if synonym in named else close_matches(key, named)


def output_clashes(steps, workdir) -> list[Problem]:
    """Two data.load steps writing the same path: the second would replace the first's output."""
    first: dict[Path, str] = {}
    found = []
    for step in steps:
        path = step.params.get("path")
        if step.action != "data.load" or not isinstance(path, str) or not path.strip():
            continue
        where = in_workdir(workdir, path).resolve()
        if where in first:
            found.append(Problem(f"steps '{first[where]}' and '{step.name}' both write '{path}'",
                                 line=step.lines.get("params.path", step.line),
                                 hint=f"the second would replace the first's output; give '{step.name}' "
                                      f"its own path, e.g. path: out/{step.name}.parquet"))
        else:
            first[where] = step.name
    return found
