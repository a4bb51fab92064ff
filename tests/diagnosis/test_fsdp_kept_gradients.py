"""FSDP1 + reentrant checkpointing keeps every layer's input gradient to the end of backward: the
mechanism in real torch FSDP on two CPU ranks, and the bytes the analytic estimate adds for it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from diagnosis.analytic import estimate_analytic
from trainer.config import validate_config

PROBE = Path(__file__).with_name("fsdp_kept_gradients_probe.py")
LAYERS = 5


CASES = [(True, True, LAYERS - 1), (False, True, 0), (True, False, 0)]


@pytest.fixture(scope="module")
def probed(tmp_path_factory) -> dict[str, int]:
    """One probe run for every case: starting two gloo ranks is most of its time."""
    out = tmp_path_factory.mktemp("fsdp-probe") / "probe.json"
    cases = ",".join(f"{int(reentrant)}:{int(fsdp)}" for reentrant, fsdp, _ in CASES)
    command = [sys.executable, str(PROBE), str(out), str(LAYERS), cases]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())["kept_at_layer0"]


@pytest.mark.parametrize(("reentrant", "fsdp", "kept"), CASES)
def test_fsdp1_keeps_the_other_layers_input_gradients_only_under_reentrant_checkpointing(probed, reentrant, fsdp, kept):
    assert probed[f"{int(reentrant)}:{int(fsdp)}"] == kept


def _fsdp_lora(**changes) -> dict:
    config = {
        "model": {"name": "llama-2-7b", "dtype": "bf16", "gradient_checkpointing": True},
        "data": {"seq_len": 4096},
        "train": {"micro_batch_size": 2, "num_gpus": 2, "mixed_precision": "bf16"},
        "fsdp": {"sharding_strategy": "full_shard"},
    }
    for key, value in changes.items():
        section, name = key.split(".")
        if value is None:
            config[section] = None
        else:
            config[section][name] = value
    return config


def test_the_estimate_adds_one_hidden_state_gradient_per_layer_but_the_first_when_reentrant():
    kept_term = "activations: layer input gradients FSDP keeps to the end of backward"
    cfg = validate_config(_fsdp_lora())
    old = estimate_analytic(cfg, transformers="4.57.6")
    new = estimate_analytic(cfg, transformers="5.0.0")
    terms = {term.name: term.bytes for term in old.terms}
    per_layer = 2 * 4096 * 4096 * 2  # b·s·h in bf16, already a multiple of 512
    assert terms[kept_term] == 31 * per_layer
    # The peak moves to layer 0's backward: the other 31 checkpointed inputs and their gradients.
    assert old.peak_phase == "backward" and old.breakdown["activations"] > 2 * 31 * per_layer
    assert old.peak_allocated_bytes > new.peak_allocated_bytes
    assert kept_term not in {term.name for term in new.terms}
    # Nothing is kept without frozen units (a full fine-tune), without checkpointing, or without FSDP.
    for changes in ({"lora.r": None}, {"model.gradient_checkpointing": False}, {"fsdp.sharding_strategy": None}):
        other = validate_config(_fsdp_lora(**changes))
        assert kept_term not in {term.name for term in estimate_analytic(other, transformers="4.57.6").terms}
