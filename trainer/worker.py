"""The trainer process proper: reads its run from the database, trains, records how it ended.

Started by the launcher (`python -m trainer run`) as a child, so that a death this process cannot
report (SIGKILL, the kernel's OOM killer, a segfault) is still recorded by the parent. Whatever
happens here, everything already measured is flushed before the final status is written.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import torch

from collector.allocator import device_name, device_total_bytes
from collector.cuda_oom import CudaOomObserver
from collector.monitor import StepMonitor
from collector.nvml import NvmlSampler, NvmlUnavailable, open_nvml
from collector.sink import RecordSink
from collector.tensors import unique_storage_bytes
from db import open_engine
from db.engine import workspace_dir
from db.queries import get_run
from db.writes import add_dropped, end_run, heartbeat, record_postmortem, update_run, write_records
from trainer import exit_codes
from trainer.config import ConfigError, RunConfig, validate_config
from trainer.data import DataSetupError
from trainer.environment import describe_environment
from trainer.loop import DeviceSetupError, make_monitor, resolve_device, setup, train
from trainer.memory_limit import apply_memory_limit, lift_cpu_limit
from trainer.models import ModelSetupError
from trainer.oom import is_out_of_memory
from trainer.postmortem import build_postmortem

log = logging.getLogger(__name__)

# Failures that mean "this config cannot run here", found only once the model or data is opened.
_SETUP_ERRORS = (ModelSetupError, DataSetupError, DeviceSetupError)


class StopRequested(BaseException):
    """Raised in the main thread by SIGTERM/SIGINT: a BaseException so no `except Exception`
    in library code swallows it."""


@dataclass(frozen=True)
class Outcome:
    status: str
    exit_code: int
    error_text: str | None = None


def _raise_stop(signum: int, _frame: Any) -> None:
    raise StopRequested(signal.Signals(signum).name)


def _describe_device(device: torch.device) -> tuple[str | None, int | None]:
    if device.type == "cuda":
        return device_name(device), device_total_bytes(device)
    return f"CPU ({os.cpu_count()} cores)", psutil.virtual_memory().total


def _nvml_index(device: torch.device) -> int:
    """NVML numbers GPUs physically; torch's cuda:N follows CUDA_VISIBLE_DEVICES."""
    if device.type != "cuda":
        return 0
    try:
        return torch.cuda._get_nvml_device_index(device)
    except Exception:  # noqa: BLE001 - a private helper; fall back to the common case
        return device.index or 0


def _open_device_sampler(cfg: RunConfig, device: torch.device, publish: Any) -> tuple[NvmlSampler | None, dict]:
    nvml = open_nvml(_nvml_index(device))
    if isinstance(nvml, NvmlUnavailable):
        return None, {"available": False, "reason": nvml.reason}
    if device.type != "cuda":
        nvml.close()
        return None, {"available": True, "sampled": False, "reason": "the run is on the CPU; no GPU to sample"}
    sampler = NvmlSampler(nvml, publish, interval_s=cfg.monitor.nvml_interval_s)
    sampler.start()
    return sampler, {"available": True, "sampled": True, "gpu_index": device.index or 0}


def _snapshot_dir(url: Any, run_id: int) -> Path:
    """Snapshots live beside a SQLite file, else in the workspace."""
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        base = Path(url.database).parent
    else:
        base = workspace_dir()
    return base / "snapshots" / f"run-{run_id}"


