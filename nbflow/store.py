"""The run store: ``.nbflow/runs/<run-id>/`` holds everything needed to show or rerun a run.

- ``run.json``: the workflow text, resolved parameters, status and per-step records
  (rewritten atomically at each step transition);
- ``events.jsonl``: every event, appended and flushed as it happens;
- ``memory.jsonl``: the memory samples;
- ``checkpoints/<step>-<key>/``: a completed step's output as part files (``parts.py``),
  with ``_nbflow.json`` written last: a checkpoint without it is not trusted.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from nbflow import events as ev
from nbflow.errors import NbflowError
from nbflow.owner import gone

RUN_FILE = "run.json"
EVENTS_FILE = "events.jsonl"
MEMORY_FILE = "memory.jsonl"
CHECKPOINT_META = "_nbflow.json"


def home(override: str | os.PathLike | None = None) -> Path:
    """The store root: ``--store``, else ``$NBFLOW_HOME``, else ``./.nbflow``."""
    if override:
        return Path(override).expanduser().resolve()
    if os.environ.get("NBFLOW_HOME"):
        return Path(os.environ["NBFLOW_HOME"]).expanduser().resolve()
    return (Path.cwd() / ".nbflow").resolve()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``path`` whole or not at all: a killed or crashed process never leaves half a file.

    No fsync: run.json is rewritten at every step event, and fsync while the steps write their
    parts waits for those too (tens of ms each here). Like the part files it describes, it may
    lose its last writes to an OS crash or power cut, never its shape.
    """
    text = json.dumps(data, indent=1, default=str)  # one write: json.dump writes every token
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def still_running(data: dict[str, Any]) -> bool:
    """True if a run's record says it is running and the process writing it may still be: it
    runs on this machine, or it is another machine's (which can't be judged from here).
    A record of a process that is gone, or without an owner (an older nbflow), is not."""
    tag = data.get("owner")
    return data.get("status") == "running" and bool(tag) and not gone(tag)


class RunNotFound(NbflowError):
    def __init__(self, run_id: str, root: str, known=()):
        super().__init__(run_id, root, tuple(known))
        self.run_id, self.root, self.known = run_id, root, tuple(known)

    def __str__(self) -> str:
        text = f"no run '{self.run_id}' in {self.root}"
        if self.known:
            text += f" — recent runs: {', '.join(self.known[:5])} (see `nbflow runs`)"
        else:
            text += " — there are no runs there yet; check --store / NBFLOW_HOME"
        return text


class RunDir:
    """One run's folder. Thread-safe appends: steps and the sampler emit concurrently."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.run_id = self.path.name
        self._lock = threading.Lock()
        self._events_fh = None
        self._memory_fh = None

    # -- writing -----------------------------------------------------------
    def create(self) -> RunDir:
        (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)
        return self

    def discard_if_empty(self) -> None:
        """Remove the folder of a run that never started (no record, no checkpoint)."""
        if not (self.path / RUN_FILE).exists() and not any((self.path / "checkpoints").iterdir()):
            shutil.rmtree(self.path, ignore_errors=True)

    def write_run(self, data: dict[str, Any]) -> None:
        with self._lock:
            write_json_atomic(self.path / RUN_FILE, data)

    def append_event(self, event: ev.Event) -> None:
        line = json.dumps(event.to_dict(), default=str)
        with self._lock:
            if isinstance(event, ev.MemorySampled):
                if self._memory_fh is None:
                    self._memory_fh = open(self.path / MEMORY_FILE, "a", encoding="utf-8")
                self._memory_fh.write(line + "\n")
                self._memory_fh.flush()
                return
            if self._events_fh is None:
                self._events_fh = open(self.path / EVENTS_FILE, "a", encoding="utf-8")
            self._events_fh.write(line + "\n")
            self._events_fh.flush()

    def close(self) -> None:
        with self._lock:
            for fh in (self._events_fh, self._memory_fh):
                if fh is not None:
                    fh.close()
            self._events_fh = self._memory_fh = None

    # -- checkpoints -------------------------------------------------------
    def checkpoint_dir(self, step: str, key: str) -> Path:
        return self.path / "checkpoints" / f"{step}-{key[:16]}"

    def discard_stale_checkpoints(self, step: str, keep: Path | None) -> None:
        """Remove a step's older checkpoints once a newer one is committed."""
        for old in (self.path / "checkpoints").glob(f"{step}-*"):
            if old != keep and re.fullmatch(re.escape(step) + r"-[0-9a-f]{16}", old.name):
                shutil.rmtree(old, ignore_errors=True)

    # -- reading -----------------------------------------------------------
    def read_run(self) -> dict[str, Any]:
        with open(self.path / RUN_FILE, encoding="utf-8") as fh:
            return json.load(fh)

    def read_events(self) -> Iterator[ev.Event]:
        yield from self._read_lines(self.path / EVENTS_FILE)

    def read_memory(self) -> list[ev.MemorySampled]:
        return list(self._read_lines(self.path / MEMORY_FILE))

    @staticmethod
    def _read_lines(path: Path) -> Iterator[ev.Event]:
        if not path.exists():
            return
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    yield ev.Event.from_dict(json.loads(line))
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a crash: the rest of the record still reads


def read_checkpoint_meta(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """The checkpoint's metadata, or None when it is missing or incomplete."""
    if not path:
        return None
    meta_file = Path(path) / CHECKPOINT_META
    try:
        with open(meta_file, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, ValueError):
        return None
    alias = meta.get("alias")
    if alias and read_checkpoint_meta(alias) is None:
        return None
    return meta


def new_run_id(workflow: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", workflow.lower()).strip("-")[:24] or "run"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}-{secrets.token_hex(2)}"


class RunStore:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = home(root)
        self.runs_dir = self.root / "runs"

    def new_run(self, workflow: str) -> RunDir:
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        return RunDir(self.runs_dir / new_run_id(workflow)).create()

    def run_ids(self) -> list[str]:
        if not self.runs_dir.exists():
            return []
        ids = [p.name for p in self.runs_dir.iterdir() if (p / RUN_FILE).exists()]
        return sorted(ids, key=lambda rid: (self.runs_dir / rid / RUN_FILE).stat().st_mtime)

    def open(self, run_id: str | None = None) -> RunDir:
        """A run by id, unique prefix, or (``None``/``latest``) the most recent one."""
        ids = self.run_ids()
        if run_id in (None, "", "latest", "last"):
            if not ids:
                raise RunNotFound("latest", str(self.runs_dir))
            return RunDir(self.runs_dir / ids[-1])
        if run_id in ids:
            return RunDir(self.runs_dir / run_id)
        matches = [rid for rid in ids if rid.startswith(run_id) or rid.endswith(run_id)]
        if len(matches) == 1:
            return RunDir(self.runs_dir / matches[0])
        raise RunNotFound(run_id, str(self.runs_dir), known=list(reversed(ids)))

    def summaries(self) -> list[dict[str, Any]]:
        rows = []
        for rid in self.run_ids():
            try:
                data = RunDir(self.runs_dir / rid).read_run()
            except (OSError, ValueError):
                continue
            steps = data.get("steps", {})
            status = data.get("status")
            if status == "running" and not still_running(data):
                status = "cancelled"  # its process died mid-run (open_run says the same)
            rows.append({
                "run_id": rid, "workflow": data.get("workflow"), "status": status,
                "attempt": data.get("attempt"), "started": data.get("started"),
                "ended": data.get("ended"),
                "steps": len(steps),
                "failed": [n for n, s in steps.items() if s.get("status") == "failed"],
            })
        return rows
