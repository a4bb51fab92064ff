"""The cuBLAS workspaces PyTorch keeps in its allocator: the rule by card and release, and the
bytes a real H100 run held (tests/fixtures/gpu/)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diagnosis.analytic import estimate_analytic
from diagnosis.workspaces import HOPPER_WORKSPACE_BYTES, LT_WORKSPACE_BYTES, OTHER_WORKSPACE_BYTES, cublas_workspaces
from trainer.config import validate_config

MIB = 1024**2
RECORDINGS = sorted((Path(__file__).parents[1] / "fixtures" / "gpu").glob("*/peaks.json"))


@pytest.mark.parametrize(
    ("capability", "torch", "biased", "expected"),
    [
        ((9, 0), (2, 11, 0), False, 64 * MIB),  # two threads × :4096:8
        ((9, 0), (2, 11, 0), True, 65 * MIB),  # + the cuBLASLt workspace a biased linear keeps (2.9-2.11)
        ((9, 0), (2, 4, 1), True, 64 * MIB),  # before 2.9 the Lt workspace is taken and freed per call
        ((9, 0), (2, 12, 0), True, 64 * MIB),  # from 2.12 it is the cuBLAS workspace
        ((8, 0), (2, 11, 0), False, 2 * (4096 * 2 + 16 * 8) * 1024),  # Ampere: :4096:2:16:8
        ((10, 0), (2, 11, 0), False, 2 * OTHER_WORKSPACE_BYTES),  # Blackwell's 32 MiB came in 2.12
        ((10, 0), (2, 12, 0), False, 2 * HOPPER_WORKSPACE_BYTES),
    ],
)
def test_the_workspaces_follow_the_card_and_the_release(capability, torch, biased, expected):
    assert cublas_workspaces(capability, torch, biased).bytes == expected


def test_an_unknown_card_is_taken_as_hoppers_and_says_so():
    kept = cublas_workspaces(None, (2, 11, 0), False)
    assert kept.bytes == 2 * HOPPER_WORKSPACE_BYTES
    assert "not known" in kept.formula


def test_estimates_count_them_on_cuda_only_by_the_named_card():
    cfg = validate_config({"model": {"name": "qwen2.5-0.5b", "dtype": "bf16"}})  # q/k/v carry biases
    h100 = estimate_analytic(cfg, device="cuda", torch="2.11.0", gpu="H100")
    a100 = estimate_analytic(cfg, device="cuda", torch="2.11.0", gpu="A100 80GB")
    cpu = estimate_analytic(cfg, device="cpu", torch="2.11.0")
    assert h100.breakdown["workspaces"] == 2 * HOPPER_WORKSPACE_BYTES + LT_WORKSPACE_BYTES
    assert a100.breakdown["workspaces"] == 2 * OTHER_WORKSPACE_BYTES + LT_WORKSPACE_BYTES
    assert cpu.breakdown["workspaces"] == 0
    assert h100.peak_allocated_bytes - a100.peak_allocated_bytes == 2 * (HOPPER_WORKSPACE_BYTES - OTHER_WORKSPACE_BYTES)
    assert any(term.name == "cuBLAS workspaces" and "CublasHandlePool" in term.source for term in h100.terms)


@pytest.mark.skipif(not RECORDINGS, reason="no CUDA run recorded yet (bench/gpu_record.py on a GPU)")
@pytest.mark.parametrize("path", RECORDINGS, ids=lambda p: p.parent.name)
def test_a_real_run_held_what_the_rule_says(path):
    """Before each measured config the recording process had run others: what stayed allocated
    with no tensor alive is the workspaces. Its first config follows three steps of tiny-llama
    (no biased linear); later ones follow Qwen2 and GPT-2 (biased)."""
    manifest = json.loads(path.with_name("manifest.json").read_text())
    if not manifest["gpu"].startswith("NVIDIA H100"):
        pytest.skip(f"the rule for {manifest['gpu']} is checked by the table above")
    torch = tuple(int(part) for part in manifest["torch"].split("+")[0].split("."))
    rows = json.loads(path.read_text())
    held = [row["measured"]["allocated_before_setup_bytes"] for row in rows]
    assert held[0] == cublas_workspaces((9, 0), torch, biased_linear=False).bytes
    assert held[-1] == cublas_workspaces((9, 0), torch, biased_linear=True).bytes
