"""Workflow text → WorkflowSpec: parse, fill placeholders, validate.

The YAML is composed into nodes (not ``safe_load``ed) so that every value keeps
its source line: problems point at it, and later code edits the text by line
to write corrected workflows. Validation collects every problem before raising
one SpecError, so a user fixes a workflow in one pass.
"""
from __future__ import annotations

import numbers
import re
from dataclasses import dataclass, field
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from nbflow.errors import Problem, SpecError
from nbflow.units import parse_size
from nbflow.yamlnodes import (
    children,
    close_matches,
    compose,
    did_you_mean,
    is_null,
    kind_of,
    position,
    position_in,
    safe_name,
    syntax_error,
)

#: execution settings, accepted at step level, inside params, or under defaults
SETTINGS = ("chunk_size", "max_memory", "streaming", "retries", "cache")
STEP_KEYS = ("name", "action", "needs", "params") + SETTINGS
TOP_KEYS = ("name", "version", "description", "parameters", "defaults", "steps")
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
#: step names name checkpoint folders, so they must be safe file names everywhere
SAFE_NAME = re.compile(r"[A-Za-z0-9_-]+")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MAP, _SEQ, _STR, _MERGE = (f"tag:yaml.org,2002:{t}" for t in ("map", "seq", "str", "merge"))


@dataclass(frozen=True)
class StepSpec:
    name: str
    action: str
    needs: tuple[str, ...] = ()
    #: the action's own parameters, placeholders filled, settings removed
    params: Mapping[str, Any] = field(default_factory=dict)
    chunk_size: int | str | None = None  # records per chunk, "auto", or None for the engine default
    max_memory: int | None = None  # bytes above the step's baseline; None: the engine default
    streaming: bool | None = None  # None: the action's default
    retries: int = 0
    cache: bool = True
    line: int | None = None  # 1-based line of the step's "- name:" in the source
    #: 1-based source line of each field, e.g. {"action": 7, "params": 8, "params.chunk_size": 8}
    lines: Mapping[str, int] = field(default_factory=dict, compare=False)

    def settings(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in SETTINGS}

    def identity(self) -> dict[str, Any]:
        """What defines the step's work (for its cache key): no source positions."""
        return {"name": self.name, "action": self.action, "needs": list(self.needs),
                "params": dict(self.params), **self.settings()}


@dataclass(frozen=True)
class WorkflowSpec:
    name: str
    steps: tuple[StepSpec, ...]
    version: str | None = None
    description: str | None = None
    #: resolved parameters: the workflow's defaults overridden by the caller's
    parameters: Mapping[str, Any] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    text: str = ""  # the source text, as written
    filename: str = "workflow.yaml"
    overrides: Mapping[str, Any] = field(default_factory=dict)  # the caller's, as parse got them

    def step(self, name: str) -> StepSpec:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)

    @property
    def step_names(self) -> tuple[str, ...]:
        return tuple(step.name for step in self.steps)


#: checks an action name: None when it resolves, else a list of suggestions
ActionCheck = Callable[[str], "list[str] | None"]


def load(path: str | Path, overrides: Mapping[str, Any] | None = None, *,
         namespace: Mapping[str, Any] | None = None, action_check: ActionCheck | None = None) -> WorkflowSpec:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([Problem(f"no such file '{path}'", hint="check the path")], filename=str(path)) from None
    return parse(text, filename=path.name, overrides=overrides, namespace=namespace,
                 action_check=action_check)


