"""Out-of-memory post-mortems from real CPU allocation failures under `memory.limit_gb`."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from db import open_engine
from db.queries import get_postmortem, get_run, step_samples
from tests.conftest import postmortem_json, subprocess_env, trainer_command

pytestmark = pytest.mark.slow

EAGER_LONG = [
    "memory.limit_gb=0.25",
    "model.attn_implementation=eager",
    "train.device=cpu",
]


def run(db_url: str, *overrides: str) -> tuple[subprocess.CompletedProcess, int]:
    args = ["run", "--db", db_url]
    for override in overrides:
        args += ["--set", override]
    result = subprocess.run(trainer_command(*args), capture_output=True, text=True, timeout=300, env=subprocess_env())
    return result, int(result.stdout.splitlines()[0])


def test_oom_post_mortem_names_step_phase_and_layer(db_url):
    result, run_id = run(db_url, *EAGER_LONG, "data.seq_len=4096", "train.max_steps=2")
    assert result.returncode == 3, result.stderr[-3000:]
    engine = open_engine(db_url)
    assert get_run(engine, run_id).status == "oom"
    pm = get_postmortem(engine, run_id)
    # Where it really failed: the attention scores matmul inside layer 0's attention forward.
    assert "eager_attention_forward" in pm.traceback and "matmul" in pm.traceback
    assert (pm.step, pm.micro_batch, pm.phase) == (1, 0, "forward")
    assert pm.module == "model.layers.0.self_attn"
    assert pm.module_stack == ("model", "model.layers.0", "model.layers.0.self_attn")
    assert pm.batch_shape == {"batch_size": 2, "seq_len": 4096}
    # The request is the one the allocator refused: 2 x 4 heads x 4096^2 fp32 scores.
    assert pm.requested_bytes == 2 * 4 * 4096 * 4096 * 4
    assert str(pm.requested_bytes) in pm.error_text and "DefaultCPUAllocator" in pm.error_text
    assert pm.tensors["parameter_bytes"] > 0 and pm.tensors["activation_bytes"] > 0
    assert pm.host["rss_bytes"] > 0
    assert "first step" in pm.finding
    assert pm.snapshot_path is None and "no CUDA allocator" in pm.snapshot_note
    # No GPU here: the post-mortem says why it has no NVML reading rather than showing zeros.
    assert pm.nvml["available"] is False and pm.nvml["reason"]
    # Step 1 was being profiled: its partial profile shows the failing layer.
    assert "model.layers.0.self_attn" in {layer["module"] for layer in pm.layer_profile}

    data = postmortem_json(db_url, run_id)
    for key in ("run_id", "step", "phase", "module", "requested_bytes", "error_text", "finding"):
        assert key in data
    assert data["run_id"] == run_id and data["module"] == "model.layers.0.self_attn"
    # Eager attention at 4,096 tokens: the L² scores are the problem, sdpa the cheapest fix that fits.
    top = data["suggestions"][0]
    assert top["category"] == "efficient_attention" and top["patch"] == {"model.attn_implementation": "sdpa"}
    assert top["sufficient"] and top["saves_bytes"] > 0.25 * 1024**3
    suggested = subprocess.run(
        [sys.executable, "-m", "diagnosis", "suggest", "--run", str(run_id), "--db", db_url, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env(),
        check=True,
    )
    assert json.loads(suggested.stdout)["suggestions"] == data["suggestions"]
    text = subprocess.run(
        trainer_command("postmortem", str(run_id), "--db", db_url),
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env(),
        check=True,
    ).stdout
    assert "step 1" in text and "forward of model.layers.0.self_attn" in text and "512.0 MiB" in text
    assert "fixes, best first:\n    1. model.attn_implementation=sdpa" in text


# A full fine-tune whose AdamW states do not fit: 18M parameters (a 32k vocabulary) at a short length.
WIDE_VOCAB_LLAMA = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}


def test_a_full_fine_tune_short_of_optimizer_memory_is_told_to_shrink_the_states(db_url, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(WIDE_VOCAB_LLAMA))
    result, run_id = run(
        db_url,
        f"model.name={config}",
        "lora=null",
        "data.seq_len=64",
        "train.micro_batch_size=1",
        "train.max_steps=2",
        "train.device=cpu",
        "memory.limit_gb=0.25",
    )
    assert result.returncode == 3, result.stderr[-3000:]
    pm = get_postmortem(open_engine(db_url), run_id)
    assert pm.phase == "optimizer"
    suggested = subprocess.run(
        [sys.executable, "-m", "diagnosis", "suggest", "--run", str(run_id), "--db", db_url, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env(),
        check=True,
    )
    items = json.loads(suggested.stdout)["suggestions"]
    categories = [item["category"] for item in items]
    # What shrinks the states (or all the weights) comes first; activation fixes cannot help here.
    assert categories[0] in ("lora", "optimizer_8bit", "zero", "mixed_precision"), categories
    assert "lora" in categories[:3]
    by_category = {item["category"]: item for item in items}
    if "gradient_checkpointing" in by_category:
        assert not by_category["gradient_checkpointing"]["sufficient"]


def test_the_long_batch_that_triggered_it_is_named(db_url):
    result, run_id = run(
        db_url,
        *EAGER_LONG,
        "data.seq_len=4096",
        "data.vary_length=true",
        "data.min_seq_len=64",
        "train.max_steps=60",
    )
    assert result.returncode == 3, result.stderr[-3000:]
    engine = open_engine(db_url)
    pm = get_postmortem(engine, run_id)
    recorded = step_samples(engine, run_id)
    assert pm.step == len(recorded) + 1  # the step in progress, after every completed one
    failing_len = pm.batch_shape["seq_len"]
    assert failing_len > max(s.seq_len for s in recorded)
    assert f"{failing_len:,} tokens" in pm.finding and "long batch" in pm.finding
    match = re.search(r"([\d.]+)x the median", pm.finding)
    assert match and float(match.group(1)) >= 1.5
    # The failed request is read at the failing batch's own length, not the config's 4,096.
    request = postmortem_json(db_url, run_id)["failed_request"]
    assert request and request[0]["location"] == "attention" and request[0]["dims"]["tokens"] == failing_len, request


def test_a_leak_across_steps_is_called_a_leak(db_url):
    result, run_id = run(
        db_url,
        "memory.limit_gb=0.25",
        "train.device=cpu",
        "data.seq_len=64",
        "debug.leak_mb_per_step=16",
        "train.max_steps=200",
    )
    assert result.returncode == 3, result.stderr[-3000:]
    pm = get_postmortem(open_engine(db_url), run_id)
    assert pm.step > 8
    assert "leak" in pm.finding and "MiB per step" in pm.finding
    trend = pm.finding_details["trend"]
    # RSS also moves with the allocator's own pages: within 10% of the 16 MiB kept per step.
    assert trend["metric"] == "rss_bytes" and abs(trend["bytes_per_step"] / (16 * 1024**2) - 1) < 0.1


def test_postmortem_cli_for_a_run_without_one(db_url):
    result = subprocess.run(
        trainer_command("postmortem", "99", "--db", db_url),
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env(),
    )
    assert result.returncode == 1 and "no post-mortem for run 99" in result.stderr