class Worker:
    """One run, from its database row to its final status."""

    def __init__(self, run_id: int, db_url: str):
        self.run_id = run_id
        self.engine = open_engine(db_url)
        self.sink: RecordSink | None = None
        self.sampler: NvmlSampler | None = None
        self.monitor: StepMonitor | None = None
        self.cuda_oom: CudaOomObserver | None = None
        self.cfg: RunConfig | None = None
        self.device: torch.device | None = None
        self.postmortem = None

    def _start(self, cfg: RunConfig) -> torch.device:
        device = self.device = resolve_device(cfg.train.device)
        name, total = _describe_device(device)
        self.sink = RecordSink(
            partial(write_records, self.engine, self.run_id),
            on_idle=partial(heartbeat, self.engine, self.run_id),
            on_drop=partial(add_dropped, self.engine, self.run_id),
        )
        self.sampler, nvml = _open_device_sampler(cfg, device, self.sink.put)
        # The card's name rides in the environment too: a post-mortem's estimates read its compute
        # capability (the cuBLAS workspaces, diagnosis.workspaces) from there.
        self.environment = describe_environment(device) | {"nvml": nvml, "device_name": name}
        update_run(
            self.engine,
            self.run_id,
            started_at=time.time(),
            heartbeat_at=time.time(),
            pid=os.getpid(),
            host=socket.gethostname(),
            device=str(device),
            device_name=name,
            device_total_bytes=total,
            environment=self.environment,
        )
        return device

    def _train(self, cfg: RunConfig) -> None:
        device = self._start(cfg)
        training = setup(cfg, device)
        model = training.built.model
        model_bytes = unique_storage_bytes([*model.parameters(), *model.buffers()])
        limit = apply_memory_limit(cfg.memory.limit_gb, device, model_bytes if device.type == "cpu" else 0)
        self.environment = self.environment | {
            "memory_limit": limit,
            "attn_implementation": training.built.attn_implementation,
            "model_source": training.built.source,
            "parameters": sum(p.numel() for p in model.parameters()),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }
        update_run(self.engine, self.run_id, environment=self.environment)
        self.monitor = make_monitor(cfg, training, self.sink.put)
        if device.type == "cuda":
            self.cuda_oom = CudaOomObserver(device, cfg.monitor.snapshot_max_entries, nvml_now=self._nvml_now)
        train(training, self.monitor)

    def run(self) -> int:
        run = get_run(self.engine, self.run_id)
        if run is None:
            log.error("run %s not found in the database", self.run_id)
            return exit_codes.FAILED
        signal.signal(signal.SIGTERM, _raise_stop)
        signal.signal(signal.SIGINT, _raise_stop)
        try:
            cfg = self.cfg = validate_config(run.config)
            self._train(cfg)
            outcome = Outcome("completed", exit_codes.COMPLETED)
        except StopRequested as stop:
            outcome = Outcome("stopped", exit_codes.STOPPED, f"stopped by {stop}")
        except BaseException as error:  # noqa: BLE001 - every failure must end as a recorded status
            # Read where we are before anything else runs: hooks and phases move on.
            position = self.monitor.position(error) if self.monitor else None
            outcome = self._classify(error, traceback.format_exc())
            if outcome.status == "oom":
                lift_cpu_limit()  # the post-mortem needs memory to be written
                self.postmortem = self._postmortem(error, outcome.error_text, position)
        # From here on a second SIGTERM must not interrupt the flush that keeps the samples.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self._finish(outcome)
        return outcome.exit_code

    @staticmethod
    def _classify(error: BaseException, text: str) -> Outcome:
        if is_out_of_memory(error):
            return Outcome("oom", exit_codes.OUT_OF_MEMORY, text)
        if isinstance(error, (ConfigError, *_SETUP_ERRORS)):
            return Outcome("failed", exit_codes.INVALID_CONFIG, text)
        return Outcome("failed", exit_codes.FAILED, text)

    def _finish(self, outcome: Outcome) -> None:
        lift_cpu_limit()
        for close in (
            self.monitor.close if self.monitor else None,
            self.sampler.stop if self.sampler else None,
            self.sink.close if self.sink else None,
        ):
            if close is None:
                continue
            try:
                close()
            except Exception:  # noqa: BLE001 - a failing flush must not hide the run's status
                log.exception("while closing the collector")
        if self.postmortem is not None:
            try:
                record_postmortem(self.engine, self.run_id, self.postmortem, exit_code=outcome.exit_code)
                return
            except Exception:  # noqa: BLE001 - keep the status even if the post-mortem cannot be stored
                log.exception("could not store the post-mortem")
        end_run(self.engine, self.run_id, outcome.status, error_text=outcome.error_text, exit_code=outcome.exit_code)

    def _nvml_now(self) -> dict | None:
        reading = self.sampler.sample_now() if self.sampler is not None else None
        return asdict(reading) if reading is not None else None

    def _postmortem(self, error: BaseException, text: str, position: Any):
        try:
            return build_postmortem(
                error=error,
                traceback_text=text,
                position=position,
                monitor=self.monitor,
                device=self.device,
                cuda_capture=self.cuda_oom.capture if self.cuda_oom else None,
                snapshot_dir=_snapshot_dir(self.engine.url, self.run_id),
                snapshot_max_bytes=int(self.cfg.monitor.snapshot_max_mb * 1024**2) if self.cfg else 0,
                nvml_now=self._nvml_now,
                nvml_unavailable=(getattr(self, "environment", None) or {}).get("nvml"),
            )
        except Exception:  # noqa: BLE001 - a failed post-mortem must not lose the oom status
            log.exception("could not build the post-mortem")
            return None


def run_worker(run_id: int, db_url: str) -> int:
    # transformers 5 deprecates a name that peft still calls once per step; not the user's problem.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    return Worker(run_id, db_url).run()
