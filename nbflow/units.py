"""Memory sizes: parse ``512MB``, ``1.5GiB``, ``4Gi``; print them back for people."""
from __future__ import annotations

import re

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3,
    "ti": 1024**4, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([A-Za-z]*)\s*$")


def parse_size(value) -> int:
    """Bytes in a memory size.

    >>> parse_size("512MB"), parse_size("1.5GiB"), parse_size("4Gi"), parse_size(1024)
    (512000000, 1610612736, 4294967296, 1024)
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a memory size")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"{value!r} is not a positive number of bytes")
        return value
    if isinstance(value, float):
        raise ValueError(f"{value!r} is not a memory size (write e.g. 512MB)")
    match = _SIZE.match(str(value))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise ValueError(f"{value!r} is not a memory size (write e.g. 512MB, 2GB, 1.5GiB or 4Gi)")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"{value!r} is not a positive memory size")
    return size


def format_size(nbytes: float | None) -> str:
    """A size for people, in decimal units like the budgets users write.

    >>> format_size(512_000_000), format_size(1_530_000), format_size(None)
    ('512 MB', '1.5 MB', '?')
    """
    if nbytes is None:
        return "?"
    sign = "-" if nbytes < 0 else ""
    n = abs(float(nbytes))
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            text = f"{n:.0f}" if unit == "B" or n >= 100 else f"{n:.1f}".rstrip("0").rstrip(".")
            return f"{sign}{text} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
