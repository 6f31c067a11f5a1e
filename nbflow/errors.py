"""The exceptions nbflow raises.

User mistakes (a bad workflow, an unknown action) carry where and what to do,
and print without our traceback. Every exception keeps its constructor
arguments in ``args`` so it survives a pickle round trip from a Dask worker.
"""
from __future__ import annotations

from dataclasses import dataclass


class NbflowError(Exception):
    """Root of every error nbflow raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a workflow, at a place in its source."""

    message: str
    line: int | None = None  # 1-based
    column: int | None = None  # 1-based
    hint: str | None = None

    def format(self, filename: str = "workflow.yaml") -> str:
        where = filename
        if self.line is not None:
            where += f", line {self.line}"
            if self.column is not None:
                where += f", column {self.column}"
        text = f"{where}: {self.message}"
        if self.hint:
            text += f" — {self.hint}"
        return text


class SpecError(NbflowError):
    """The workflow text is invalid; holds every problem found, not just the first."""

    def __init__(self, problems, filename: str = "workflow.yaml", excerpt: str | None = None):
        problems = list(problems)
        super().__init__(problems, filename, excerpt)
        self.problems = problems
        self.filename = filename
        self.excerpt = excerpt

    def __str__(self) -> str:
        lines = [p.format(self.filename) for p in self.problems]
        if len(lines) > 1:
            head = f"{len(lines)} problems in {self.filename}:"
            text = "\n".join([head] + [f"  {line}" for line in lines])
        else:
            text = lines[0] if lines else f"{self.filename}: invalid workflow"
        if self.excerpt:
            text += "\n" + self.excerpt
        return text


class ActionNotFound(NbflowError):
    """An action name resolves to nothing."""

    def __init__(self, name: str, suggestions=()):
        suggestions = tuple(suggestions)
        super().__init__(name, suggestions)
        self.name = name
        self.suggestions = suggestions

    def __str__(self) -> str:
        text = f"unknown action '{self.name}'"
        if self.suggestions:
            text += f" (did you mean {' or '.join(repr(s) for s in self.suggestions)}?)"
        text += (" — use a built-in (data.extract, data.validate, data.transform, data.load), "
                 "a function defined in the notebook, one registered with @nbflow.action, "
                 "or 'package.module:function'")
        return text


class StepError(NbflowError):
    """An action found a problem with its data or parameters (schema, missing file, ...).

    ``details`` is a plain dict the diagnosis reads (column, expected, found, ...).
    """

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message, details or {})
        self.message = message
        self.details = details or {}

    def __str__(self) -> str:
        return self.message


class SchemaError(StepError):
    """Data does not match the schema ``data.validate`` was given."""


class InputNotFound(StepError, FileNotFoundError):
    """An input path or glob matched no file."""


class MemoryBudgetExceeded(MemoryError, NbflowError):
    """A step's memory above its baseline crossed its ``max_memory`` budget."""

    def __init__(self, step: str = "", budget: int = 0, peak: int = 0, at_failure: int = 0,
                 records_done: int = 0, chunk: int | None = None, message: str | None = None):
        super().__init__(step, budget, peak, at_failure, records_done, chunk, message)
        self.step = step
        self.budget = budget
        self.peak = peak
        self.at_failure = at_failure
        self.records_done = records_done
        self.chunk = chunk
        self.message = message

    def __str__(self) -> str:
        if self.message:
            return self.message
        from nbflow.units import format_size

        where = f" in chunk {self.chunk}" if self.chunk is not None else ""
        return (f"step '{self.step}' used {format_size(self.peak)} above its baseline{where}, "
                f"over its max_memory budget of {format_size(self.budget)} "
                f"(after {self.records_done:,} records)")


class WorkflowFailed(NbflowError):
    """A run ended with a failed step; raised after the run's summary was shown."""

    def __init__(self, run_id: str, step: str | None = None, message: str = ""):
        super().__init__(run_id, step, message)
        self.run_id = run_id
        self.step = step
        self.message = message

    def __str__(self) -> str:
        what = f"step '{self.step}' failed" if self.step else "the workflow failed"
        text = f"run {self.run_id}: {what}"
        if self.message:
            text += f": {self.message}"
        return text


class RunBusy(NbflowError):
    """A run is still running in another process (or another handle): one writer at a time."""

    def __init__(self, run_id: str, owner: str = ""):
        super().__init__(run_id, owner)
        self.run_id = run_id
        self.owner = owner

    def __str__(self) -> str:
        pid = self.owner.rpartition("-")[2]
        where = f"in process {pid}" if pid.isdigit() else "elsewhere"
        return (f"run {self.run_id} is still running {where}; wait for it to end, or stop it "
                "(Ctrl-C there, or its Cancel button), then rerun")


class RunInterrupted(NbflowError):
    """A run was cancelled (KeyboardInterrupt or Run.cancel())."""

    def __init__(self, run_id: str = ""):
        super().__init__(run_id)
        self.run_id = run_id

    def __str__(self) -> str:
        return f"run {self.run_id} was cancelled"