def parse(text: str, *, filename: str = "workflow.yaml", overrides: Mapping[str, Any] | None = None,
          namespace: Mapping[str, Any] | None = None, action_check: ActionCheck | None = None
          ) -> WorkflowSpec:
    """Parse and validate workflow text.

    ``overrides`` (CLI ``-p``, ``--param``, papermill) win over ``namespace``
    (notebook variables, consulted only for names the workflow uses), which
    win over the workflow's own ``parameters:``. Raises SpecError listing every
    problem found.
    """
    try:
        root = compose(text)
    except yaml.YAMLError as err:
        raise syntax_error(err, text, filename) from err
    r = _Reader(text)
    if root is None or not (isinstance(root, yaml.MappingNode) and root.tag == _MAP):
        what = "empty" if root is None else f"{r.kind(root)}, not a mapping"
        raise SpecError([Problem(f"the workflow is {what}", *(position(root) if root else (1, None)),
                                 hint="start the file with name: and steps:")], filename)
    top: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    misspelt: set[str] = set()
    for key, key_node, value_node in r.pairs(root):
        if key in TOP_KEYS:
            top[key] = (key_node, value_node)
        else:
            misspelt.update(close := close_matches(key, TOP_KEYS))
            r.problem(f"unknown key '{key}'", key_node,
                      did_you_mean(close) or f"the workflow's keys are {', '.join(TOP_KEYS)}")
    for key in ("name", "steps"):
        if key not in top and key not in misspelt:  # a misspelt key already says "did you mean"
            r.problem(f"the workflow has no {key}:", root, f"add {key}: " + (
                "my-workflow" if key == "name" else "with a list of steps"))
    name, version, description = (r.string(top.get(key), key) for key in ("name", "version", "description"))
    declared = r.declared_parameters(top.get("parameters"))
    r.resolve_parameters(declared, [top[k][1] for k in ("defaults", "steps") if k in top],
                         overrides or {}, namespace or {})
    defaults = r.defaults(top.get("defaults"))
    steps = r.steps(top.get("steps"), defaults, action_check)
    if r.problems:
        raise SpecError(sorted(r.problems, key=lambda p: (p.line is not None, p.line or 0, p.column or 0)),
                        filename)
    return WorkflowSpec(steps=steps, name=name or "", version=version, description=description,
                        parameters=r.params, defaults=defaults, text=text, filename=filename,
                        overrides=dict(overrides or {}))


