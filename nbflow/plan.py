"""WorkflowSpec + the previous attempt's records → Plan: order, cache keys, reuse.

A step's cache key hashes its resolved spec (action, params, settings), the keys
of its inputs, its action's code and, for a step that reads files, the files'
sizes and modification times. A step is reused when the previous attempt left a
complete checkpoint under the same key; everything else runs.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import secrets
from dataclasses import dataclass, field
from graphlib import TopologicalSorter
from pathlib import Path
from typing import Any, Mapping

from nbflow.actions.params import output_clashes, param_problems
from nbflow.actions.registry import Action, resolve
from nbflow.errors import Problem, SpecError
from nbflow.spec import StepSpec, WorkflowSpec
from nbflow.state import RunState
from nbflow.store import read_checkpoint_meta

DEFAULT_CHUNK_SIZE = 100_000
#: actions that apply a function named in ``params.function``
TRANSFORMS = {"data.transform": None, "data.transform_streaming": True}


@dataclass(frozen=True)
class PlannedStep:
    spec: StepSpec
    action: Action  # for data.transform*, the function it applies
    params: Mapping[str, Any]  # what the action is called with
    key: str
    streaming: bool
    chunk_size: int | str  # records, or "auto"
    reuse: bool = False
    checkpoint: str | None = None  # the reused checkpoint
    records_out: int | None = None

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class Plan:
    workflow: WorkflowSpec
    order: tuple[str, ...]
    steps: Mapping[str, PlannedStep] = field(default_factory=dict)

    @property
    def reused(self) -> tuple[str, ...]:
        return tuple(n for n in self.order if self.steps[n].reuse)

    @property
    def to_run(self) -> tuple[str, ...]:
        return tuple(n for n in self.order if not self.steps[n].reuse)

    def downstream(self, name: str) -> set[str]:
        """Every step that depends on ``name``, directly or not."""
        found: set[str] = set()
        frontier = {name}
        while frontier:
            frontier = {s.name for s in self.workflow.steps
                        if set(s.needs) & frontier and s.name not in found}
            found |= frontier
        return found


def _order(spec: WorkflowSpec) -> tuple[str, ...]:
    sorter = TopologicalSorter({s.name: s.needs for s in spec.steps})
    # keep the written order among steps that could go in any order
    position = {s.name: i for i, s in enumerate(spec.steps)}
    order: list[str] = []
    sorter.prepare()
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=position.__getitem__)
        order.extend(ready)
        sorter.done(*ready)
    return tuple(order)


def resolve_step_action(step: StepSpec, namespace: Mapping[str, Any] | None
                        ) -> tuple[Action, dict[str, Any], bool | None]:
    """The action a step runs, the params it gets, and a forced streaming setting."""
    params = dict(step.params)
    if step.action in TRANSFORMS:
        function = params.pop("function", None)
        if not isinstance(function, str):
            raise SpecError([Problem(
                f"step '{step.name}': {step.action} needs params.function, the name of the "
                "function to apply to each chunk", line=step.lines.get("params", step.line),
                hint="e.g. params: {function: clean_records}")])
        return resolve(function, namespace), params, TRANSFORMS[step.action]
    return resolve(step.action, namespace), params, None


def _files_fingerprint(step: StepSpec, workdir: Path) -> list:
    path = step.params.get("path")
    if step.action != "data.extract" or not isinstance(path, str):
        return []
    full = path if os.path.isabs(path) else str(workdir / path)
    found = []
    for name in sorted(glob.glob(os.path.expanduser(full))) or [full]:
        for root, _dirs, files in os.walk(name) if os.path.isdir(name) else [(None, None, [name])]:
            for fname in sorted(files):
                fpath = os.path.join(root, fname) if root else fname
                try:
                    st = os.stat(fpath)
                    found.append([fpath, st.st_size, st.st_mtime_ns])
                except OSError:
                    found.append([fpath, None, None])
    return found


def cache_key(step: StepSpec, action: Action, input_keys: list[str], files: list) -> str:
    payload = {"step": step.identity(), "code": action.fingerprint(), "inputs": input_keys,
               "files": files}
    if not step.cache:
        payload["nonce"] = secrets.token_hex(8)  # cache: false never matches
    text = json.dumps(payload, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def make_plan(spec: WorkflowSpec, *, namespace: Mapping[str, Any] | None = None,
              previous: RunState | None = None, force: set[str] | frozenset = frozenset(),
              workdir: str | os.PathLike | None = None) -> Plan:
    """Order the steps, key them, and decide which reuse the previous attempt's output.

    ``force`` names steps to run again even when their key matches (and so their
    dependents: they would read a new output).
    """
    workdir = Path(workdir or Path.cwd())
    order = _order(spec)
    planned: dict[str, PlannedStep] = {}
    problems: list[Problem] = []
    for name in order:
        step = spec.step(name)
        try:
            action, params, forced_streaming = resolve_step_action(step, namespace)
        except SpecError as err:
            problems.extend(err.problems)
            continue
        except Exception as err:  # ActionNotFound, an import error in a package.module:function
            problems.append(Problem(f"step '{name}': {err}", line=step.lines.get("action", step.line)))
            continue
        if action.kind == "chunk" and len(step.needs) != 1:
            problems.append(Problem(
                f"step '{name}': the chunk-wise action '{step.action}' needs exactly one input, "
                f"it has {len(step.needs)}", line=step.lines.get("needs", step.line),
                hint="give it one step under needs:, or register it with kind='whole'"))
            continue
        if bad := param_problems(step, action, params):
            problems.extend(bad)
            continue
        if any(n not in planned for n in step.needs):
            continue  # an input failed to plan: already reported
        input_keys = [planned[n].key for n in step.needs]
        key = cache_key(step, action, input_keys, _files_fingerprint(step, workdir))
        streaming = forced_streaming if forced_streaming is not None else (
            step.streaming if step.streaming is not None else action.streaming)
        reuse, checkpoint, records_out = False, None, None
        if previous is not None and name not in force:
            rec = previous.steps.get(name)
            if (rec is not None and rec.status.done and rec.cache_key == key
                    and read_checkpoint_meta(rec.checkpoint) is not None):
                reuse, checkpoint, records_out = True, rec.checkpoint, rec.records_out
        planned[name] = PlannedStep(step, action, params, key, bool(streaming),
                                    step.chunk_size or DEFAULT_CHUNK_SIZE, reuse, checkpoint,
                                    records_out)
    problems += output_clashes([spec.step(name) for name in order], workdir)
    if problems:
        raise SpecError(sorted(problems, key=lambda p: p.line or 0), spec.filename)
    # a step runs if any input runs: its input's output is about to change
    for name in order:
        p = planned[name]
        if p.reuse and any(not planned[n].reuse for n in p.spec.needs):
            planned[name] = PlannedStep(p.spec, p.action, p.params, p.key, p.streaming, p.chunk_size)
    return Plan(spec, order, planned)

