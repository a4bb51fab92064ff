"""The CUDA paths on a real GPU: the allocator probe in a real run, a fraction-capped OOM caught by
the observer with its snapshot and NVML reading, and the estimators against a measured step.

Run on a lent GPU with `pytest -m gpu` (scripts/gpu_check.sh does, in one call). Elsewhere each test
is skipped and says why; the CPU suite meets the same code through what a GPU run recorded
(tests/fixtures/gpu/, read by tests/diagnosis/test_gpu_fixtures.py).
"""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest
import torch

from db import open_engine
from db.queries import device_samples, get_postmortem, get_run, step_samples
from diagnosis.failed_request import postmortem_request
from diagnosis.oom_text import parse_oom
from diagnosis.snapshot import read_snapshot
from tests.conftest import subprocess_env, trainer_command
from trainer.config import validate_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with -m gpu on a lent one)"),
]


def run(db_url: str, *overrides: str) -> tuple[subprocess.CompletedProcess, int]:
    args = ["run", "--db", db_url, "--set", "train.device=cuda"]
    for override in overrides:
        args += ["--set", override]
    result = subprocess.run(trainer_command(*args), capture_output=True, text=True, timeout=600, env=subprocess_env())
    return result, int(result.stdout.splitlines()[0])


def test_a_cuda_run_records_the_allocator_every_step_and_nvml_beside_it(db_url):
    result, run_id = run(db_url, "train.max_steps=5", "monitor.nvml_interval_s=0.1")
    assert result.returncode == 0, result.stderr[-3000:]
    engine = open_engine(db_url)
    steps = step_samples(engine, run_id)
    assert [s.step for s in steps] == [1, 2, 3, 4, 5]
    for s in steps:
        assert s.allocated_bytes is not None and s.allocated_bytes > 0
        assert s.reserved_bytes >= s.allocated_bytes
        assert s.peak_allocated_bytes >= s.allocated_bytes and s.peak_reserved_bytes >= s.reserved_bytes
        assert s.num_ooms == 0 and s.num_alloc_retries is not None
        assert s.parameter_bytes > 0 and s.activation_bytes > 0
    nvml = get_run(engine, run_id).environment["nvml"]
    if nvml.get("sampled"):
        readings = device_samples(engine, run_id)
        assert readings and all(r.memory_total_bytes and r.memory_used_bytes for r in readings)
        assert any(r.process_used_bytes for r in readings), "this process's own memory was never found"
    else:
        assert nvml["reason"], "no NVML readings and no reason"


def test_a_fraction_capped_oom_is_caught_by_the_observer_with_its_snapshot_and_nvml(db_url):
    result, run_id = run(
        db_url, "memory.limit_gb=0.25", "model.attn_implementation=eager", "data.seq_len=4096", "train.max_steps=2"
    )
    assert result.returncode == 3, result.stderr[-3000:]
    engine = open_engine(db_url)
    assert get_run(engine, run_id).status == "oom"
    pm = get_postmortem(engine, run_id)
    assert (pm.step, pm.phase) == (1, "forward")
    assert pm.module is not None and pm.module.startswith("model.layers.0")
    assert pm.error_type == "OutOfMemoryError" and "CUDA out of memory" in pm.error_text
    message = parse_oom(pm.error_text)
    assert message is not None and message.device == 0
    # The message prints the request to two decimals of its unit; the observer has the exact bytes.
    assert message.requested_bytes == pytest.approx(pm.requested_bytes, rel=0.01)
    assert pm.allocator_stats and pm.allocator_stats["num_ooms"] >= 1
    assert pm.device_total_bytes > 0 and pm.device_free_bytes is not None
    assert pm.snapshot_path and Path(pm.snapshot_path).is_file(), pm.snapshot_note
    summary = read_snapshot(pm.snapshot_path)
    assert summary.ooms, "the observer's snapshot holds no oom event"
    assert summary.ooms[-1].requested_bytes == pytest.approx(pm.requested_bytes, abs=512)
    assert pm.nvml is not None
    if pm.nvml["available"]:
        assert pm.nvml["taken"] == "at the failing allocation"
        assert pm.nvml["process_used_bytes"] is None or pm.nvml["process_used_bytes"] > 0
    else:
        assert pm.nvml["reason"]
    # The observer's block is eager attention's scores, b × heads × s × s × 4 B, and is named so.
    (named,) = postmortem_request(dataclasses.asdict(pm), validate_config(get_run(engine, run_id).config))
    assert named.location == "attention", named


