"""Byte sizes as users read them: binary units, never bare bytes or percentages."""

from __future__ import annotations

GIB = 1024**3
MIB = 1024**2
_UNITS = (("GiB", GIB), ("MiB", MIB), ("KiB", 1024))


def human_bytes(value: int | float | None) -> str:
    """'n/a' for an unavailable reading, so it never reads as zero."""
    if value is None:
        return "n/a"
    for unit, size in _UNITS:
        if abs(value) >= size:
            return f"{value / size:,.1f} {unit}"
    return f"{int(value)} B"
