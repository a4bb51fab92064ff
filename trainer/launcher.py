"""`python -m trainer run`: validate, record the run, start the worker, record how it died.

The launcher outlives the worker on purpose: SIGKILL, the kernel's OOM killer or a segfault give
the worker no chance to write its status, so the parent does it (status killed, with the signal).
The child is started from an argument list, never through a shell.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

from db import open_engine
from db.writes import create_run, end_run
from trainer.config import ConfigError, ConfigIssue, RunConfig, runner_issues


def _check_device_exists(cfg: RunConfig) -> None:
    """Refuse `train.device: cuda…` on a machine without CUDA before any run is recorded."""
    if not cfg.train.device.startswith("cuda"):
        return
    import torch  # only here: validating a CPU or auto config stays import-light

    if not torch.cuda.is_available():
        raise ConfigError([ConfigIssue("train.device", f"{cfg.train.device!r} requested but CUDA is not available")])


def worker_environment(cfg: RunConfig) -> dict[str, str]:
    env = dict(os.environ)
    if cfg.memory.alloc_conf:
        # The allocator reads its settings once, when CUDA initialises: set them before the child starts.
        env["PYTORCH_CUDA_ALLOC_CONF"] = cfg.memory.alloc_conf
        env.pop("PYTORCH_ALLOC_CONF", None)  # the newer name would take precedence over ours
    return env


def worker_command(run_id: int, db_url: str) -> list[str]:
    return [sys.executable, "-m", "trainer", "_worker", "--run-id", str(run_id), "--db", db_url]


def launch(cfg: RunConfig, db_url: str, *, name: str | None = None, parent_run_id: int | None = None) -> int:
    """Run one training to its end; returns the exit code (see trainer.exit_codes)."""
    issues = runner_issues(cfg)
    if issues:
        raise ConfigError(issues)
    _check_device_exists(cfg)
    engine = open_engine(db_url)
    run_id = create_run(engine, cfg.to_dict(), name=name, parent_run_id=parent_run_id)
    print(run_id, flush=True)
    child = subprocess.Popen(worker_command(run_id, db_url), env=worker_environment(cfg))

    def forward(signum: int, _frame: Any) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        returncode = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if returncode < 0:
        sig = signal.Signals(-returncode)
        end_run(
            engine,
            run_id,
            "killed",
            signal_name=sig.name,
            exit_code=returncode,
            error_text=f"the trainer process was killed by {sig.name}",
            only_if_running=True,
        )
        return 128 - returncode
    # A worker that exited without recording its end (os._exit, interpreter crash) is a failure.
    end_run(
        engine,
        run_id,
        "failed",
        exit_code=returncode,
        error_text=f"the trainer process exited with code {returncode} without recording its end",
        only_if_running=True,
    )
    return returncode
