"""Byte sizes at the edges: parse "8GB", "1.5GiB", "25%" and format bytes for people.

This is the only place that turns human sizes into ints; everything inside works in int bytes.
"""
from __future__ import annotations

import re

from .errors import BudgetError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([a-zA-Z]*|%)\s*$")


def parse_size(value: int | float | str, *, total_bytes: int | None = None,
               what: str = "budget") -> int:
    """Parse a size such as ``"512MB"``, ``"1.5GiB"``, ``123456`` or ``"25%"`` into bytes.

    Args:
        value: an int byte count, or a string with a decimal (KB, MB, GB, TB = powers of 1000)
            or binary (KiB, MiB, GiB, TiB = powers of 1024) unit, or a percentage.
        total_bytes: what a percentage is a percentage of (the model's weight bytes).
        what: the name used in error messages.

    Raises:
        BudgetError: the value is malformed, not positive, or a percentage with no total.
    """
    if isinstance(value, bool):
        raise BudgetError(f"{what} must be a size such as '512MB', not {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise BudgetError(f"{what} must be positive, got {value!r}")
        return int(value)
    match = _PATTERN.match(str(value))
    if not match:
        raise BudgetError(
            f"cannot read {what} {value!r}: use a byte count or a size such as "
            "'512MB', '8GB', '1.5GiB' or '25%' (a percentage of the model's weights)")
    number, unit = float(match.group(1)), match.group(2).lower()
    if unit == "%":
        if total_bytes is None:
            raise BudgetError(f"{what} {value!r} is a percentage, but the model size is unknown here")
        if not 0 < number <= 100:
            raise BudgetError(f"{what} {value!r}: a percentage must be in (0, 100]")
        return int(total_bytes * number / 100)
    if unit not in _UNITS:
        raise BudgetError(
            f"cannot read {what} {value!r}: unknown unit {match.group(2)!r}; "
            "use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB")
    result = int(number * _UNITS[unit])
    if result <= 0:
        raise BudgetError(f"{what} must be positive, got {value!r}")
    return result


def format_bytes(nbytes: int | float) -> str:
    """Format bytes with a decimal unit, e.g. ``2.20 GB``; decimal to match disk vendors."""
    value = float(nbytes)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")
