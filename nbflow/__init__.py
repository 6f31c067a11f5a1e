"""nbflow: notebook-first workflows that run in chunks on Dask, keep every run, and explain failures."""
from nbflow.actions.registry import Effect, StepContext, action
from nbflow.errors import (
    ActionNotFound,
    InputNotFound,
    MemoryBudgetExceeded,
    NbflowError,
    SchemaError,
    SpecError,
    StepError,
    WorkflowFailed,
)
from nbflow.handle import Run, open_run, run
from nbflow.spec import WorkflowSpec, load, parse
from nbflow.state import Status

__version__ = "0.1.0"

__all__ = [
    "ActionNotFound", "Effect", "InputNotFound", "MemoryBudgetExceeded", "NbflowError", "Run",
    "SchemaError", "SpecError", "Status", "StepContext", "StepError", "WorkflowFailed",
    "WorkflowSpec", "action", "load", "open_run", "parse", "run",
]


def load_ipython_extension(ip):  # %load_ext nbflow
    from nbflow.magics import load
    load(ip)
