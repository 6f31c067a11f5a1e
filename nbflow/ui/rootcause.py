"""Views of a RootCause: text (log, ``nbflow show``, papermill), a short log form, and HTML.

Each says, in order: what happened, where, why (the factors with their numbers),
and exactly what to change (the fixes, the top one as a diff). The HTML escapes
every string: messages, code lines and column names come from the user's data.
"""
from __future__ import annotations

import html
import textwrap

from nbflow.units import format_size

WIDTH = 100
MEMORY_ERRORS = ("MemoryBudgetExceeded", "MemoryError")

#: how the hints say "rerun": None for Python calls (notebooks, scripts, papermill); the CLI
#: sets its command (``nbflow rerun``, with ``--store`` when it is not the default)
_rerun_command: str | None = None
#: the run handle's name in Python hints: ``%%workflow`` binds ``workflow_run`` (or ``--name``)
_handle = "run"


def phrase_for_shell(command: str | None = "nbflow rerun") -> None:
    """Make the hints shell commands (``nbflow rerun RUN --fix 1``): what a terminal user types."""
    global _rerun_command
    _rerun_command = command


def phrase_for_python(handle: str = "run") -> None:
    """Make the hints Python calls on the variable ``handle`` (``workflow_run.rerun()``)."""
    global _rerun_command, _handle
    _rerun_command, _handle = None, handle


def rerun_hint(rc) -> str:
    return f"{_rerun_command} {rc.run_id or 'latest'}" if _rerun_command else f"{_handle}.rerun()"


def apply_hint(rc, n: int = 1) -> str:
    """How to rerun with fix ``n`` (numbered from 1, as the text lists them) applied."""
    if _rerun_command:
        return f"{_rerun_command} {rc.run_id or 'latest'} --fix {n}"
    return f"{_handle}.rerun({_handle}.apply_fix({n - 1}))"


def fix_refusal(run, number: int) -> str | None:
    """Why fix ``number`` (from 1, as the root cause lists them) can't be applied to ``run``'s
    workflow (``--fix N``); None if it can."""
    fixes, root = run.fixes, run.root_cause
    if not fixes:
        return f"run {run.run_id} has no fixes to apply ({run.status}, nothing failed)"
    if not 1 <= number <= len(fixes):
        return f"there is no fix {number}: run {run.run_id} has {len(fixes)} (--fix 1 to {len(fixes)})"
    fix = fixes[number - 1]
    if fix.workflow is None:
        return (f"fix {number} changes your code, not the workflow: {fix.title}"
                + (f" ({fix.snippet})" if fix.snippet and fix.kind != "rerun" else "")
                + f"; change it, then {rerun_hint(root)}")
    return None


def _snippet(rc, fix) -> str:
    return rerun_hint(rc) if fix.kind == "rerun" else (fix.snippet or "")


def _wrap(text: str, indent: str, first: str | None = None) -> list[str]:
    first = indent if first is None else first
    return textwrap.wrap(text, WIDTH, initial_indent=first, subsequent_indent=indent,
                         break_long_words=False, break_on_hyphens=False) or [first.rstrip()]


def _where(rc) -> list[str]:
    loc = rc.location
    if not loc:
        return []
    function = f", in {loc['function']}" if loc.get("function") else ""
    lines = [f"Where:    {loc['where']}{function}"]
    if loc.get("code"):
        lines.append(f"            {loc['code']}")
    stack = rc.stack_trace or {}
    path = _call_path(rc)
    if path:
        lines += _wrap(f"called as {path}", " " * 12, " " * 10)
    if stack.get("library_frames"):
        folded = ", ".join(f"{k} {v}" for k, v in (stack.get("folded") or {}).items())
        lines.append(f"          ({stack['library_frames']} library frames folded: {folded})")
    return lines


def _call_path(rc) -> str:
    """Your frames, outermost first, when the failure passed through more than one."""
    frames = (rc.stack_trace or {}).get("frames") or []
    if len(frames) < 2:
        return ""
    return " → ".join(f"{f['function']} ({f['where']})" for f in frames[-4:])