def test_a_cuda_oom_in_the_loss_is_placed_in_the_loss_and_its_request_named(db_url, tmp_path):
    """A 32k vocabulary under a 0.7 GiB cap: the step dies in the LM head or the loss over the logits,
    and the observer's exact block is one of the logits' b × s × V × 4 B tensors."""
    import transformers

    config = transformers.Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=32_000, max_position_embeddings=4096,
    )  # fmt: skip
    config.save_pretrained(tmp_path)
    result, run_id = run(
        db_url,
        f"model.name={tmp_path / 'config.json'}",
        "lora=null",
        "data.seq_len=1024",
        "train.micro_batch_size=4",
        "train.max_steps=1",
        "memory.limit_gb=0.7",
    )
    assert result.returncode == 3, result.stderr[-3000:]
    engine = open_engine(db_url)
    pm = get_postmortem(engine, run_id)
    assert pm.module in ("lm_head", "loss"), (pm.phase, pm.module, pm.traceback[-2000:])
    (named,) = postmortem_request(dataclasses.asdict(pm), validate_config(get_run(engine, run_id).config))
    assert named.location == "logits_loss" and dict(named.dims) == {"batch": 4, "tokens": 1024, "vocab": 32_000}


def test_the_estimators_meet_a_measured_steady_state_step():
    """A 1B model's LoRA step at 2k tokens: big enough that the CUDA context's own allocations
    (cuBLAS workspaces) are noise. The target is issue #4's: within 10% of peak allocated."""
    from bench.gpu_record import PEAK_CONFIGS, _config, measured_peak
    from diagnosis.analytic import estimate_analytic
    from diagnosis.traced import estimate_traced

    cfg = _config(PEAK_CONFIGS["llama-3.2-1b-lora-bf16-2k"])
    measured = measured_peak(cfg)
    gpu = torch.cuda.get_device_name()
    analytic = estimate_analytic(cfg, device="cuda", gpu=gpu)
    traced = estimate_traced(cfg, device="cuda", gpu=gpu)
    peak = measured["peak_allocated_bytes"]
    # Issue #4's target is 10%; on the H100 (torch 2.11) both came within 0.1% (tests/fixtures/gpu/).
    assert analytic.peak_allocated_bytes == pytest.approx(peak, rel=0.02), measured
    assert traced.peak_allocated_bytes == pytest.approx(peak, rel=0.02), measured
    reserve = measured["peak_reserved_bytes"] / peak - 1
    print(f"measured reserve {reserve:.1%} against the modelled {analytic.allocator_overhead_bytes / peak:.1%}")


def test_the_chunked_loss_saves_on_the_gpu_what_the_estimators_say():
    """train.loss_chunk_tokens on a real CUDA step: Llama 3.2's 128k vocabulary at 2 × 4k tokens with
    checkpointing, where the logits are most of the peak. Measured with and without, side by side."""
    from bench.gpu_record import PEAK_CONFIGS, _config, measured_peak
    from diagnosis.analytic import estimate_analytic
    from diagnosis.traced import estimate_traced

    plain = _config(PEAK_CONFIGS["llama-3.2-1b-lora-bf16-4k-checkpointing"])
    chunked = _config(PEAK_CONFIGS["llama-3.2-1b-lora-bf16-4k-checkpointing-chunked-loss"])
    real_plain = measured_peak(plain)["peak_allocated_bytes"]
    real_chunked = measured_peak(chunked)["peak_allocated_bytes"]
    gpu = torch.cuda.get_device_name()
    for estimator in (estimate_analytic, estimate_traced):
        estimate = estimator(chunked, device="cuda", gpu=gpu).peak_allocated_bytes
        assert estimate == pytest.approx(real_chunked, rel=0.02), (estimator.__name__, estimate, real_chunked)
    saved = real_plain - real_chunked
    predicted = (
        estimate_analytic(plain, device="cuda", gpu=gpu).peak_allocated_bytes
        - estimate_analytic(chunked, device="cuda", gpu=gpu).peak_allocated_bytes
    )
    assert predicted == pytest.approx(saved, rel=0.05), (predicted, saved)