class _Reader:
    """Builds values from the composed nodes, filling placeholders, and collects every problem."""

    def __init__(self, text: str):
        self.text = text
        self.loader = yaml.SafeLoader(text)  # only its constructors: values get safe_load's types
        self.problems: list[Problem] = []
        self.params: dict[str, Any] = {}
        self.uses: list[tuple[str, int, int]] = []  # every placeholder written: name, line, column
        self.bare: list[tuple[str, yaml.Node]] = []  # an unquoted {name} is a one-key YAML mapping
        self._checked: set[int] = set()  # mappings whose duplicate keys were reported (aliases repeat)
        self._building: set[int] = set()  # guards against recursive aliases

    def problem(self, message: str, where: yaml.Node | tuple | None = None, hint: str | None = None) -> None:
        line, column = position(where) if isinstance(where, yaml.Node) else (where or (None, None))
        self.problems.append(Problem(message, line, column, hint or None))

    def construct(self, node: yaml.Node) -> Any:
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.YAMLError as err:  # an unsafe or unknown tag, a bad !!int, a recursive alias, ...
            self.problem(f"invalid value: {getattr(err, 'problem', None) or err}",
                         position(getattr(err, "problem_mark", None) or node), "remove the tag or fix the value")
            self.loader = yaml.SafeLoader(self.text)  # a failed construction leaves state behind
            return None

    def pairs(self, node: yaml.MappingNode) -> list[tuple[Any, yaml.Node, yaml.Node]]:
        """A mapping's (key, key node, value node): duplicate keys reported, ``<<`` merges applied."""
        own = {id(key_node) for key_node, _ in node.value}  # merged keys may repeat own keys
        check, first, out = id(node) not in self._checked, {}, []
        self._checked.add(id(node))
        if any(key_node.tag == _MERGE for key_node, _ in node.value):
            try:
                self.loader.flatten_mapping(node)  # own keys come after merged ones, so they win
            except yaml.YAMLError as err:
                self.problem(f"invalid merge: {err.problem}", position(err.problem_mark or node))
        for key_node, value_node in node.value:
            key = self.construct(key_node)
            try:
                hash(key)
            except TypeError:
                if check:
                    self.problem("a key must be a plain value, not a list or mapping", key_node)
                continue
            if check and id(key_node) in own and key in first:
                self.problem(f"duplicate key '{key}'", key_node,
                             f"'{key}' is already set at line {first[key]}; keep one (YAML keeps only the last)")
            elif id(key_node) in own:
                first[key] = key_node.start_mark.line + 1
            out.append((key, key_node, value_node))
        return out

    def mapping(self, node: yaml.Node | None, what: str) -> list[tuple[Any, yaml.Node, yaml.Node]]:
        if isinstance(node, yaml.MappingNode) and node.tag == _MAP:
            return self.pairs(node)
        if node is not None and not is_null(node):
            self.problem(f"{what} must be a mapping, not {self.kind(node)}", node,
                         f"write {what}: {{key: value, ...}} or one 'key: value' per indented line")
        return []

    def value(self, node: yaml.Node) -> Any:
        """The node's value as safe_load builds it, with placeholders filled."""
        if isinstance(node, yaml.ScalarNode):
            value = self.construct(node)
            return self.fill(value) if isinstance(value, str) else value
        if id(node) in self._building or node.tag not in (_MAP, _SEQ):
            return self.construct(node)  # recursive aliases, !!set, !!omap: as safe_load makes them
        self._building.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.value(item) for item in node.value]
            return {key: self.value(value_node) for key, _, value_node in self.pairs(node)}
        finally:
            self._building.discard(id(node))

    def fill(self, text: str) -> Any:
        whole = PLACEHOLDER.fullmatch(text)
        if whole and whole.group(1) in self.params:
            return self.params[whole.group(1)]  # "{rows}" takes the parameter's own type
        # plain substitution, never eval; unknown names stay as written (reported from self.uses)
        return PLACEHOLDER.sub(lambda m: str(self.params.get(m.group(1), m.group(0))), text)

    def kind(self, node: yaml.Node) -> str:
        return {yaml.MappingNode: "a mapping", yaml.SequenceNode: "a list"}.get(type(node)) \
            or kind_of(self.construct(node))

    def scan(self, node: yaml.Node, seen: set[int]) -> None:
        """Record each placeholder written in a string value under ``node``, at its exact position."""
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, yaml.ScalarNode) and node.tag == _STR:
            source = self.text[node.start_mark.index:node.end_mark.index]
            for name in dict.fromkeys(PLACEHOLDER.findall(node.value)):
                self.uses.append((name, *position_in(source, "{" + name + "}", node)))
        elif isinstance(node, yaml.MappingNode) and node.flow_style and len(node.value) == 1:
            key_node, value_node = node.value[0]
            if key_node.tag == _STR and _IDENTIFIER.fullmatch(key_node.value) and is_null(value_node) \
                    and value_node.value == "":
                self.bare.append((key_node.value, node))
        for child in children(node):
            self.scan(child, seen)

    def declared_parameters(self, entry: tuple | None) -> dict[str, Any]:
        declared: dict[str, Any] = {}
        for key, key_node, value_node in self.mapping(entry and entry[1], "parameters"):
            if isinstance(key, str) and _IDENTIFIER.fullmatch(key):
                declared[key] = self.value(value_node)  # nothing is filled: self.params is still empty
            else:
                self.problem(f"parameter name '{key}' can't be a {{placeholder}}", key_node, "use letters, digits and _")
        return declared

    def resolve_parameters(self, declared: dict[str, Any], nodes: list[yaml.Node],
                           overrides: Mapping[str, Any], namespace: Mapping[str, Any]) -> None:
        seen: set[int] = set()
        for node in nodes:
            self.scan(node, seen)
        used = dict.fromkeys([*declared, *(name for name, _, _ in self.uses)])
        self.params = dict(declared)
        self.params.update((name, namespace[name]) for name in used if name in namespace)
        for key, value in overrides.items():
            if key in used:
                self.params[key] = value
            else:
                close = did_you_mean(close_matches(key, used))
                self.problem(f"parameter '{key}' is not used by the workflow", None,
                             f"declare it under parameters: or write {{{key}}} where it goes"
                             + (f" ({close})" if close else ""))
        for name, line, column in self.uses:
            if name not in self.params:
                self.problem(f"unknown parameter '{name}' in '{{{name}}}'", (line, column),
                             did_you_mean(close_matches(name, self.params))
                             or f"declare it under parameters: or pass it with -p {name}=VALUE")
        for name, node in self.bare:
            if name in self.params:
                self.problem(f"{{{name}}} without quotes is a YAML mapping, not a placeholder", node,
                             f'quote it: "{{{name}}}"')

    def setting(self, into: dict[str, Any], key: str, value: Any, node: yaml.Node) -> None:
        try:
            into[key] = _setting(key, value)
        except ValueError as err:
            self.problem(err.args[0], node, err.args[1])

    def defaults(self, entry: tuple | None) -> dict[str, Any]:
        defaults: dict[str, Any] = {}
        for key, key_node, value_node in self.mapping(entry and entry[1], "defaults"):
            if key in SETTINGS:
                self.setting(defaults, key, self.value(value_node), value_node)
            else:
                self.problem(f"unknown key '{key}' under defaults:", key_node, did_you_mean(close_matches(key, SETTINGS))
                             or f"defaults: holds execution settings only: {', '.join(SETTINGS)}")
        return defaults

    def string(self, entry: tuple | None, what: str) -> str | None:
        value = self.construct(entry[1]) if entry else None
        if what == "version" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return entry[1].value  # as written: 1.10 stays "1.10", not the float's "1.1"
        if not entry or isinstance(value, str) and value.strip() or (value is None and what != "name"):
            return value
        self.problem(f"{what} must be text, not {kind_of(value)}", entry[1], f'quote it: {what}: "..."')
        return None

    def steps(self, entry: tuple | None, defaults: dict[str, Any],
              action_check: ActionCheck | None) -> tuple[StepSpec, ...]:
        if entry is None:
            return ()
        key_node, node = entry
        if is_null(node) or (isinstance(node, yaml.SequenceNode) and not node.value):
            self.problem("the workflow has no steps", key_node,
                         "add at least one step under steps:, e.g. '- name: load' with an action:")
            return ()
        if not (isinstance(node, yaml.SequenceNode) and node.tag == _SEQ):
            self.problem(f"steps must be a list of steps, not {self.kind(node)}", node,
                         "start each step with '- name: ...' under steps:")
            return ()
        built = [step for step in (self.step(item, defaults, action_check) for item in node.value) if step]
        self.check_graph(built)
        return tuple(spec for spec, _, _ in built)

    def step(self, node: yaml.Node, defaults: dict[str, Any], action_check: ActionCheck | None) -> tuple | None:
        """(StepSpec, its name's node, [(need, node), ...]), or None when it is not even a mapping."""
        line = node.start_mark.line + 1
        if not (isinstance(node, yaml.MappingNode) and node.tag == _MAP):
            self.problem(f"a step must be a mapping with name: and action:, not {self.kind(node)}", node,
                         "write '- name: my-step' with 'action: ...' below it")
            return None
        pairs = self.pairs(node)
        fields = {key: (key_node, value_node) for key, key_node, value_node in pairs if key in STEP_KEYS}
        lines = {key: key_node.start_mark.line + 1 for key, (key_node, _) in fields.items()}
        value = {key: self.value(value_node) for key, (_, value_node) in fields.items() if key != "params"}
        name, action = value.get("name"), value.get("action")
        label = f"step '{name}'" if isinstance(name, str) else f"the step at line {line}"
        for key, key_node, _ in pairs:
            if key not in STEP_KEYS:
                self.problem(f"{label} has unknown key '{key}'", key_node, did_you_mean(close_matches(key, STEP_KEYS))
                             or f"a step's keys are {', '.join(STEP_KEYS)}")
        if "name" not in fields:
            self.problem(f"{label} has no name", node,
                         "add name: (letters, digits, '-' and '_'; it names the step's checkpoint folder)")
        elif not isinstance(name, str):
            self.problem(f"{label}: name must be text, not {kind_of(name)}", fields["name"][1],
                         f'quote it: name: "{name}"')
        elif not SAFE_NAME.fullmatch(name):
            safe = safe_name(name)
            self.problem(f"step name '{name}' can't name its checkpoint folder", fields["name"][1],
                         f"use only letters, digits, '-' and '_', e.g. '{safe}'")
        if "action" not in fields:
            self.problem(f"{label} has no action", node, "add action: with a built-in like data.transform, "
                         "a notebook function's name or 'package.module:function'")
        elif not isinstance(action, str) or not action:
            self.problem(f"{label}: action must be an action's name, not {kind_of(action)}", fields["action"][1])
        elif action_check and not PLACEHOLDER.search(action) and (close := action_check(action)) is not None:
            self.problem(f"{label}: unknown action '{action}'", fields["action"][1], did_you_mean(close) or
                         "use a built-in (data.extract, data.validate, data.transform, data.load), a function "
                         "defined in the notebook, one registered with @nbflow.action, or 'package.module:function'")
        needs = []  # (name, node): the nodes locate unknown needs and cycles
        needs_node, raw = fields.get("needs", (None, None))[1], value.get("needs")
        entries = list(zip(raw, needs_node.value, strict=True)) if isinstance(raw, list) else [(raw, needs_node)]
        for need, need_node in entries if raw is not None else ():
            if isinstance(need, str):
                needs.append((need, need_node))
            else:
                self.problem(f"{label}: needs must name steps, not {kind_of(need)}", need_node,
                             "write needs: [step-a, step-b]")

        params: dict[str, Any] = {}
        settings = dict(defaults)  # precedence: step level > params > defaults
        for key, key_node, value_node in self.mapping(fields.get("params", (None, None))[1], "params"):
            if not isinstance(key, str):
                self.problem(f"{label}: parameter names must be text, not {kind_of(key)}", key_node)
                continue
            lines[f"params.{key}"] = key_node.start_mark.line + 1
            if key in SETTINGS:
                self.setting(settings, key, self.value(value_node), value_node)
            else:
                params[key] = self.value(value_node)
        for key in SETTINGS:
            if key in fields:
                self.setting(settings, key, value[key], fields[key][1])
        spec = StepSpec(name=name if isinstance(name, str) else "", action=action if isinstance(action, str) else "",
                        needs=tuple(need for need, _ in needs), params=params, **settings, line=line, lines=lines)
        return spec, fields.get("name", (node, node))[1], needs

    def check_graph(self, built: list[tuple[StepSpec, yaml.Node, list]]) -> None:
        first: dict[str, int] = {}
        for spec, name_node, _ in built:
            if spec.name in first:
                self.problem(f"step name '{spec.name}' is used twice", name_node,
                             f"the first '{spec.name}' is at line {first[spec.name]}; give each step its own name")
            elif spec.name:
                first[spec.name] = name_node.start_mark.line + 1
        sorter: TopologicalSorter = TopologicalSorter()
        for spec, _, needs in built:
            for i, (need, node) in enumerate(needs):
                if need == spec.name:
                    self.problem(f"step '{spec.name}' needs itself", node, f"remove '{need}' from its needs")
                elif need not in first:
                    self.problem(f"step '{spec.name}' needs '{need}', which is not a step", node,
                                 did_you_mean(close_matches(need, first)) or f"the steps are {', '.join(map(repr, first))}")
                elif need in spec.needs[:i]:
                    self.problem(f"step '{spec.name}' needs '{need}' twice", node, "list each step once")
            # add() accumulates, so a duplicated name keeps every step's needs
            sorter.add(spec.name, *(need for need in spec.needs if need in first and need != spec.name))
        try:
            sorter.prepare()
        except CycleError as err:
            cycle = err.args[1][::-1]  # graphlib lists each step before the one that needs it
            node = next(node for spec, _, needs in built if spec.name == cycle[0]
                        for need, node in needs if need == cycle[1])
            self.problem(f"steps need each other in a cycle: {' → '.join(cycle)}", node,
                         "→ reads 'needs'; remove one of these needs so the steps can run in order")


def _setting(key: str, value: Any) -> Any:
    """A setting as StepSpec stores it; ValueError(message, hint) when it is invalid."""
    whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)  # numpy ints too
    if key == "chunk_size":
        if value is None or value == "auto" or (whole and value > 0):
            return int(value) if whole else value
        raise ValueError(f"chunk_size must be a positive whole number of records or 'auto', not {kind_of(value)}",
                         "e.g. chunk_size: 10000")
    if key == "max_memory":
        try:
            return None if value is None else parse_size(value)
        except ValueError as err:
            reason = re.sub(r"\s*\(write[^)]*\)$", "", str(err))
            raise ValueError(f"max_memory: {reason}",
                             "write e.g. 512MB, 2GB, 1.5GiB, 4Gi or a whole number of bytes") from None
    if key == "retries":
        if whole and value >= 0:
            return int(value)
        raise ValueError(f"retries must be a whole number ≥ 0, not {kind_of(value)}", "e.g. retries: 2")
    if isinstance(value, bool) or (value is None and key == "streaming"):
        return value
    raise ValueError(f"{key} must be true or false, not {kind_of(value)}", f"write {key}: true or {key}: false")
