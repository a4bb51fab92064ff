"""train.loss_chunk_tokens: the same loss and gradients as transformers', fewer bytes, refused
where the model's loss is more than its decoder, head and cross-entropy."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import transformers

from bench.cpu_allocator import cpu_allocator_peak
from db import open_engine
from db.queries import get_postmortem, get_run, step_samples
from diagnosis.analytic import estimate_analytic
from diagnosis.traced import estimate_traced
from tests.conftest import postmortem_json, subprocess_env
from tests.diagnosis.test_traced import make_config
from tests.trainer.test_runner import first_line_run_id, run_trainer
from trainer.chunked_loss import ChunkedLossError, causal_lm_loss, check_same_loss
from trainer.config import LoraConfig, ModelConfig
from trainer.loop import setup
from trainer.models import build_model

_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=512)


def _config_dir(tmp_path, config: transformers.PretrainedConfig) -> str:
    config.save_pretrained(tmp_path)
    return str(tmp_path)


def _gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _both_losses(model: torch.nn.Module, ids: torch.Tensor, chunk: int, autocast: bool = False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        own = causal_lm_loss(model, ids, 0)
    own.backward()
    own_grads = _gradients(model)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        chunked = causal_lm_loss(model, ids, chunk)
    (chunked * 0.25).backward()  # a scaled loss, as accumulation and fp16 loss scaling make
    return own, own_grads, chunked, {name: grad * 4 for name, grad in _gradients(model).items()}


MODELS = {
    "llama-lora": lambda tmp: (ModelConfig(name="tiny-llama"), LoraConfig()),
    "gpt2-full-tied": lambda tmp: (ModelConfig(name="tiny-gpt2"), None),
    # Phi's lm_head has a bias; Gemma 2 soft-caps its logits.
    "phi-full-head-bias": lambda tmp: (
        ModelConfig(name=_config_dir(tmp, transformers.PhiConfig(**_SMALL, resid_pdrop=0.0))),
        None,
    ),
    "gemma2-full-softcap": lambda tmp: (
        ModelConfig(
            name=_config_dir(tmp, transformers.Gemma2Config(**_SMALL, head_dim=16, final_logit_softcapping=30.0)),
            attn_implementation="eager",
        ),
        None,
    ),
}


@pytest.mark.parametrize("case", sorted(MODELS))
def test_loss_and_every_gradient_match_transformers(case, tmp_path):
    model_cfg, lora = MODELS[case](tmp_path)
    torch.manual_seed(0)
    model = build_model(model_cfg, lora, torch.device("cpu")).model.eval()  # no dropout: one answer
    ids = torch.randint(0, 512, (2, 37))  # 74 tokens: the last chunk of 16 is short
    own, own_grads, chunked, chunked_grads = _both_losses(model, ids, 16)
    assert chunked.item() == pytest.approx(own.item(), rel=1e-5)
    assert own_grads.keys() == chunked_grads.keys() and own_grads
    for name, grad in own_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_under_bf16_autocast_the_gradients_match_to_bf16_precision():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="tiny-llama"), None, torch.device("cpu")).model.eval()
    ids = torch.randint(0, 1024, (2, 33))
    own, own_grads, chunked, chunked_grads = _both_losses(model, ids, 16, autocast=True)
    assert chunked.item() == pytest.approx(own.item(), rel=1e-2)
    for name, grad in own_grads.items():
        scale = grad.abs().max()
        assert (chunked_grads[name] - grad).abs().max() <= 0.02 * scale, name


def test_a_model_whose_loss_scales_its_logits_is_refused_before_training(tmp_path):
    # Cohere multiplies the logits by logit_scale: the chunked loss would train on another loss.
    name = _config_dir(tmp_path, transformers.CohereConfig(**_SMALL, logit_scale=0.5))
    model = build_model(ModelConfig(name=name), None, torch.device("cpu")).model
    with pytest.raises(ChunkedLossError, match="CohereForCausalLM's logits are not its LM head applied"):
        check_same_loss(model, torch.randint(0, 512, (1, 16)), 8)
    with pytest.raises(ChunkedLossError, match="train.loss_chunk_tokens: 0"):
        setup(
            make_config({"model": {"name": name}, "lora": None, "train": {"loss_chunk_tokens": 8}}), torch.device("cpu")
        )


def _large_vocabulary(tmp_path) -> dict:
    """A tiny decoder under a 32,000-token vocabulary: the logits, not the layers, set the peak."""
    config = transformers.Qwen2Config(**{**_SMALL, "vocab_size": 32_000}, num_key_value_heads=2)
    return {"model": {"name": _config_dir(tmp_path, config)}, "lora": None, "data": {"seq_len": 256}}


def test_the_cpu_allocators_peak_falls_by_what_both_estimators_say(tmp_path):
    """Measured: the runner's real step with and without chunks, the CPU allocator's own peak."""
    plain = make_config(_large_vocabulary(tmp_path))
    chunked = make_config({**_large_vocabulary(tmp_path), "train": {"loss_chunk_tokens": 64}})
    real_plain, real_chunked = cpu_allocator_peak(plain), cpu_allocator_peak(chunked)
    assert real_chunked < 0.5 * real_plain  # 2 × 256 tokens × 32,000 × fp32, several times, is most of the step
    traced = estimate_traced(chunked, device="cpu")
    assert traced.peak_allocated_bytes == pytest.approx(real_chunked, rel=0.01)
    saved = real_plain - real_chunked
    for estimator in (estimate_analytic, estimate_traced):
        predicted = (
            estimator(plain, device="cpu").peak_allocated_bytes - estimator(chunked, device="cpu").peak_allocated_bytes
        )
        assert predicted == pytest.approx(saved, rel=0.05), estimator.__name__


@pytest.mark.slow
def test_a_logits_oom_is_fixed_by_the_first_suggestion_in_a_real_run(tmp_path, db_url):
    """The runner OOMs on a large vocabulary under a 0.5 GiB budget; its post-mortem's first fix is
    the chunked loss; the same config with that change trains to the end, on the same loss."""
    (tmp_path / "model").mkdir()
    model = _config_dir(
        tmp_path / "model", transformers.Qwen2Config(**{**_SMALL, "vocab_size": 32_000}, num_key_value_heads=2)
    )
    config = (
        f"model: {{name: {model}}}\nlora: null\ndata: {{seq_len: 1024}}\n"
        "train: {micro_batch_size: 4, max_steps: 2, device: cpu}\nmemory: {limit_gb: 0.5}\n"
    )
    failed = run_trainer(tmp_path, db_url, config=config)
    assert failed.returncode == 3, failed.stderr[-3000:]
    # The post-mortem names the failed request: 4 × 1,024 × 32,000 × 4 B, the fp32 logits.
    (request,) = postmortem_json(db_url)["failed_request"]
    assert request["location"] == "logits_loss" and request["dims"] == {"batch": 4, "tokens": 1024, "vocab": 32000}
    advice = subprocess.run(
        [sys.executable, "-m", "diagnosis", "suggest", "--run", "latest", "--db", db_url, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_env(),
    )
    assert advice.returncode == 0, advice.stderr[-3000:]
    first = json.loads(advice.stdout)["suggestions"][0]
    assert first["category"] == "chunked_loss" and first["sufficient"], first
    assert first["patch"] == {"train.loss_chunk_tokens": 1024}
    fixed = run_trainer(tmp_path, db_url, "train.loss_chunk_tokens=1024", config=config)
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    run_id = first_line_run_id(fixed.stdout)
    engine = open_engine(db_url)
    assert get_run(engine, run_id).status == "completed"
    losses = [sample.loss for sample in step_samples(engine, run_id)]
    assert len(losses) == 2 and all(abs(loss - math.log(32_000)) < 0.5 for loss in losses)  # random weights
    # One chunk of the whole micro-batch still needs its fp32 scores: under a tighter budget the
    # chunked loss itself fails, and the post-mortem places it in the head, as transformers' loss is.
    tight = run_trainer(tmp_path, db_url, "train.loss_chunk_tokens=4096", "memory.limit_gb=0.3", config=config)
    assert tight.returncode == 3, tight.stderr[-3000:]
    postmortem = get_postmortem(engine, first_line_run_id(tight.stdout))
    assert (postmortem.phase, postmortem.module) == ("forward", "lm_head"), postmortem
