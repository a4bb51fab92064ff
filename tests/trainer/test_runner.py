"""The runner end to end: real `python -m trainer run` subprocesses writing a real SQLite file."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from db import open_engine
from db.queries import get_run, list_runs, step_samples
from tests.conftest import subprocess_env, trainer_command

pytestmark = pytest.mark.slow

ISSUE_CONFIG = """
model:   {name: tiny-llama, dtype: fp32, attn_implementation: sdpa, gradient_checkpointing: false}
lora:    {r: 8, alpha: 16, dropout: 0.05, target_modules: [q_proj, v_proj]}
data:    {source: synthetic, seq_len: 256, vary_length: false}
train:   {micro_batch_size: 2, grad_accum_steps: 1, max_steps: 20, lr: 1.0e-4,
          optimizer: adamw, mixed_precision: "no", device: auto, seed: 0}
memory:  {limit_gb: null, alloc_conf: null}
monitor: {nvml_interval_s: 1.0}
"""


def run_trainer(tmp_path: Path, db_url: str, *overrides: str, config: str = ISSUE_CONFIG, timeout: float = 240):
    path = tmp_path / "run.yaml"
    path.write_text(config)
    args = ["run", "--config", str(path), "--db", db_url]
    for override in overrides:
        args += ["--set", override]
    return subprocess.run(trainer_command(*args), capture_output=True, text=True, timeout=timeout, env=subprocess_env())


def first_line_run_id(stdout: str) -> int:
    return int(stdout.splitlines()[0])


def test_issue_config_completes_with_plausible_steps(tmp_path, db_url):
    result = run_trainer(tmp_path, db_url)
    assert result.returncode == 0, result.stderr[-3000:]
    engine = open_engine(db_url)
    run = get_run(engine, first_line_run_id(result.stdout))
    assert run.status == "completed" and run.exit_code == 0
    assert run.device == "cpu" and run.device_total_bytes > 0 and run.pid > 0
    env = run.environment
    assert env["nvml"]["available"] is False and env["nvml"]["reason"]
    assert env["attn_implementation"] == "sdpa"
    assert env["versions"]["torch"] and env["trainable_parameters"] < env["parameters"]

    steps = step_samples(engine, run.id)
    assert [s.step for s in steps] == list(range(1, 21))
    for s in steps:
        assert s.rss_bytes > 0 and s.peak_rss_bytes >= s.rss_bytes * 0.5
        assert s.parameter_bytes > 0 and s.gradient_bytes > 0 and s.optimizer_state_bytes > 0
        assert s.activation_bytes > 0
        assert s.loss is not None and math.isfinite(s.loss)
        assert s.tokens == 2 * 256 and s.seq_len == 256 and s.step_seconds > 0 and s.tokens_per_s > 0
        # No CUDA allocator on the CPU: unavailable, not zero.
        assert s.allocated_bytes is None and s.peak_reserved_bytes is None
    # LoRA: gradients only for the adapters, far fewer bytes than the frozen base.
    assert steps[-1].gradient_bytes < steps[-1].parameter_bytes / 10
    # AdamW keeps two fp32 moments per trainable parameter (plus a step counter each).
    assert steps[-1].optimizer_state_bytes >= 2 * steps[-1].trainable_parameter_bytes


def test_invalid_config_exits_2_names_every_error_and_writes_no_run(tmp_path, db_url):
    result = run_trainer(
        tmp_path, db_url, "model.dtype=fp8", "train.micro_batch_size=0", "lora.target_modules=[c_attn]", "data.nope=1"
    )
    assert result.returncode == 2
    for key in ("model.dtype", "train.micro_batch_size", "lora.target_modules", "data.nope"):
        assert key in result.stderr
    assert result.stdout == ""
    assert list_runs(open_engine(db_url)) == []


def test_cuda_requested_without_cuda_is_refused_before_start(tmp_path, db_url):
    result = run_trainer(tmp_path, db_url, "train.device=cuda")
    if "CUDA is not available" not in result.stderr:
        pytest.skip("this machine has CUDA")
    assert result.returncode == 2
    assert list_runs(open_engine(db_url)) == []


def wait_for_steps(engine, run_id: int, count: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = get_run(engine, run_id)
        if run is not None and run.status != "running":
            raise AssertionError(f"run ended early: {run.status}: {run.error_text}")
        seen = len(step_samples(engine, run_id)) if run else 0
        if seen >= count:
            return seen
        time.sleep(0.2)
    raise AssertionError(f"fewer than {count} steps recorded in {timeout}s")


def start_trainer(tmp_path: Path, db_url: str, *overrides: str) -> tuple[subprocess.Popen, int]:
    path = tmp_path / "run.yaml"
    path.write_text(ISSUE_CONFIG)
    args = ["run", "--config", str(path), "--db", db_url]
    for override in overrides:
        args += ["--set", override]
    process = subprocess.Popen(
        trainer_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env()
    )
    return process, int(process.stdout.readline())


def test_sigterm_ends_as_stopped_with_samples_kept(tmp_path, db_url):
    process, run_id = start_trainer(tmp_path, db_url, "train.max_steps=100000")
    engine = open_engine(db_url)
    seen = wait_for_steps(engine, run_id, 5)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr[-3000:]
    run = get_run(engine, run_id)
    assert run.status == "stopped" and "SIGTERM" in run.error_text
    steps = step_samples(engine, run_id)
    assert len(steps) >= seen
    assert [s.step for s in steps] == list(range(1, len(steps) + 1))


def test_sigkill_of_the_trainer_is_recorded_as_killed(tmp_path, db_url):
    process, run_id = start_trainer(tmp_path, db_url, "train.max_steps=100000")
    engine = open_engine(db_url)
    wait_for_steps(engine, run_id, 3)
    worker_pid = get_run(engine, run_id).pid
    os.kill(worker_pid, signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGKILL
    run = get_run(engine, run_id)
    assert run.status == "killed" and run.signal_name == "SIGKILL"
    assert len(step_samples(engine, run_id)) >= 1
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"


def test_cpu_memory_limit_makes_a_real_allocation_failure(tmp_path, db_url):
    # Eager attention at 4,096 tokens stores 2 x 4 heads x 4096^2 fp32 scores per layer: 0.5 GiB,
    # twice a 256 MiB budget.
    result = run_trainer(
        tmp_path,
        db_url,
        "memory.limit_gb=0.25",
        "data.seq_len=4096",
        "model.attn_implementation=eager",
        "train.max_steps=2",
    )
    assert result.returncode == 3, result.stderr[-3000:]
    run = get_run(open_engine(db_url), first_line_run_id(result.stdout))
    assert run.status == "oom" and run.exit_code == 3
    assert "DefaultCPUAllocator: can't allocate memory" in run.error_text
    limit = run.environment["memory_limit"]
    assert limit["kind"] == "rlimit_data" and limit["limit_bytes"] == int(0.25 * 1024**3)


def test_unknown_architecture_fails_with_the_traceback_stored(tmp_path, db_url):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "no-such-architecture"}')
    result = run_trainer(tmp_path, db_url, f"model.name={model_dir}", "lora=null", "train.max_steps=1")
    assert result.returncode == 1
    run = get_run(open_engine(db_url), first_line_run_id(result.stdout))
    assert run.status == "failed" and "Traceback" in run.error_text and "no-such-architecture" in run.error_text


def test_quantization_on_cpu_is_refused_before_start(tmp_path, db_url):
    result = run_trainer(tmp_path, db_url, "train.device=cpu", "model.quantization=nf4", "train.num_gpus=2")
    assert result.returncode == 2
    assert "model.quantization" in result.stderr and "CUDA only" in result.stderr and "train.num_gpus" in result.stderr
    assert list_runs(open_engine(db_url)) == []
