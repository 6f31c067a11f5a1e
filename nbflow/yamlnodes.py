"""Workflow YAML as nodes that know where they were written, and how to word what is wrong.

``compose`` gives the node tree (libyaml's parser where PyYAML has it);
``syntax_error`` turns a parser error into one problem with the offending line
and a caret; the rest find a node's position, its children, and words for a
message: "did you mean ...", "the number 0", "a list".
"""
from __future__ import annotations

import difflib
import re
import unicodedata
from typing import Any

import yaml

from nbflow.errors import Problem, SpecError

NULL = "tag:yaml.org,2002:null"


#: libyaml's parser, where PyYAML was built with it: the same nodes and marks, ~8x faster
_FAST_LOADER = getattr(yaml, "CSafeLoader", None)


def compose(text: str) -> yaml.Node | None:
    """The YAML's node tree (None for an empty document); raises yaml.YAMLError."""
    if _FAST_LOADER is not None:
        try:
            return yaml.compose(text, Loader=_FAST_LOADER)
        except yaml.YAMLError:
            pass  # the pure-Python parser says what is wrong in the words users are shown
    return yaml.compose(text, Loader=yaml.SafeLoader)


_SYNTAX_HINTS = (
    ("'\\t'", "indent with spaces, not tabs"),
    ("mapping values are not allowed", "indent a nested key under its parent, or quote a value that has ': '"),
    ("expected <block end>", "line this up with the keys above it"),
)


def syntax_error(err: yaml.YAMLError, text: str, filename: str) -> SpecError:
    """One problem at the error's position, with the offending line and a caret as the excerpt."""
    if not (isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None):
        # a ReaderError (a control character): its own message says where
        return SpecError([Problem(f"invalid YAML: {err}", hint="remove the control character")], filename)
    line, column = err.problem_mark.line, err.problem_mark.column
    what = err.problem or err.context or "invalid YAML"
    hint = next((advice for clue, advice in _SYNTAX_HINTS if clue in what), "check the indentation and quoting")
    source = text.splitlines()  # not empty: compose raised on something
    if line >= len(source):  # an error at the very end: show the last line
        line, column = len(source) - 1, len(source[-1])
    pad = "".join(c if c == "\t" else " " for c in source[line][:column])
    excerpt = f"{line + 1:>5} | {source[line]}\n      | {pad}^"
    return SpecError([Problem(f"invalid YAML: {what}", line + 1, column + 1, hint)], filename, excerpt)


def position(where: yaml.Node | yaml.Mark) -> tuple[int, int]:
    mark = getattr(where, "start_mark", where)
    return mark.line + 1, mark.column + 1


def position_in(source: str, token: str, node: yaml.Node) -> tuple[int, int]:
    """1-based line and column of ``token`` in a scalar's source text (quoted, folded or plain)."""
    offset = source.find(token)
    if offset < 0:  # written with escapes: point at the value
        return position(node)
    before = source[:offset]
    if "\n" in before:
        return node.start_mark.line + before.count("\n") + 1, offset - before.rfind("\n")
    return node.start_mark.line + 1, node.start_mark.column + offset + 1


def children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [value for _, value in node.value]
    return node.value if isinstance(node, yaml.SequenceNode) else []


def is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == NULL


def close_matches(word: Any, choices: Any) -> list[str]:
    return difflib.get_close_matches(str(word), [str(c) for c in choices], n=3, cutoff=0.6)


def safe_name(name: str) -> str:
    """``name`` as a step name may be written (letters, digits, '-', '_'): 'Étape 1' -> 'Etape-1'."""
    ascii_only = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return re.sub(r"[^A-Za-z0-9_-]+", "-", ascii_only).strip("-") or "step"


def did_you_mean(close: list[str]) -> str:
    return f"did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def kind_of(value: Any) -> str:
    """How a message names a wrong value: "the number 0", "'maybe'", "a list", ..."""
    if value is None or isinstance(value, bool):
        return {None: "nothing (null)", True: "true", False: "false"}[value]
    if isinstance(value, (int, float, str)):
        return repr(value) if isinstance(value, str) else f"the number {value}"
    return {dict: "a mapping", list: "a list"}.get(type(value), type(value).__name__)