def _memory(rc) -> list[str]:
    m = rc.memory_stats or {}
    if not m.get("peak_above_baseline") and not m.get("at_failure"):
        return []
    share = m["peak_above_baseline"] / m["budget"] if m.get("budget") and m.get("peak_above_baseline") else 0
    if rc.error_type not in MEMORY_ERRORS and share < 0.5:
        return []  # memory had nothing to do with it
    human = m.get("human") or {}
    parts = [f"peak {human.get('peak_above_baseline', '?')} above a {human.get('baseline', '?')} baseline"]
    if m.get("budget"):
        share = m["peak_above_baseline"] / m["budget"] if m.get("peak_above_baseline") else 0
        parts.append(f"budget {human.get('budget')} ({share:.0%})")
    if m.get("samples"):
        over = f" over {m['seconds']:.1f} s" if m.get("seconds") else ""
        parts.append(f"{m['samples']} samples{over}")
    if m.get("growth_per_second"):
        parts.append(f"growing {format_size(m['growth_per_second'])}/s")
    return [f"Memory:   {', '.join(parts)}"]


def _input(rc) -> list[str]:
    i = rc.input or {}
    if i.get("records") is None and not i.get("path"):
        return []
    if i.get("records") is None:
        return [f"Input:    {i['path']}"]
    bits = [f"{i['records']:,} records"]
    if i.get("inputs"):
        bits[0] += f" from {', '.join(i['inputs'])}"
    if i.get("chunks"):
        bits.append(f"{i['chunks']} chunk{'s' if i['chunks'] != 1 else ''} of ≤ {i.get('records_per_chunk', 0):,}")
    if i.get("bytes"):
        bits.append(f"{format_size(i['bytes'])} on disk")
    if i.get("bytes_per_record_in_memory"):
        bits.append(f"~{i['bytes_per_record_in_memory']:,.0f} B/record in memory")
    mode = {"in-memory": "processed in memory (streaming: false)",
            "chunked": f"processed in chunks (chunk_size: {i.get('chunk_size') or '?'})",
            "streaming": "streamed"}.get(rc.processing_mode, "")
    return _wrap("; ".join(bits) + (f" — {mode}" if mode else ""), " " * 10, "Input:    ")


def render_text(rc) -> str:
    attempts = f" (after {rc.attempts} attempts)" if rc.attempts > 1 else ""
    message = (rc.message or "").strip().splitlines() or [""]
    what = "was interrupted" if rc.error_type == "RunInterrupted" else "failed"
    lines = _wrap(f"Root cause: {rc.step} {what}{attempts}: {rc.error_type}: {message[0]}", "    ", "")
    lines += [f"    {m}" for m in message[1:6]]
    if rc.summary and not rc.summary.startswith(f"{rc.step} failed: {rc.error_type}: "):
        lines += _wrap(rc.summary, "  ")  # what happened, in the run's own terms
    lines.append("")
    lines += _where(rc) + _memory(rc) + _input(rc)
    if rc.upstream_status:
        lines.append("Upstream: " + ", ".join(f"{k} {v}" for k, v in rc.upstream_status.items()))
    if rc.contributing_factors:
        lines += ["", "Why:"]
        for n, factor in enumerate(rc.contributing_factors, 1):
            lines += _wrap(factor.text, "     ", f"  {n}. ")
    if rc.resolution_options:
        lines += ["", "What to change (most likely to work first):"]
        for n, fix in enumerate(rc.resolution_options, 1):
            lines += _wrap(f"{fix.title} [{fix.confidence:.0%}]", "     ", f"  {n}. ")
            for snippet in _snippet(rc, fix).splitlines():
                lines.append(f"       {snippet}")
            lines += _wrap(fix.estimate, "       ", "       ")
    if rc.workflow_diff:
        lines += ["", "Corrected workflow (fix 1), as a diff:"]
        lines += [f"  {line}" for line in rc.workflow_diff.rstrip("\n").splitlines()]
        if rc.resolution_options and rc.resolution_options[0].workflow is not None:
            others = sum(f.workflow is not None for f in rc.resolution_options) > 1
            lines.append(f"  apply it: {apply_hint(rc)}"
                         + (" (or another option's number)" if others and _rerun_command else ""))
    if rc.blocked:
        lines += ["", f"Skipped because of it: {', '.join(rc.blocked)}"]
    return "\n".join(lines)


