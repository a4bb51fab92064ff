"""The recorded breakdown moves the way theory says when a knob changes (in-process, CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from collector.monitor import StepMonitor
from trainer.config import validate_config
from trainer.data import DataSetupError, batches
from trainer.loop import setup, train
from trainer.models import build_model


def measure(**sections) -> list:
    cfg = validate_config({"train": {"max_steps": 2, "micro_batch_size": 2}, **sections})
    training = setup(cfg, torch.device("cpu"))
    samples: list = []
    monitor = StepMonitor(training.built.model, training.optimizer, torch.device("cpu"), samples.append)
    train(training, monitor)
    monitor.close()
    return samples


def test_gradient_checkpointing_lowers_activation_bytes():
    data = {"seq_len": 512}
    plain = measure(data=data)[-1].tensors
    checkpointed = measure(data=data, model={"gradient_checkpointing": True})[-1].tensors
    # Checkpointing keeps each layer's input (b*s*h fp32 = 256 KiB here) instead of all its
    # intermediates: a large drop, not noise.
    assert checkpointed.activation_bytes < plain.activation_bytes / 2
    assert checkpointed.parameter_bytes == plain.parameter_bytes


def test_eager_attention_saves_the_score_matrices_that_sdpa_does_not():
    data = {"seq_len": 512}
    sdpa = measure(data=data, model={"attn_implementation": "sdpa"})[-1].tensors.activation_bytes
    eager = measure(data=data, model={"attn_implementation": "eager"})[-1].tensors.activation_bytes
    # Eager keeps softmax probabilities: 2 layers x b=2 x 4 heads x 512^2 x 4 B = 16 MiB. SDPA saves
    # a few small tensors of its own (logsumexp: b x heads x s floats), hence 0.95.
    scores = 2 * 2 * 4 * 512 * 512 * 4
    assert 0.95 * scores <= eager - sdpa <= 1.5 * scores


def test_lora_rank_scales_optimizer_state_and_gradients():
    small = measure(lora={"r": 4})[-1].tensors
    large = measure(lora={"r": 32})[-1].tensors
    # Trainable LoRA parameters are r * (d_in + d_out) per adapted matrix: linear in r.
    assert large.trainable_parameter_bytes == 8 * small.trainable_parameter_bytes
    assert large.optimizer_state_bytes > 6 * small.optimizer_state_bytes
    assert large.gradient_bytes == 8 * small.gradient_bytes


def test_full_fine_tuning_holds_far_more_optimizer_state_than_lora():
    lora = measure()[-1].tensors
    full = measure(lora=None)[-1].tensors
    assert full.trainable_parameter_bytes == full.parameter_bytes
    # AdamW: two fp32 moments per parameter.
    assert full.optimizer_state_bytes >= 2 * full.parameter_bytes
    assert full.optimizer_state_bytes > 20 * lora.optimizer_state_bytes


def test_gradient_accumulation_counts_tokens_of_every_micro_batch():
    sample = measure(train={"max_steps": 1, "micro_batch_size": 2, "grad_accum_steps": 3}, data={"seq_len": 64})[0]
    assert sample.tokens == 3 * 2 * 64


def test_vary_length_draws_lengths_within_bounds():
    cfg = validate_config({"data": {"seq_len": 128, "vary_length": True, "min_seq_len": 16}})
    stream = batches(cfg.data, 2, 1000, seed=0)
    lengths = {next(stream).shape[1] for _ in range(50)}
    assert min(lengths) >= 16 and max(lengths) <= 128 and len(lengths) > 10


def test_jsonl_file_is_tokenised_byte_level(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"text": "hello world " * 20}) for _ in range(5)))
    cfg = validate_config({"data": {"source": str(path), "seq_len": 32}})
    batch = next(batches(cfg.data, 4, 1024, seed=0))
    assert batch.shape == (4, 32)
    assert set(batch.flatten().tolist()) <= set(b"hello world \n")


def test_jsonl_without_the_text_field_is_a_clear_error(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"body": "x"}\n')
    cfg = validate_config({"data": {"source": str(path), "seq_len": 8}})
    with pytest.raises(DataSetupError, match=r"data.jsonl:1: no string field 'text'"):
        next(batches(cfg.data, 1, 1024, seed=0))


def test_directory_with_config_json_builds_random_weights(tmp_path):
    from transformers import Qwen2Config

    Qwen2Config(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    ).save_pretrained(tmp_path)
    cfg = validate_config({"model": {"name": str(tmp_path)}})
    built = build_model(cfg.model, cfg.lora, torch.device("cpu"))
    assert built.source == "config.json (random weights)" and built.vocab_size == 512


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-gpt2"])
def test_every_preset_trains(preset):
    targets = ["c_attn"] if preset == "tiny-gpt2" else ["q_proj", "v_proj"]
    samples = measure(model={"name": preset}, lora={"target_modules": targets}, data={"seq_len": 64})
    assert len(samples) == 2 and all(s.loss is not None for s in samples)


def test_the_loop_frees_a_micro_batchs_graph_before_the_next_forward(monkeypatch):
    """What a matmul keeps on its autograd ctx (bitsandbytes' int8 inputs, 4-bit ones before 0.43.2)
    lives as long as the graph: a loop that leaves `loss` bound carries it through the optimizer step
    and the next forward, as litgpt's does. The runner's loop must not."""
    import weakref

    import trainer.loop as loop

    class KeepsOnCtx(torch.autograd.Function):
        @staticmethod
        def forward(ctx, loss):  # noqa: ANN001
            ctx.kept = torch.ones(1024)  # a stand-in for bitsandbytes' ctx.tensors
            weakref.finalize(ctx.kept.untyped_storage(), freed.append, True)
            return loss.clone()

        @staticmethod
        def backward(ctx, grad):  # noqa: ANN001
            return grad

    freed: list[bool] = []
    made: list[int] = []
    real = loop.causal_lm_loss

    def loss_keeping_a_ctx_tensor(*args):
        # At each forward after the first, the previous micro-batch's graph must be gone already.
        assert len(freed) == len(made), "the previous micro-batch's graph is still alive"
        made.append(1)
        return KeepsOnCtx.apply(real(*args))

    monkeypatch.setattr(loop, "causal_lm_loss", loss_keeping_a_ctx_tensor)
    cfg = validate_config({"train": {"max_steps": 2, "micro_batch_size": 2, "grad_accum_steps": 2}})
    training = setup(cfg, torch.device("cpu"))
    monitor = StepMonitor(training.built.model, training.optimizer, torch.device("cpu"), lambda sample: None)
    train(training, monitor)
    monitor.close()
    assert len(made) == 4 and len(freed) == 4
