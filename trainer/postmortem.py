"""Assembles the post-mortem at an out-of-memory failure from what the collector knows.

Runs inside the worker's `except` clause, after the CPU memory limit was lifted, while the
failing step's tensors are still referenced by the traceback: the breakdown "now" is the
breakdown at the failure. Everything becomes plain data so a reader needs neither torch nor us.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch

from collector.cuda_oom import CudaOomCapture, save_snapshot
from collector.monitor import StepMonitor
from collector.readings import PostMortem
from collector.whereabouts import Position
from diagnosis.findings import explain_failure
from diagnosis.oom_text import requested_bytes


def build_postmortem(
    *,
    error: BaseException,
    traceback_text: str,
    position: Position | None,
    monitor: StepMonitor | None,
    device: torch.device | None,
    cuda_capture: CudaOomCapture | None,
    snapshot_dir: Path,
    snapshot_max_bytes: int,
    nvml_now: Callable[[], dict | None] | None = None,
    nvml_unavailable: dict | None = None,
) -> PostMortem:
    """`nvml_now` reads NVML now (when the CUDA observer did not already at the failing
    allocation); `nvml_unavailable` is what the post-mortem says where there is no NVML reading."""
    message = str(error) or type(error).__name__
    recent = tuple(s.columns() for s in monitor.recent_steps) if monitor else ()
    batch = position.batch_shape if position else None
    finding = explain_failure(position.step if position else None, batch["seq_len"] if batch else None, list(recent))
    snapshot_path = snapshot_bytes = None
    if cuda_capture is None:
        snapshot_note = (
            "no CUDA allocator on this device: no snapshot"
            if device is None or device.type != "cuda"
            else "the allocator's OOM observer did not fire (the failure came from outside the CUDA allocator)"
        )
    elif cuda_capture.snapshot is None:
        snapshot_note = "allocator history was off (monitor.snapshot_max_entries: 0) or could not be taken"
    else:
        path = snapshot_dir / "oom_snapshot.pickle.gz"
        snapshot_bytes, snapshot_note = save_snapshot(cuda_capture.snapshot, path, snapshot_max_bytes)
        snapshot_path = str(path) if snapshot_bytes is not None else None
    host = monitor.host_now() if monitor else None
    return PostMortem(
        step=position.step if position else None,
        micro_batch=position.micro_batch if position else None,
        phase=position.phase if position else None,
        module=position.module if position else None,
        module_stack=position.module_stack if position else (),
        batch_shape=batch,
        requested_bytes=cuda_capture.requested_bytes if cuda_capture else requested_bytes(message),
        error_type=type(error).__name__,
        error_text=message,
        traceback=traceback_text,
        device=str(device) if device is not None else "unknown",
        device_total_bytes=cuda_capture.device_total_bytes if cuda_capture else None,
        device_free_bytes=cuda_capture.device_free_bytes if cuda_capture else None,
        allocator_stats=cuda_capture.allocator_stats if cuda_capture else None,
        tensors=dataclasses.asdict(monitor.breakdown_now()) if monitor else None,
        host={k: v for k, v in dataclasses.asdict(host).items() if k != "taken_at"} if host else None,
        nvml=_nvml_at_failure(cuda_capture, nvml_now, nvml_unavailable),
        recent_steps=recent,
        layer_profile=tuple(dataclasses.asdict(r) for r in monitor.layer_profile()) if monitor else (),
        snapshot_path=snapshot_path,
        snapshot_bytes=snapshot_bytes,
        snapshot_note=snapshot_note,
        finding=finding.text,
        finding_details=finding.details,
    )


def _nvml_at_failure(
    capture: CudaOomCapture | None, nvml_now: Callable[[], dict | None] | None, unavailable: dict | None
) -> dict | None:
    if capture is not None and capture.nvml is not None:
        return {"available": True, "taken": "at the failing allocation", **capture.nvml}
    reading = None
    if nvml_now is not None:
        try:
            reading = nvml_now()
        except Exception:  # noqa: BLE001 - a post-mortem goes on without it
            reading = None
    if reading is not None:
        return {"available": True, "taken": "after the failure", **reading}
    if unavailable is not None and unavailable.get("reason"):
        # Why the run has no GPU readings at all: no driver, no nvidia-ml-py, or a CPU run.
        return {"available": False, "reason": unavailable["reason"]}
    return {"available": False, "reason": "no NVML reading could be taken at the failure"}
