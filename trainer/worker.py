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
from dataclasses import dataclass
from functools import partial
from typing import Any

import psutil
import torch

from collector.allocator import device_name, device_total_bytes
from collector.monitor import StepMonitor
from collector.nvml import NvmlSampler, NvmlUnavailable, open_nvml
from collector.sink import RecordSink
from collector.tensors import unique_storage_bytes
from db import open_engine
from db.queries import get_run
from db.writes import add_dropped, end_run, heartbeat, update_run, write_records
from trainer import exit_codes
from trainer.config import ConfigError, RunConfig, validate_config
from trainer.data import DataSetupError
from trainer.environment import describe_environment
from trainer.loop import DeviceSetupError, resolve_device, setup, train
from trainer.memory_limit import apply_memory_limit, lift_cpu_limit
from trainer.models import ModelSetupError
from trainer.oom import is_out_of_memory

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


class Worker:
    """One run, from its database row to its final status."""

    def __init__(self, run_id: int, db_url: str):
        self.run_id = run_id
        self.engine = open_engine(db_url)
        self.sink: RecordSink | None = None
        self.sampler: NvmlSampler | None = None
        self.monitor: StepMonitor | None = None

    def _start(self, cfg: RunConfig) -> torch.device:
        device = resolve_device(cfg.train.device)
        name, total = _describe_device(device)
        self.sink = RecordSink(
            partial(write_records, self.engine, self.run_id),
            on_idle=partial(heartbeat, self.engine, self.run_id),
            on_drop=partial(add_dropped, self.engine, self.run_id),
        )
        self.sampler, nvml = _open_device_sampler(cfg, device, self.sink.put)
        self.environment = describe_environment(device) | {"nvml": nvml}
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
        self.monitor = StepMonitor(
            model,
            training.optimizer,
            device,
            self.sink.put,
            track_activations=cfg.monitor.track_activations,
        )
        train(training, self.monitor)

    def run(self) -> int:
        run = get_run(self.engine, self.run_id)
        if run is None:
            log.error("run %s not found in the database", self.run_id)
            return exit_codes.FAILED
        signal.signal(signal.SIGTERM, _raise_stop)
        signal.signal(signal.SIGINT, _raise_stop)
        try:
            cfg = validate_config(run.config)
            self._train(cfg)
            outcome = Outcome("completed", exit_codes.COMPLETED)
        except StopRequested as stop:
            outcome = Outcome("stopped", exit_codes.STOPPED, f"stopped by {stop}")
        except BaseException as error:  # noqa: BLE001 - every failure must end as a recorded status
            outcome = self._classify(error, traceback.format_exc())
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
        end_run(self.engine, self.run_id, outcome.status, error_text=outcome.error_text, exit_code=outcome.exit_code)


def run_worker(run_id: int, db_url: str) -> int:
    # transformers 5 deprecates a name that peft still calls once per step; not the user's problem.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    return Worker(run_id, db_url).run()
