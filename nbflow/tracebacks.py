"""Find the user's line in a traceback: the innermost frame not in nbflow or a library."""
from __future__ import annotations

import linecache
import os
import re
import sys
import sysconfig
import traceback
from dataclasses import dataclass

_LIBRARY_DIRS = tuple({os.path.realpath(p) for p in (
    sysconfig.get_paths().get("stdlib"), sysconfig.get_paths().get("platstdlib"),
    sysconfig.get_paths().get("purelib"), sysconfig.get_paths().get("platlib"),
) if p})
_NBFLOW_DIR = os.path.dirname(os.path.realpath(__file__))
_DEMO_FILE = os.path.join(_NBFLOW_DIR, "demo.py")
_IPYKERNEL_CELL = re.compile(r"ipykernel_\d+[/\\]\d+\.py$|<ipython-input-")


@dataclass(frozen=True)
class Frame:
    filename: str
    line: int
    function: str
    source: str
    user: bool

    @property
    def where(self) -> str:
        """``path:line``, or ``Cell In[5], line 12`` for code typed in a notebook cell."""
        cell = cell_name(self.filename)
        return f"{cell}, line {self.line}" if cell else f"{self.filename}:{self.line}"


def is_user_file(filename: str) -> bool:
    if filename.startswith("<") and not filename.startswith("<ipython-input"):
        return False
    if filename.endswith((".pyx", ".pxd", ".pxi")) or not (
            os.path.isabs(filename) or _IPYKERNEL_CELL.search(filename) or os.path.exists(filename)):
        return False  # compiled code (pyarrow's Cython names its sources relative): a library's
    path = os.path.realpath(filename)
    if path == _DEMO_FILE:
        return True  # the demo's transforms stand for the user's code
    if path.startswith(_NBFLOW_DIR + os.sep):
        return False
    return not any(path.startswith(d + os.sep) for d in _LIBRARY_DIRS)


def cell_name(filename: str) -> str | None:
    """``Cell In[5]`` for code typed in a notebook cell, as IPython names it; else None."""
    if not _IPYKERNEL_CELL.search(filename):
        return None
    try:
        from IPython import get_ipython

        shell = get_ipython()
        compiler = getattr(shell, "compile", None)
        number = compiler._filename_map.get(filename) if compiler is not None else None
    except Exception:  # a name is a nicety; never fail a diagnosis for it
        number = None
    return f"Cell In[{number}]" if number is not None else "a notebook cell"


def frames(exc: BaseException) -> list[Frame]:
    result = []
    for fs in traceback.extract_tb(exc.__traceback__):
        source = fs.line or linecache.getline(fs.filename, fs.lineno or 0).strip()
        result.append(Frame(fs.filename, fs.lineno or 0, fs.name, source or "", is_user_file(fs.filename)))
    return result


def user_frame(exc: BaseException) -> Frame | None:
    """The innermost frame in the user's code, following the exception's cause chain."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        found = [f for f in frames(exc) if f.user]
        if found:
            return found[-1]
        exc = exc.__cause__ or exc.__context__
    return None


def format_exception(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def main_is_interactive() -> bool:
    return hasattr(sys, "ps1") or "ipykernel" in sys.modules
