"""The action registry: what an action name in a workflow means.

A name resolves, in order, to a function registered with ``@nbflow.action``
(the built-ins ``data.*`` register themselves the same way), a callable found
by name in the namespace the caller passes (the notebook's), or an importable
``package.module:function``.

Three kinds of action:

``chunk``  ``f(df: pandas.DataFrame, **params) -> pandas.DataFrame``, applied to
           each chunk (the default for plain functions). With ``streaming: false``
           the engine concatenates every chunk of the input into one in-memory
           frame and calls ``f`` once: the naive mode users start from.
``whole``  ``f(data, **params)`` gets the whole input: the Dask DataFrame when
           streaming, a single pandas DataFrame with ``streaming: false``; with
           several ``needs`` it gets a dict of them by step name.
``step``   ``f(ctx: StepContext, **params)``, for built-ins that read, check or
           write: returns a Dask DataFrame (checkpointed by the engine) or an
           ``Effect`` (work done chunk by chunk, then one ``finish``).
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import inspect
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from nbflow.errors import ActionNotFound

KINDS = ("chunk", "whole", "step")


@dataclass(frozen=True)
class Action:
    name: str
    func: Callable
    kind: str = "chunk"
    #: default for the step's ``streaming`` setting when the workflow gives none
    streaming: bool = True
    description: str = ""
    #: ``f(params) -> "parquet" | "arrow" | None``: the checkpoint format this action
    #: would like its input in (data.load to Parquet copies Parquet parts as they are)
    input_format: Callable[[Mapping[str, Any]], str | None] | None = field(default=None, compare=False)
    #: a ``step`` action whose chunk i depends on its input's chunk i alone (or that reads a
    #: source in chunks): the engine may run it in one pass with its neighbours, like a
    #: ``chunk`` action (see ``nbflow/engine/fusion.py``)
    chunkwise: bool = field(default=False, compare=False)
    #: a chunk-wise check (data.validate): ``f(**params) -> (check, finish)``, where
    #: ``check(df, chunk)`` gives the chunk's frame and ``finish`` is its Effect's finish;
    #: a pass applies them to each chunk itself instead of building the step's graph
    chunk_check: Callable[..., tuple[Callable, Callable]] | None = field(default=None, compare=False)
    #: a sink that can take its input chunk by chunk (data.load to Parquet):
    #: ``f(**params) -> make(ctx) -> AtomicWriter``, or None when it needs the whole input
    chunk_sink: Callable[..., Callable[[StepContext], Any] | None] | None = field(default=None, compare=False)
    #: ``f(params) -> names | None``: what the function's ``**kwargs`` take, given its params
    #: (data.extract's pandas read options, data.load's Arrow write options); None: anything
    options: Callable[[Mapping[str, Any]], list[str] | None] | None = field(default=None, compare=False)
    #: ``f(params) -> [(param, message, hint), ...]``: what is wrong with the params' values
    #: (data.validate's schema), checked when the workflow is planned
    param_check: Callable[[Mapping[str, Any]], list[tuple[str, str, str]]] | None = field(
        default=None, compare=False)
    #: ``f(error, params, workdir) -> clearer error | None``: said in the action's own terms
    #: (data.extract names the line of the file a parser error in a Dask task counted from its block)
    explain: Callable[[BaseException, Mapping[str, Any], Path], BaseException | None] | None = field(
        default=None, compare=False)

    def fingerprint(self) -> str:
        """A hash of the action's code: its source text where Python can find it.

        A function redefined in a notebook cell gets a new source, so its steps'
        cache keys change; a function without source falls back to its bytecode.
        """
        func = inspect.unwrap(self.func)
        try:
            code = inspect.getsource(func)
        except (OSError, TypeError, SyntaxError, tokenize.TokenError):
            # no file, a builtin, or a lambda whose enclosing lines don't tokenize alone
            code_obj = getattr(func, "__code__", None)
            code = repr((code_obj.co_code, code_obj.co_consts)) if code_obj else repr(func)
        return hashlib.sha256(f"{self.kind}\0{code}".encode()).hexdigest()[:16]


@dataclass
class StepContext:
    """What a ``step`` action gets besides its params."""

    step: Any  # nbflow.spec.StepSpec
    inputs: dict[str, Any]  # upstream step name -> Dask DataFrame, in ``needs`` order
    chunk_size: int
    streaming: bool
    workdir: Path = field(default_factory=Path.cwd)
    namespace: Mapping[str, Any] | None = None
    #: unique to this step's work (its cache key and attempt): names its Dask tasks
    token: str = ""

    @property
    def input(self):
        """The single input of a step with one ``needs``."""
        if len(self.inputs) != 1:
            raise ValueError(f"step '{self.step.name}' has {len(self.inputs)} inputs, expected 1")
        return next(iter(self.inputs.values()))

    def path(self, value: str | Path) -> Path:
        return in_workdir(self.workdir, value)


def in_workdir(workdir: str | Path, value: str | Path) -> Path:
    """A workflow's path: ``~`` expanded, relative ones taken from ``workdir``."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path(workdir) / path


