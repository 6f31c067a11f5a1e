"""Actions: what a workflow step does."""
from nbflow.actions.registry import Action, Effect, StepContext, action, registered, resolve

__all__ = ["Action", "Effect", "StepContext", "action", "registered", "resolve"]
