"""The run's memory budget (`memory.limit_gb`), made real so that exceeding it is a real failure.

On CUDA: `set_per_process_memory_fraction`, so the caching allocator raises a genuine
OutOfMemoryError (with "X allowed;" in its message) past the cap. On the CPU: a soft
RLIMIT_DATA, so the CPU allocator's mmap fails and torch raises "DefaultCPUAllocator: can't
allocate memory". It is applied once the model is built (building imports modules lazily, and an
import failing for memory tells nobody anything) and set to (data mapped now − the model's tensor
bytes) + budget: the weights count against the budget as they would on a GPU, the interpreter
and libraries do not. Allocations of libraries during training (thread stacks, malloc arenas)
still count, so the CPU budget is approximate; its baseline is recorded with the run.
"""

from __future__ import annotations

import resource
from typing import Any

import torch

BYTES_PER_GIB = 1024**3


def _mapped_data_bytes() -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def apply_memory_limit(limit_gb: float | None, device: torch.device, tensor_bytes: int = 0) -> dict[str, Any]:
    """Install the budget; `tensor_bytes` are the model's tensors already allocated on the CPU.
    Returns how it was applied, for the run's environment record."""
    if limit_gb is None:
        return {"kind": "none"}
    limit_bytes = int(limit_gb * BYTES_PER_GIB)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = min(1.0, limit_bytes / total)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        return {"kind": "cuda_memory_fraction", "limit_bytes": limit_bytes, "fraction": fraction}
    mapped = _mapped_data_bytes()
    if mapped is None:
        return {"kind": "unavailable", "reason": "no /proc/self/status VmData on this system"}
    baseline = max(0, mapped - tensor_bytes)
    soft = baseline + limit_bytes
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
    return {"kind": "rlimit_data", "limit_bytes": limit_bytes, "baseline_bytes": baseline, "rlimit_bytes": soft}


def lift_cpu_limit() -> None:
    """Give the process its memory back after a failure so the end of the run can be recorded."""
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (hard, hard))
