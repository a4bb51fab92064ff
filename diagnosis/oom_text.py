"""The few numbers the runner needs from an out-of-memory message at capture time.

Messages by backend and era (see ../shared/REFERENCE.md §1); sizes are `N bytes` or
`%.2f KiB|MiB|GiB`, and the requested size is the allocator's rounded request:
  CPU:          "DefaultCPUAllocator: can't allocate memory: you tried to allocate 536870912 bytes."
  CUDA <= 2.0:  "CUDA out of memory. Tried to allocate 3.90 GiB (GPU 0; 39.59 GiB total capacity; ..."
  CUDA >= 2.1:  "CUDA out of memory. Tried to allocate 2.00 MiB. GPU 0 has a total capacity of ..."
  ROCm / XPU:   "HIP out of memory. Tried to allocate ..." / "XPU out of memory. Tried to allocate ..."
The full parser for every era (issue #4) extends this module rather than duplicating it.
"""

from __future__ import annotations

import re

_UNITS = {"B": 1, "bytes": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4}
_SIZE = r"(?P<value>\d+(?:\.\d+)?)\s*(?P<unit>bytes|B|KiB|MiB|GiB|TiB)"
_REQUEST_PATTERNS = (
    re.compile(r"you tried to allocate\s+" + _SIZE),
    re.compile(r"Tried to allocate\s+" + _SIZE),
)


def size_to_bytes(value: str, unit: str) -> int:
    return round(float(value) * _UNITS[unit])


def requested_bytes(message: str) -> int | None:
    """The size of the allocation that failed, or None if the message does not say."""
    for pattern in _REQUEST_PATTERNS:
        match = pattern.search(message)
        if match:
            return size_to_bytes(match["value"], match["unit"])
    return None
