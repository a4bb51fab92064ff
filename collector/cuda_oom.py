"""CUDA out-of-memory capture: the allocator's own view at the failing allocation.

`torch._C._cuda_attach_out_of_memory_observer` calls us before the exception is raised, while
the allocator state is intact (REFERENCE §1); the snapshot and stats taken there show what held
memory at the failure, which is gone by the time an `except` clause runs. The observer can fire
more than once for one failure: the first capture is kept. Allocation history is recorded with
Python stacks only (C++ stacks can make a snapshot take minutes on big jobs). NVML is read there
too when the run has it, so the post-mortem shows what the driver saw at the failure (other
processes included), not a reading up to a second old.
"""

from __future__ import annotations

import gzip
import logging
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from collector.allocator import mem_get_info, memory_stats_now

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CudaOomCapture:
    taken_at: float
    requested_bytes: int
    device_free_bytes: int | None
    device_total_bytes: int | None
    allocator_stats: dict[str, int]
    snapshot: dict | None
    # NVML's view at the same moment (device used, this process's used), when NVML is open.
    nvml: dict | None = None


class CudaOomObserver:
    """Attach once per process; `capture` holds the first OOM's state, or None."""

    def __init__(
        self,
        device: torch.device,
        history_max_entries: int,
        nvml_now: Callable[[], dict | None] | None = None,
    ):
        self.device = device
        self._nvml_now = nvml_now
        self.capture: CudaOomCapture | None = None
        self.history_enabled = False
        if history_max_entries > 0:
            try:
                torch.cuda.memory._record_memory_history(
                    enabled="all", context="all", stacks="python", max_entries=history_max_entries
                )
                self.history_enabled = True
            except Exception as error:  # noqa: BLE001 - history is a bonus, never a reason to fail
                log.info("allocator history unavailable: %s", error)
        torch._C._cuda_attach_out_of_memory_observer(self._observe)

    def _observe(self, device: int, alloc: int, device_allocated: int, device_free: int) -> None:
        """Never raises: torch turns an exception from the observer into the error the training
        step sees, which would hide the out-of-memory error it is there to describe."""
        if self.capture is not None:
            return
        try:
            self.capture = self._capture(int(alloc))
        except Exception as error:  # noqa: BLE001 - see the docstring
            log.warning("could not capture the allocator state at the OOM: %r", error)

    def _capture(self, requested_bytes: int) -> CudaOomCapture:
        try:
            free, total = mem_get_info(self.device)
        except Exception:  # noqa: BLE001 - the driver may refuse while out of memory
            free, total = None, None
        snapshot = None
        if self.history_enabled:
            try:
                snapshot = torch.cuda.memory._snapshot()
            except Exception as error:  # noqa: BLE001
                log.warning("could not take the allocator snapshot at the OOM: %s", error)
        nvml = None
        if self._nvml_now is not None:
            try:
                nvml = self._nvml_now()
            except Exception as error:  # noqa: BLE001 - the capture goes on without NVML
                log.warning("could not read NVML at the OOM: %s", error)
        try:
            stats = memory_stats_now(self.device)
        except Exception as error:  # noqa: BLE001 - the rest of the capture still says a lot
            log.warning("could not read the allocator stats at the OOM: %s", error)
            stats = {}
        return CudaOomCapture(
            taken_at=time.time(),
            requested_bytes=requested_bytes,
            device_free_bytes=free,
            device_total_bytes=total,
            allocator_stats=stats,
            snapshot=snapshot,
            nvml=nvml,
        )


def save_snapshot(snapshot: dict, path: Path, max_bytes: int) -> tuple[int | None, str | None]:
    """Write a gzip-compressed pickle of our own snapshot (builtin types only); refuse past a cap.

    Returns (bytes written or None, a note saying why not)."""
    data = gzip.compress(pickle.dumps(snapshot, protocol=4), compresslevel=6)
    if len(data) > max_bytes:
        return None, f"snapshot is {len(data):,} bytes compressed, over the {max_bytes:,}-byte cap: not kept"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return len(data), None
