"""Recognise an out-of-memory failure from the exception itself.

The runner needs only a yes/no to pick exit code 3 and status oom; reading the numbers out of
the message of every PyTorch era is `diagnosis`'s job.
"""

from __future__ import annotations

import torch

# Text that marks an allocator failure, by backend; the rest of each message varies by release.
_OOM_MARKERS = (
    "out of memory",  # CUDA, HIP, XPU: "CUDA out of memory. Tried to allocate ..."
    "can't allocate memory",  # CPU: "DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes"
    "MPS backend out of memory",
)


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(marker in str(error) for marker in _OOM_MARKERS)
