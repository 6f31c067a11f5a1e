"""Edit workflow text in place: change one value, add one key, keep everything else as written.

A corrected workflow must differ from the original only where the fix applies:
comments, key order, quoting and the other steps stay byte for byte, so the
unchanged steps keep their cache keys and the diff reads like a person's edit.
Nodes are found with ``yaml.compose`` (every node knows its span in the text)
and the edit replaces that span or inserts beside it.
"""
from __future__ import annotations

from typing import Any, Sequence

import yaml

Path_ = Sequence[Any]  # keys and list indexes from the root, e.g. ("steps", 2, "params", "path")


def dump(value: Any) -> str:
    """A value as YAML flow text: ``true``, ``80000``, ``records.csv``, ``"{x}"``, ``[a, b]``."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, allow_unicode=True)
    text = text.strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    return text.removesuffix("...").strip()


def node_at(text: str, path: Path_) -> yaml.Node | None:
    """The node at ``path`` (mapping keys and sequence indexes), or None."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    for part in path:
        node = _child(node, part)
        if node is None:
            return None
    return node


def _child(node: yaml.Node | None, part: Any) -> yaml.Node | None:
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int):
        return node.value[part] if 0 <= part < len(node.value) else None
    if isinstance(node, yaml.MappingNode):
        found = None
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                found = value  # the last one wins, as in YAML
        return found
    return None


def _key_node(mapping: yaml.MappingNode, key: str) -> tuple[yaml.Node, yaml.Node] | None:
    found = None
    for k, v in mapping.value:
        if isinstance(k, yaml.ScalarNode) and k.value == key:
            found = (k, v)
    return found


def replace(text: str, path: Path_, value: Any) -> str:
    """Replace the value at ``path`` (which must exist) with ``value``."""
    node = node_at(text, path)
    if node is None:
        raise KeyError(".".join(map(str, path)))
    return text[:node.start_mark.index] + dump(value) + text[node.end_mark.index:]


def set_key(text: str, path: Path_, key: str, value: Any) -> str:
    """Set ``key`` in the mapping at ``path``: replace its value, or add it after the last key."""
    mapping = node_at(text, path)
    if not isinstance(mapping, yaml.MappingNode):
        raise KeyError(".".join(map(str, path)))
    pair = _key_node(mapping, key)
    if pair is not None:
        node = pair[1]
        return text[:node.start_mark.index] + dump(value) + text[node.end_mark.index:]
    entry = f"{dump(key)}: {dump(value)}"
    if mapping.flow_style:
        close = text.rindex("}", 0, mapping.end_mark.index)
        before = text[mapping.start_mark.index + 1:close].strip()
        sep = ", " if before else ""
        return text[:close].rstrip(" ") + sep + entry + text[close:]
    if not mapping.value:
        raise KeyError(".".join(map(str, path)))
    first_key, _ = mapping.value[0]
    indent = first_key.start_mark.column
    last_value = mapping.value[-1][1]
    pos = last_value.end_mark.index
    if pos > 0 and text[pos - 1] == "\n":
        # a block value ends at the start of the next line; step back over trailing blank lines
        while pos > 1 and text[pos - 2] == "\n":
            pos -= 1
    else:
        newline = text.find("\n", pos)
        if newline < 0:
            return text + "\n" + " " * indent + entry + "\n"
        pos = newline + 1
    return text[:pos] + " " * indent + entry + "\n" + text[pos:]


def step_index(text: str, name: str) -> int | None:
    steps = node_at(text, ("steps",))
    if not isinstance(steps, yaml.SequenceNode):
        return None
    for i, node in enumerate(steps.value):
        value = _child(node, "name")
        if isinstance(value, yaml.ScalarNode) and value.value == name:
            return i
    return None


def set_step_setting(text: str, step: str, key: str, value: Any) -> str:
    """Set a step's setting where it takes effect without touching any other step.

    Precedence is step level > ``params`` > ``defaults``: an existing step-level
    key is replaced, else one in ``params``, else the key is added to the step's
    ``params`` mapping (or at step level when it has none). ``defaults:`` is
    never edited: every step would change.
    """
    index = step_index(text, step)
    if index is None:
        raise KeyError(step)
    here = ("steps", index)
    step_node = node_at(text, here)
    if isinstance(step_node, yaml.MappingNode) and _key_node(step_node, key) is not None:
        return set_key(text, here, key, value)
    params = _child(step_node, "params")
    if isinstance(params, yaml.MappingNode) and (params.value or params.flow_style):
        return set_key(text, (*here, "params"), key, value)
    return set_key(text, here, key, value)


def rename_key(text: str, path: Path_, old: str, new: str) -> str:
    """Rename key ``old`` of the mapping at ``path`` to ``new``, keeping its value as written."""
    mapping = node_at(text, path)
    pair = _key_node(mapping, old) if isinstance(mapping, yaml.MappingNode) else None
    if pair is None:
        raise KeyError(old)
    key = pair[0]
    return text[:key.start_mark.index] + dump(new) + text[key.end_mark.index:]