@dataclass
class Effect:
    """Work an action does chunk by chunk with a side effect, then commits once.

    ``chunks`` is a Dask DataFrame with one small pandas frame per chunk (whatever
    ``finish`` needs; a ``records`` column, if present, counts the chunk's records
    for progress). The engine computes it, concatenates the per-chunk frames and
    calls ``finish(results)``, which raises to fail the step or returns a dict of
    facts for the step record (``records_out`` among them). ``output`` is what
    downstream steps read: the input itself for a check, ``None`` for a sink.
    A check's ``finish`` (``passthrough``) only judges its frames: the engine may
    also call it on one chunk's frame, to hold that chunk back from the next step.
    """

    chunks: Any
    finish: Callable[[Any], dict | None]
    output: Any = None
    #: when ``output`` is this step's input unchanged, the checkpoint points at the input's
    passthrough: bool = False
    #: undoes the chunks' side effects when the step fails before ``finish``
    abort: Callable[[], None] | None = None


_REGISTRY: dict[str, Action] = {}


def action(name: str | None = None, *, kind: str = "chunk", streaming: bool = True,
           input_format: Callable[[Mapping[str, Any]], str | None] | None = None,
           chunkwise: bool = False, chunk_check: Callable[..., tuple[Callable, Callable]] | None = None,
           chunk_sink: Callable[..., Callable | None] | None = None,
           options: Callable[[Mapping[str, Any]], list[str] | None] | None = None,
           param_check: Callable[[Mapping[str, Any]], list[tuple[str, str, str]]] | None = None,
           explain: Callable[[BaseException, Mapping[str, Any], Path], BaseException | None] | None = None):
    """Register a function as a workflow action.

    >>> @action("demo.double")
    ... def double(df):
    ...     return df * 2
    >>> resolve("demo.double").kind
    'chunk'
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")

    def register(func: Callable) -> Callable:
        key = name or func.__name__
        _REGISTRY[key] = Action(key, func, kind, streaming, (func.__doc__ or "").strip(), input_format,
                                chunkwise, chunk_check, chunk_sink, options, param_check, explain)
        func.__nbflow_action__ = _REGISTRY[key]
        return func

    return register


def _builtins_loaded() -> None:
    import nbflow.actions.data  # noqa: F401  (registers data.extract, data.load)
    import nbflow.actions.validate  # noqa: F401  (registers data.validate)
    import nbflow.demo  # noqa: F401  (registers demo.*)


def registered() -> dict[str, Action]:
    _builtins_loaded()
    return dict(_REGISTRY)


def resolve(name: str, namespace: Mapping[str, Any] | None = None) -> Action:
    """The action a workflow's ``action:`` names; ``ActionNotFound`` with suggestions."""
    _builtins_loaded()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if namespace is not None and name in namespace and callable(namespace[name]):
        func = namespace[name]
        declared = getattr(func, "__nbflow_action__", None)
        if declared is not None:
            return Action(name, func, declared.kind, declared.streaming, declared.description)
        return Action(name, func, "chunk", True, (getattr(func, "__doc__", None) or "").strip())
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
            func = getattr(module, attr)
        except (ImportError, AttributeError, ValueError):
            func = None
        if callable(func):
            declared = getattr(func, "__nbflow_action__", None)
            kind = declared.kind if declared else "chunk"
            stream = declared.streaming if declared else True
            return Action(name, func, kind, stream, (func.__doc__ or "").strip())
    raise ActionNotFound(name, suggest(name, namespace))


def suggest(name: str, namespace: Mapping[str, Any] | None = None) -> list[str]:
    names = list(registered())
    if namespace:
        names += [k for k, v in namespace.items()
                  if callable(v) and not k.startswith("_") and inspect.isfunction(v)]
    return difflib.get_close_matches(name, names, n=3, cutoff=0.6)


def check(name: str, namespace: Mapping[str, Any] | None = None) -> list[str] | None:
    """None when ``name`` resolves, else the suggestions (for spec validation)."""
    try:
        resolve(name, namespace)
    except ActionNotFound as err:
        return list(err.suggestions)
    return None


def _named_transform(ctx: StepContext, function: str, **params):
    """Apply the function named in ``params.function`` to every chunk.

    The plan resolves ``function`` and runs it as the step's action (so its code
    is part of the cache key); this body only runs if called outside a plan.
    """
    raise TypeError(f"{ctx.step.action} is run by the engine: it applies '{function}' to each chunk")


action("data.transform", kind="step")(_named_transform)
action("data.transform_streaming", kind="step")(_named_transform)
