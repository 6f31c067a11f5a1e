"""Let a widget's clicks reach the kernel while a cell is still running.

A ``%%workflow`` cell blocks the kernel's main shell until the run ends, and the
front end sends widget messages to that shell: a click on Cancel would wait in
the queue until there was nothing left to cancel. ipykernel 7 runs *subshells*
(Jupyter's kernel subshells, JEP 91): extra shells, each with its own thread and
event loop, fed by the kernel's shell-channel thread, which routes each comm
message to the shell its comm names (``Comm._reply_subshell_for``). We start one
subshell per kernel, on the shell-channel thread as a ``create_subshell_request``
would, and route the Cancel button's comm to it: the click is handled there at
once, while the main shell is still busy with the cell.

Kernels without subshells (ipykernel 6, terminal IPython, nbclient's tests)
get ``None`` and the button works once the kernel is free; stopping the cell
itself is then the kernel's interrupt. ``NBFLOW_SUBSHELL=0`` turns this off.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
from typing import Any

log = logging.getLogger(__name__)

_lock = threading.Lock()
_subshells: dict[int, str] = {}  # id(kernel) -> the subshell we started in it


def _kernel() -> Any | None:
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    shell = get_ipython()
    return getattr(shell, "kernel", None)


def subshell_id(timeout: float = 5.0) -> str | None:
    """Our subshell in this kernel (started on first use), or None where there are none."""
    if os.environ.get("NBFLOW_SUBSHELL", "1").lower() in ("0", "false", "no", "off"):
        return None
    kernel = _kernel()
    if kernel is None or not getattr(kernel, "_supports_kernel_subshells", False):
        return None
    with _lock:
        known = _subshells.get(id(kernel))
        if known is not None:
            return known
        try:
            channel = kernel.shell_channel_thread
            manager = channel.manager  # created lazily, on the thread that started the kernel
            created: concurrent.futures.Future[str] = concurrent.futures.Future()

            def create() -> None:  # runs on the shell-channel thread, as the kernel requires
                try:
                    created.set_result(manager._create_subshell())
                except BaseException as err:  # noqa: BLE001 — handed to the waiting caller
                    created.set_exception(err)

            channel.io_loop.add_callback(create)
            found = created.result(timeout)
        except Exception:  # noqa: BLE001 — an ipykernel we don't know: clicks wait their turn
            log.debug("no kernel subshell for nbflow's widgets", exc_info=True)
            return None
        _subshells[id(kernel)] = found
        return found


def route_to_subshell(widget) -> bool:
    """Handle ``widget``'s messages from the front end on our subshell (True if routed)."""
    sid = subshell_id()
    comm = getattr(widget, "comm", None)
    if sid is None or comm is None or not hasattr(comm, "_reply_subshell_for"):
        return False

    def route(_data, _default, sid=sid):
        return sid

    comm._reply_subshell_for = route  # the instance's, not the class's: publish_msg can't reset it
    return True
