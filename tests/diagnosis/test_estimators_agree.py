"""The analytic and traced modes answer the same question two ways; on tiny models (where tracing
is cheap) they must agree within 10% on the peak and on every component."""

import pytest

from diagnosis.analytic import estimate_analytic
from diagnosis.traced import estimate_traced
from trainer.config import validate_config

CASES = {
    "llama-lora-eager": {"model": {"name": "tiny-llama", "attn_implementation": "eager"}, "data": {"seq_len": 512}},
    "qwen2-full-bf16-checkpointing": {
        "model": {"name": "tiny-qwen2", "dtype": "bf16", "gradient_checkpointing": True},
        "lora": None,
        "data": {"seq_len": 256},
    },
    "gpt2-lora-sdpa-accum": {
        "model": {"name": "tiny-gpt2"},
        "lora": {"target_modules": ["c_attn"]},
        "data": {"seq_len": 256},
        "train": {"micro_batch_size": 1, "grad_accum_steps": 3},
    },
    "llama-full-adafactor": {"model": {"name": "tiny-llama"}, "lora": None, "train": {"optimizer": "adafactor"}},
    # bf16 autocast of an fp32 GPT-2: the fp32 causal mask promotes the scores, softmax keeps fp32.
    "gpt2-full-eager-amp-bf16": {
        "model": {"name": "tiny-gpt2", "attn_implementation": "eager"},
        "lora": None,
        "train": {"mixed_precision": "bf16"},
        "data": {"seq_len": 256},
    },
    # train.loss_chunk_tokens: the runner's chunked loss, its gradients made in forward.
    "qwen2-full-bf16-chunked-loss": {
        "model": {"name": "tiny-qwen2", "dtype": "bf16"},
        "lora": None,
        "data": {"seq_len": 256},
        "train": {"loss_chunk_tokens": 64},
    },
    "llama-lora-amp-chunked-loss": {
        "model": {"name": "tiny-llama"},
        "data": {"seq_len": 256},
        "train": {"mixed_precision": "bf16", "loss_chunk_tokens": 100},
    },
}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_analytic_and_traced_agree_within_ten_percent(case, device):
    cfg = validate_config(CASES[case])
    analytic, traced = estimate_analytic(cfg, device=device), estimate_traced(cfg, device=device)
    assert traced.peak_allocated_bytes == pytest.approx(analytic.peak_allocated_bytes, rel=0.10)
    for key in ("parameters", "gradients", "optimizer_states", "activations"):
        assert traced.totals[key] == pytest.approx(analytic.totals[key], rel=0.10, abs=4096), key
