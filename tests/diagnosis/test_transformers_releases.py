"""What a training step keeps changed with the transformers release, and both estimators follow the
release named.

The loss: how it treats the logits changed with the transformers release
(diagnosis.libraries.LOSS_HISTORY): today's shared ForCausalLMLoss upcasts them to fp32 and copies
nothing; before 4.49 every loss made a shifted contiguous copy, GPT-2 and kin in the logits' own
dtype, the shared loss (Llama from 4.46) in fp32 beside the caller's 16-bit logits. Both estimators
follow the version named. Measured on the CPU against the runner with the model's loss swapped for
the old lines, verbatim from the release named (stand-ins, as for the old bitsandbytes in
test_analytic)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from diagnosis.analytic import estimate_analytic
from diagnosis.traced import estimate_traced
from tests.diagnosis.test_analytic import PEAK_TOLERANCE, _measure, overrides

# Full fine-tuning of bf16 weights over a 4,096 (GPT-2) or 8,192 (Llama) vocabulary: the loss's b·s·V
# tensors are most of the peak, so how the loss treats them is the difference between the releases.
# Both estimators walk or trace these steps exactly (measured 0.00% off), so they are held to 1%. GPT-2 without
# attention dropout (which sends the CPU's SDPA to the math kernel and its b·a·s² scores).
GPT2 = {"model_type": "gpt2", "vocab_size": 4096, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 1024}
LLAMA = {
    "model_type": "llama",
    "vocab_size": 8192,
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
ITEMS = ["lora=null", "model.dtype=bf16", "data.seq_len=256", "train.micro_batch_size=2"]


def _gpt2_loss_4_48(logits, labels, vocab_size, **_kwargs):
    # transformers 4.48.0 modeling_gpt2.py, GPT2LMHeadModel.forward, verbatim but for the names.
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = labels[..., 1:].contiguous()
    return torch.nn.CrossEntropyLoss()(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))


def _shared_loss_4_46(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, **_kwargs):
    # transformers 4.46.0 loss_utils.py ForCausalLMLoss (fixed_cross_entropy inlined, mean reduction).
    logits = logits.float()
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = labels[..., 1:].contiguous()
    shift_logits = shift_logits.view(-1, vocab_size)
    shift_labels = shift_labels.view(-1)
    return torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index)


STAND_INS = {
    "gpt2-4.48.0": (GPT2LMHeadModel, _gpt2_loss_4_48, {**GPT2, "attn_pdrop": 0.0}, "4.48.0"),
    "llama-4.46.0": (LlamaForCausalLM, _shared_loss_4_46, LLAMA, "4.46.0"),
}


def _config(folder, architecture):
    (folder / "config.json").write_text(json.dumps(architecture))
    return overrides(
        f"model.name={folder}", "train.device=cpu", "train.max_steps=1", "monitor.track_modules=false", *ITEMS
    )


@pytest.mark.parametrize("case", STAND_INS)
def test_both_estimators_follow_the_loss_of_the_transformers_named(case, monkeypatch, tmp_path):
    model_class, old_loss, architecture, version = STAND_INS[case]
    monkeypatch.setattr(model_class, "loss_function", property(lambda _self: old_loss))
    cfg = _config(tmp_path, architecture)
    _, measured_peak = _measure(cfg)
    analytic = estimate_analytic(cfg, device="cpu", transformers=version)
    traced = estimate_traced(cfg, device="cpu", transformers=version)
    assert analytic.peak_allocated_bytes == pytest.approx(measured_peak, rel=0.01)
    assert traced.peak_allocated_bytes == pytest.approx(measured_peak, rel=0.01)
    assert any("shifted logits copy" == term.name for term in analytic.terms)
    assert any("today's loss (4.49 on: fp32, no copy)" in note for note in analytic.notes)
    assert any("loss traced as transformers" in note for note in traced.notes)
    # Today's loss would have been a wrong estimate of that run: the version is what tells them apart.
    today = estimate_analytic(cfg, device="cpu", transformers="4.49.0")
    assert abs(today.peak_allocated_bytes - measured_peak) > 0.1 * measured_peak


@pytest.mark.parametrize("architecture", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_todays_loss_is_estimated_as_it_runs(architecture, tmp_path):
    cfg = _config(tmp_path, {**architecture, "attn_pdrop": 0.0})
    _, measured_peak = _measure(cfg)
    assert estimate_analytic(cfg, device="cpu", transformers="4.49.0").peak_allocated_bytes == pytest.approx(
        measured_peak, rel=PEAK_TOLERANCE
    )
    assert estimate_traced(cfg, device="cpu", transformers="4.49.0").peak_allocated_bytes == pytest.approx(
        measured_peak, rel=0.02
    )


def test_a_forward_that_rebinds_its_logits_to_fp32_frees_the_16_bit_ones(tmp_path):
    """Llama before 4.46 upcast in its own forward (`logits = logits.float()`), which drops the bf16
    head output before the loss; from 4.46 the shared loss upcast beside it. No stand-in can free the
    caller's logits, so the two estimators are held to each other and to the head output's bytes."""
    cfg = _config(tmp_path, LLAMA)
    own, shared = (estimate_analytic(cfg, device="cpu", transformers=v) for v in ("4.45.2", "4.46.0"))
    traced_own = estimate_traced(cfg, device="cpu", transformers="4.45.2")
    assert traced_own.peak_allocated_bytes == pytest.approx(own.peak_allocated_bytes, rel=0.02)
    head = 2 * 256 * 8192 * 2  # b·s·V bf16
    logits = {term.name: term for term in own.terms}["logits"]
    assert "freed by logits.float()" in logits.formula
    assert own.peak_phase == shared.peak_phase == "forward"  # at the loss, where the head output differs
    assert shared.peak_allocated_bytes - own.peak_allocated_bytes == head


def test_gpt_bigcode_before_4_53_keeps_every_layers_cache_through_a_checkpointed_forward(tmp_path):
    """GPTBigCode left use_cache on under gradient checkpointing until 4.53, so each layer's c_attn
    output (q, k and v) lived to the end of the forward; a published SantaCoder peak shows it
    (bench/RESULTS.md). Today's model keeps no cache in training, so no stand-in measures it here:
    the two estimators are held to each other and to the bytes the old forward holds. Many narrow
    layers and a small vocabulary, so that the kept cache outweighs the loss."""
    architecture = {
        "model_type": "gpt_bigcode",
        "vocab_size": 256,
        "n_embd": 256,
        "n_inner": 1024,
        "n_layer": 16,
        "n_head": 4,
        "n_positions": 1024,
        "attn_pdrop": 0.0,
    }
    (tmp_path / "config.json").write_text(json.dumps(architecture))
    cfg = overrides(
        f"model.name={tmp_path}",
        "model.dtype=bf16",
        "model.gradient_checkpointing=true",
        "lora.target_modules=[c_attn]",
        "data.seq_len=256",
        "train.micro_batch_size=2",
        "train.device=cpu",
    )
    old, new = (estimate_analytic(cfg, device="cpu", transformers=v) for v in ("4.52.0", "4.53.0"))
    traced_old, traced_new = (estimate_traced(cfg, device="cpu", transformers=v) for v in ("4.52.0", "4.53.0"))
    cache = 16 * 2 * 256 * (256 + 2 * 64) * 2  # layers × b·s·(h + 2·head_dim) × bf16
    assert {term.name: term.bytes for term in old.terms}[
        "activations: key/value cache kept through the forward"
    ] == cache
    assert any("key/value cache" in note for note in traced_old.notes)
    assert any("model.config.use_cache = False" in note for note in old.notes)  # the way out, with its bytes
    assert (old.peak_phase, new.peak_phase) == ("forward", "backward")
    assert old.peak_allocated_bytes > new.peak_allocated_bytes
    # Within the 10% the two modes are held to (test_estimators_agree): with the cache, a moment inside
    # a layer's forward becomes the peak, where the analytic mode's in-layer transients are coarser.
    assert traced_old.peak_allocated_bytes == pytest.approx(old.peak_allocated_bytes, rel=0.10)
    assert traced_new.peak_allocated_bytes == pytest.approx(new.peak_allocated_bytes, rel=0.02)
    assert traced_old.peak_allocated_bytes - traced_new.peak_allocated_bytes > cache / 2


def test_gpt_bigcode_from_4_54_to_5_0_trains_without_the_checkpointing_it_was_asked_for(tmp_path):
    """transformers#38635 (4.54) dropped GPTBigCode's checkpointing and #41818 restored it in 5.0:
    in between, gradient_checkpointing=true does nothing. Both estimators estimate such a run as the
    same config without checkpointing, and the analytic note says what 5.0 saves."""
    (tmp_path / "config.json").write_text(json.dumps({**GPT2, "model_type": "gpt_bigcode", "n_inner": 256}))
    items = [f"model.name={tmp_path}", "train.device=cpu", *ITEMS]
    asked = overrides(*items, "model.gradient_checkpointing=true")
    plain = overrides(*items, "model.gradient_checkpointing=false")
    lost = estimate_analytic(asked, device="cpu", transformers="4.56.0")
    assert (
        lost.peak_allocated_bytes == estimate_analytic(plain, device="cpu", transformers="4.56.0").peak_allocated_bytes
    )
    restored = estimate_analytic(asked, device="cpu", transformers="5.0.0")
    assert restored.peak_allocated_bytes < lost.peak_allocated_bytes
    assert any("does not checkpoint gpt_bigcode" in note for note in lost.notes)
    traced_lost = estimate_traced(asked, device="cpu", transformers="4.56.0")
    traced_plain = estimate_traced(plain, device="cpu", transformers="4.56.0")
    assert traced_lost.peak_allocated_bytes == traced_plain.peak_allocated_bytes
    assert any("traced without gradient checkpointing" in note for note in traced_lost.notes)
