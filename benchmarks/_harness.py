"""What both benchmarks share: run one measurement in a fresh process and watch its memory.

A child prints one line ``BENCH-RESULT {json}`` with what it measured itself
(wall time of the work, after its imports); the parent samples the child's RSS
with psutil and reaps it with ``os.wait4``, whose rusage is that child's own
(``getrusage(RUSAGE_CHILDREN)`` is the largest of all children reaped so far,
so it cannot tell one run from the next).
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

MARK = "BENCH-RESULT "
SAMPLE_EVERY = 0.02  # seconds between the parent's RSS samples
MB = 1_000_000


@dataclass
class Measured:
    """One child run: its own report, and the memory the parent saw."""

    returncode: int
    result: dict[str, Any] = field(default_factory=dict)
    peak_rss: int = 0  # bytes, the highest sampled RSS
    maxrss: int = 0  # bytes, the kernel's high-water mark for this child (wait4)
    process_wall: float = 0.0  # seconds from spawn to exit, interpreter start and imports included
    cpu: float = 0.0  # user + system seconds of the whole child (wait4): less noisy than wall
    samples: int = 0
    output: str = ""

    @property
    def wall(self) -> float:
        return float(self.result.get("wall", "nan"))


def report(**result: Any) -> None:
    """In a child: hand the parent what it measured."""
    print(MARK + json.dumps(result), flush=True)


def run_child(args: list[str], *, timeout: float = 3600) -> Measured:
    """Run ``python <args>`` in a fresh process, sampling its RSS every 20 ms."""
    with tempfile.TemporaryFile("w+") as out:
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT)
        watched = psutil.Process(proc.pid)
        peak = samples = 0
        status = 0
        usage = None
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                try:
                    peak = max(peak, watched.memory_info().rss)
                    samples += 1
                except psutil.Error:  # exited between wait4 and the sample
                    pass
                if time.perf_counter() - started > timeout:
                    proc.kill()
                time.sleep(SAMPLE_EVERY)
        except BaseException:  # Ctrl-C: don't leave the child running
            proc.kill()
            proc.wait()
            raise
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    result: dict[str, Any] = {}
    for line in text.splitlines():
        if line.startswith(MARK):
            result = json.loads(line[len(MARK):])
    maxrss = usage.ru_maxrss * 1024 if usage is not None else 0  # KiB on Linux
    cpu = usage.ru_utime + usage.ru_stime if usage is not None else 0.0
    return Measured(proc.returncode, result, peak, maxrss, wall, cpu, samples, text)


def children_maxrss() -> int:
    """``getrusage(RUSAGE_CHILDREN)``'s high-water mark in bytes: the largest child so far."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]  # drop NaN (a failed run)
    return statistics.median(values) if values else float("nan")


def rotations(names: list[str], repeat: int) -> list[list[str]]:
    """Interleaved order: every repetition runs each variant once, starting one further on,
    so a noisy minute and the warm-cache position fall on all of them alike."""
    return [names[i % len(names):] + names[:i % len(names)] for i in range(repeat)]


def mb(value: float) -> str:
    return f"{value / MB:,.0f} MB"


def machine() -> dict[str, Any]:
    import platform

    return {"cpus": os.cpu_count(), "ram": psutil.virtual_memory().total,
            "python": platform.python_version(), "platform": platform.platform(),
            "load_avg": os.getloadavg()}


def versions(*names: str) -> dict[str, str]:
    import importlib

    found = {}
    for name in names:
        try:
            found[name] = importlib.import_module(name).__version__
        except (ImportError, AttributeError):
            found[name] = "-"
    return found


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")
