"""Before transformers moved GPT-2 (and GPTBigCode, GPT-NeoX, OPT, BLOOM, Falcon; StableLM earlier)
to the shared ForCausalLMLoss in 4.49, their forward computed the loss on the logits as the LM head
made them: with bf16 weights a bf16 shifted copy, bf16 log-softmax and bf16 gradients, where today's
loss upcasts to fp32 first. A run recorded under such a transformers peaks lower by a few b·s·V
copies; both estimators follow the version named. Measured here on the CPU against the runner with
GPT-2's loss swapped for those lines of 4.48.0's GPT2LMHeadModel.forward (a stand-in, as for the old
bitsandbytes in test_analytic)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2LMHeadModel

from diagnosis.analytic import estimate_analytic
from diagnosis.traced import estimate_traced
from tests.diagnosis.test_analytic import PEAK_TOLERANCE, _measure, overrides

BEFORE_SHARED_LOSS = "4.48.0"
SHARED_LOSS = "4.49.0"

# Full fine-tuning of bf16 weights at 2 x 256 tokens over a 4,096 vocabulary, without attention
# dropout (which sends the CPU's SDPA to the math kernel and its b·a·s² scores): the loss's b·s·V
# tensors are most of the peak, so fp32 or bf16 there is the difference between the two versions.
GPT2 = {"model_type": "gpt2", "vocab_size": 4096, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 1024}
ITEMS = ["lora=null", "model.dtype=bf16", "data.seq_len=256", "train.micro_batch_size=2"]


def _gpt2_loss_before_4_49(logits, labels, vocab_size, **_kwargs):
    # transformers 4.48.0 modeling_gpt2.py, GPT2LMHeadModel.forward, verbatim but for the names.
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = labels[..., 1:].contiguous()
    return torch.nn.CrossEntropyLoss()(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))


@pytest.fixture
def old_gpt2_loss(monkeypatch):
    monkeypatch.setattr(GPT2LMHeadModel, "loss_function", property(lambda _self: _gpt2_loss_before_4_49))


def _config(folder):
    (folder / "config.json").write_text(json.dumps({**GPT2, "attn_pdrop": 0.0}))
    return overrides(
        f"model.name={folder}", "train.device=cpu", "train.max_steps=1", "monitor.track_modules=false", *ITEMS
    )


def test_both_estimators_follow_the_loss_dtype_of_the_transformers_named(old_gpt2_loss, tmp_path):
    cfg = _config(tmp_path)
    _, measured_peak = _measure(cfg)
    analytic = estimate_analytic(cfg, device="cpu", transformers=BEFORE_SHARED_LOSS)
    traced = estimate_traced(cfg, device="cpu", transformers=BEFORE_SHARED_LOSS)
    assert analytic.peak_allocated_bytes == pytest.approx(measured_peak, rel=PEAK_TOLERANCE)
    assert traced.peak_allocated_bytes == pytest.approx(measured_peak, rel=0.02)
    assert any("shifted logits copy" == term.name for term in analytic.terms)
    assert any("from 4.49.0 the shared loss upcasts them to fp32: +" in note for note in analytic.notes)
    assert any("no fp32 upcast" in note for note in traced.notes)
    # Today's loss would have been a wrong estimate of that run: the version is what tells them apart.
    current = estimate_analytic(cfg, device="cpu", transformers=SHARED_LOSS)
    assert current.peak_allocated_bytes > measured_peak * (1 + 2 * PEAK_TOLERANCE)


def test_the_shared_loss_is_estimated_as_it_runs_today(tmp_path):
    cfg = _config(tmp_path)
    _, measured_peak = _measure(cfg)
    assert estimate_analytic(cfg, device="cpu", transformers=SHARED_LOSS).peak_allocated_bytes == pytest.approx(
        measured_peak, rel=PEAK_TOLERANCE
    )
    assert estimate_traced(cfg, device="cpu", transformers=SHARED_LOSS).peak_allocated_bytes == pytest.approx(
        measured_peak, rel=0.02
    )
