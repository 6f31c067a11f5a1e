"""Which process on which machine writes a run or an output, and whether it still runs.

A run's ``run.json`` and a writer's temporary names carry an owner tag,
``<host hash>-<pid>``. A process killed outright (SIGKILL, the OOM killer, a
closed laptop) can't say it stopped; its tag lets the next process tell a run
or a half-written output that is still being worked on from one left behind.
Only a process of this machine can be judged: another machine's tag, or none,
is never taken for a dead one.
"""
from __future__ import annotations

import hashlib
import os
import socket

_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def owner() -> str:
    """This process's tag: ``<host hash>-<pid>``."""
    return f"{_HOST}-{os.getpid()}"


def gone(tag: str | None) -> bool:
    """True if ``tag`` names a process of this machine that no longer runs."""
    host, _, pid = (tag or "").partition("-")
    if host != _HOST or not pid.isdigit():
        return False  # another machine's, or not a tag: can't tell
    if int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False