def render_log(rc, factors: int = 2) -> list[str]:
    """The few lines the text log prints under a failure: the top factors and the top fix."""
    lines = [f"Why: {f.text}" for f in rc.contributing_factors[:factors]]
    if rc.resolution_options:
        fix = rc.resolution_options[0]
        snippet = _snippet(rc, fix)
        what = snippet.replace("\n", " ") if snippet else fix.title
        lines.append(f"Fix: {what} — {fix.estimate.split(': ', 1)[0]}")
        if fix.workflow is not None and rc.error_type != "RunInterrupted":
            lines.append(f"Apply it: {apply_hint(rc)}")
    return lines


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def render_html(rc) -> str:
    what = "was interrupted" if rc.error_type == "RunInterrupted" else "failed"
    parts = [f"<div class='nbflow-rootcause'><div><b>Root cause: {_e(rc.step)} {what}</b>: "
             f"<code>{_e(rc.error_type)}</code></div>",
             f"<p>{_e(rc.summary or rc.message)}</p>"]
    if rc.message and rc.message != rc.summary:
        parts.append(f"<pre class='nbflow-message'>{_e(rc.message)}</pre>")
    rows = []
    if rc.location:
        code = f"<pre>{_e(rc.location.get('code'))}</pre>" if rc.location.get("code") else ""
        path = _call_path(rc)
        rows.append(("Where", f"<code>{_e(rc.location['where'])}</code>"
                     + (f" in <code>{_e(rc.location['function'])}</code>" if rc.location.get("function") else "")
                     + code + (f"<div class='nbflow-why'>called as {_e(path)}</div>" if path else "")))
    for label, lines in (("Memory", _memory(rc)), ("Input", _input(rc))):
        if lines:
            rows.append((label, _e(" ".join(line.split(":", 1)[1].strip() for line in lines[:1])
                                  + " " + " ".join(x.strip() for x in lines[1:]))))
    if rc.upstream_status:
        rows.append(("Upstream", _e(", ".join(f"{k} {v}" for k, v in rc.upstream_status.items()))))
    if rows:
        parts.append("<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
                     + "</table>")
    if rc.contributing_factors:
        parts.append("<div><b>Why</b><ol>" + "".join(
            f"<li class='nbflow-factor' data-rule='{_e(f.rule)}'>{_e(f.text)}</li>"
            for f in rc.contributing_factors) + "</ol></div>")
    if rc.resolution_options:
        items = []
        for fix in rc.resolution_options:
            snippet = f"<pre>{_e(_snippet(rc, fix))}</pre>" if fix.snippet else ""
            items.append(f"<li class='nbflow-fix'><b>{_e(fix.title)}</b> "
                         f"<span class='nbflow-why'>({fix.confidence:.0%})</span>{snippet}"
                         f"<div class='nbflow-why'>{_e(fix.estimate)}</div></li>")
        parts.append("<div><b>What to change</b><ol>" + "".join(items) + "</ol></div>")
    if rc.workflow_diff:
        parts.append("<details><summary>Corrected workflow (fix 1)</summary>"
                     f"<pre class='nbflow-diff'>{_e(rc.workflow_diff)}</pre></details>")
    if rc.blocked:
        parts.append(f"<p>Skipped because of it: {_e(', '.join(rc.blocked))}</p>")
    parts.append("</div>")
    return "".join(parts)
