"""Owner tags: a process of this machine that is gone is told from one still running."""
from __future__ import annotations

import os
import subprocess
import sys

from nbflow.owner import gone, owner


def test_this_process_and_a_live_one_are_not_gone():
    assert owner().endswith(f"-{os.getpid()}") and not gone(owner())
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert not gone(f"{owner().split('-')[0]}-{proc.pid}")
    finally:
        proc.communicate(b"")
    assert gone(f"{owner().split('-')[0]}-{proc.pid}")  # reaped: that pid runs nothing now


def test_what_cannot_be_judged_is_never_gone():
    assert not gone(None) and not gone("") and not gone("abc")
    assert not gone(f"{owner().split('-')[0]}-notapid")
    assert not gone("00000000-1")  # another machine's process 1
