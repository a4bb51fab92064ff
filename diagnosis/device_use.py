"""What the driver (NVML) saw on the card at a failure, in words, for every screen that shows it.

The allocator's own figures cover this process only; NVML also sees the CUDA context and other
processes, which is where "free" memory went when the allocator's sums do not add up. The
dashboard and `trainer postmortem` both print this, so the arithmetic lives once, here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from diagnosis.units import human_bytes


@dataclass(frozen=True)
class DeviceUse:
    """`text` is the reading ("70.0 GiB of 80.0 GiB in use, …") or, without one, why not."""

    available: bool
    text: str
    taken: str  # when it was read: "at the failing allocation", "after the failure", …


def device_use_at_failure(nvml: Mapping[str, Any] | None) -> DeviceUse | None:
    """None for a post-mortem that predates the field."""
    if not nvml:
        return None
    taken = str(nvml.get("taken") or "taken")
    if not nvml.get("available"):
        return DeviceUse(False, str(nvml.get("reason") or "not recorded"), taken)
    used, total, mine = nvml.get("memory_used_bytes"), nvml.get("memory_total_bytes"), nvml.get("process_used_bytes")
    parts = [f"{human_bytes(used)} of {human_bytes(total)} in use"]
    if mine is not None:
        parts.append(f"{human_bytes(mine)} by this process")
        if used is not None and used > mine:
            parts.append(f"{human_bytes(used - mine)} by others (other processes, or the driver)")
    return DeviceUse(True, ", ".join(parts), taken)
