"""The traced estimator against the runner's own measurements of the same step, on the CPU.

Two references, both real: the runner's tensor breakdown (`StepMonitor` on `trainer.loop.train`)
for each component, and the CPU allocator's running total (reported to the profiler on every
allocation) for the peak. Neither shares code with the tracer.
"""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from unittest import mock

import pytest
import torch

import diagnosis.traced as traced_module
from bench.cpu_allocator import cpu_allocator_peak
from collector.readings import StepSample, TensorBreakdown
from diagnosis.analytic import CUDA_CONTEXT_BYTES, estimate_analytic
from diagnosis.estimate import BREAKDOWN_KEYS
from diagnosis.reserve import allocator_reserve_bytes
from diagnosis.traced import (
    CUDA_BLOCK_BYTES,
    TracedEstimateUnsupported,
    cuda_block_bytes,
    estimate_traced,
)
from trainer.config import RunConfig, validate_config
from trainer.loop import make_monitor, setup, train
from trainer.models import build_model, hf_config
from trainer.presets import PRESETS

MIB = 1024**2

# Each runs the runner for two steps and traces the same config: LoRA and full fine-tuning,
# eager and SDPA attention, checkpointing on and off, fp32 and bf16 weights, bf16 autocast,
# AdamW and SGD, gradient accumulation, tied (qwen2, gpt2) and untied (llama) embeddings.
AGREEMENT_CASES = {
    "llama-lora-sdpa": {},
    "llama-lora-eager-checkpointing": {"model": {"attn_implementation": "eager", "gradient_checkpointing": True}},
    # bf16 matmuls are slow on CPUs without AMX: shorter sequences where attention is not the point.
    "llama-full-bf16-sgd-accum2": {
        "model": {"dtype": "bf16"},
        "lora": None,
        "train": {"optimizer": "sgd", "grad_accum_steps": 2},
        "data": {"seq_len": 128},
    },
    "qwen2-lora-eager": {"model": {"name": "tiny-qwen2", "attn_implementation": "eager"}},
    "qwen2-full-checkpointing": {"model": {"name": "tiny-qwen2", "gradient_checkpointing": True}, "lora": None},
    "gpt2-lora-sdpa": {"model": {"name": "tiny-gpt2"}, "lora": {"target_modules": ["c_attn"]}},
    "gpt2-full-eager-bf16-autocast": {
        "model": {"name": "tiny-gpt2", "attn_implementation": "eager"},
        "lora": None,
        "train": {"mixed_precision": "bf16"},
        "data": {"seq_len": 256},
    },
    "qwen2-lora-chunked-loss": {"model": {"name": "tiny-qwen2"}, "train": {"loss_chunk_tokens": 128}},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Real steps of tiny models on a shared two-core machine: a second OpenMP thread spins against
    the other processes and costs 5-10 times the CPU time of one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_config(sections: dict) -> RunConfig:
    raw: dict = {"data": {"seq_len": 512}, "train": {"device": "cpu", "max_steps": 2}}
    for key, value in sections.items():
        if value is None:
            raw[key] = None
        else:
            raw.setdefault(key, {}).update(value)
    return validate_config(raw)


@cache
def traced(case: str, device: str = "cpu"):
    return estimate_traced(make_config(AGREEMENT_CASES[case]), device=device)


def runner_breakdown(cfg: RunConfig) -> TensorBreakdown:
    """The runner's own figures: setup, the worker's monitor, two steps of the real loop."""
    training = setup(cfg, torch.device("cpu"))
    published: list = []
    monitor = make_monitor(cfg, training, published.append)
    train(training, monitor)
    monitor.close()
    return [sample for sample in published if isinstance(sample, StepSample)][-1].tensors


@pytest.mark.parametrize("case", list(AGREEMENT_CASES))
def test_components_match_the_runners_measurement(case):
    measured = runner_breakdown(make_config(AGREEMENT_CASES[case]))
    totals = traced(case).totals
    pairs = {
        "parameters": (totals["parameters"], measured.parameter_bytes),
        "gradients": (totals["gradients"], measured.gradient_bytes),
        "optimizer_states": (totals["optimizer_states"], measured.optimizer_state_bytes),
        "activations": (totals["saved_for_backward"], measured.activation_bytes),
    }
    for component, (estimate, real) in pairs.items():
        assert estimate == pytest.approx(real, rel=0.05), f"{case} {component}: traced {estimate} vs measured {real}"


@pytest.mark.parametrize(
    "case", ["llama-lora-sdpa", "qwen2-full-checkpointing", "gpt2-full-eager-bf16-autocast", "qwen2-lora-chunked-loss"]
)
def test_traced_peak_matches_the_cpu_allocators_peak(case):
    real = cpu_allocator_peak(make_config(AGREEMENT_CASES[case]))
    assert traced(case).peak_allocated_bytes == pytest.approx(real, rel=0.01)


def test_breakdown_is_complete_and_sums_to_the_peak():
    estimate = traced("llama-lora-sdpa")
    assert estimate.mode == "traced"
    assert set(estimate.breakdown) == set(BREAKDOWN_KEYS)
    assert sum(estimate.breakdown.values()) == estimate.peak_allocated_bytes
    assert estimate.peak_phase in ("forward", "backward", "optimizer")
    # LoRA at seq 512: activations and the fp32 logits (2 x 512 x 1024 x 4 B = 4 MiB each copy) dominate.
    assert estimate.breakdown["activations"] > estimate.breakdown["parameters"]
    assert estimate.breakdown["logits_loss"] >= 4 * MIB
    assert any("second of 2" in note for note in estimate.notes)


def test_optimizer_states_from_the_first_step_are_alive_at_the_second_steps_peak():
    estimate = traced("qwen2-full-checkpointing")
    assert estimate.peak_phase in ("forward", "backward")
    assert estimate.breakdown["optimizer_states"] == estimate.totals["optimizer_states"] > 0
    assert estimate.breakdown["parameters"] == estimate.totals["parameters"] + estimate.totals["buffers"]


def test_checkpointed_layers_keep_their_input_as_activations():
    estimate = traced("llama-lora-eager-checkpointing")
    # Each checkpointed layer keeps its input hidden state: batch 2 x seq 512 x hidden 64 x fp32.
    assert estimate.per_layer_activation_bytes == 2 * 512 * 64 * 4
    plain = traced("llama-lora-sdpa")
    assert plain.per_layer_activation_bytes > 4 * estimate.per_layer_activation_bytes


def test_cuda_rounds_every_block_to_512_bytes():
    cpu, cuda = traced("gpt2-lora-sdpa"), traced("gpt2-lora-sdpa", "cuda")
    assert all(value % CUDA_BLOCK_BYTES == 0 for value in cuda.breakdown.values())
    # Rounding only adds; activations differ for another reason (the CUDA dropout mask, below).
    assert cuda.totals["parameters"] > cpu.totals["parameters"]
    assert cpu.allocator_overhead_bytes == 0 and cpu.runtime_overhead_bytes == 0
    # The reserve models fragmentation among tensors: the workspaces are whole segments of their own.
    tensors = cuda.peak_allocated_bytes - cuda.breakdown["workspaces"]
    assert cuda.allocator_overhead_bytes == allocator_reserve_bytes(tensors) > 0
    assert cuda.breakdown["workspaces"] > 0 and cpu.breakdown["workspaces"] == 0
    assert cuda.runtime_overhead_bytes == CUDA_CONTEXT_BYTES  # the analytic mode's figure: modes stay comparable
    assert any("512 bytes" in note for note in cuda.notes)
    assert cuda_block_bytes(0) == 0 and cuda_block_bytes(1) == 512 and cuda_block_bytes(513) == 1024


def test_the_lm_heads_input_is_an_activation_not_logits():
    """The final norm's output is made before the LM head, which saves it: an activation. The head
    only views it (an `aten.view` inside the logits region), and a view must not relabel it."""
    estimate = traced("llama-full-bf16-sgd-accum2")
    batch, seq, vocab = 2, 128, 1024
    loss_saved = batch * seq * vocab * 4 + batch * seq * 8 + 4  # log-softmax output, shifted labels, total weight
    # All else this full fine-tune's forward saves (saved_for_backward, the runner's own figure
    # above) is activations, the head's input (batch x seq x hidden x 2 B) included.
    assert estimate.totals["activations"] == estimate.totals["saved_for_backward"] - loss_saved


def test_cuda_sdpa_draws_attention_dropout_inside_the_fused_kernel(tmp_path):
    """GPT-2 has attention dropout 0.1. CUDA's flash and memory-efficient kernels take dropout
    (sdp_utils.cpp has no dropout filter for them) and keep what they keep without it; the CPU's
    flash kernel refuses dropout, and the math fallback keeps b·a·s² scores, probabilities and mask."""
    config = hf_config("tiny-gpt2")
    config.attn_pdrop = 0.0
    config.to_json_file(str(tmp_path / "config.json"))
    sections = AGREEMENT_CASES["gpt2-lora-sdpa"]
    without_dropout = estimate_traced(make_config({**sections, "model": {"name": str(tmp_path)}}), device="cuda")
    cuda, cpu = traced("gpt2-lora-sdpa", "cuda"), traced("gpt2-lora-sdpa")
    assert cuda.totals["saved_for_backward"] == without_dropout.totals["saved_for_backward"]
    assert cuda.peak_allocated_bytes == without_dropout.peak_allocated_bytes
    assert any("SDPA with attention dropout" in note for note in cuda.notes)
    # The CPU keeps at least fp32 scores and probabilities of batch 2 x 4 heads x 512² in both layers.
    square = 2 * 4 * 512 * 512 * 4
    assert cpu.totals["saved_for_backward"] - cuda.totals["saved_for_backward"] > 2 * 2 * square


def test_transformers_tracing_path_is_the_fallback(monkeypatch):
    """Without the packed-sequence answer, transformers reads a fake tensor's values; the trace
    falls back to its tracing path, which materialises the causal mask and repeats K/V for GQA."""
    import transformers.utils.import_utils as import_utils

    @contextmanager
    def half_eager():
        with mock.patch.object(import_utils, "is_fake_tensor", lambda _tensor: False):
            yield

    eager = traced("llama-lora-sdpa")
    monkeypatch.setattr(traced_module, "_eager_transformers", half_eager)
    fallback = estimate_traced(make_config(AGREEMENT_CASES["llama-lora-sdpa"]), device="cpu")
    assert any("tracing path" in note for note in fallback.notes)
    assert fallback.peak_allocated_bytes > eager.peak_allocated_bytes


def test_cuda_dropout_keeps_a_one_byte_mask_where_the_cpu_keeps_fp32_noise():
    # transformers 4.53 hands SDPA repeated K/V, which CUDA's memory-efficient kernel takes in fp32:
    # a fused kernel on both devices, so dropout is the one difference (later releases send fp32
    # GQA to CUDA's math kernel: test_cuda_fp32_gqa_sdpa_runs_the_math_kernel).
    cfg = make_config(AGREEMENT_CASES["llama-lora-sdpa"])
    cpu = estimate_traced(cfg, device="cpu", transformers="4.53.0")
    cuda = estimate_traced(cfg, device="cuda", transformers="4.53.0")
    # LoRA dropout on q_proj and v_proj of the second layer (the first layer's input needs no
    # gradient, so nothing is saved there): 2 masks of batch 2 x seq 512 x hidden 64, 4 B vs 1 B.
    # Rounding to 512-byte blocks on CUDA moves the rest by a few hundred bytes.
    difference = cpu.totals["saved_for_backward"] - cuda.totals["saved_for_backward"]
    assert difference == pytest.approx(2 * (2 * 512 * 64) * (4 - 1), abs=4096)


def test_quantised_weights_are_refused_with_the_way_out():
    cfg = make_config({"model": {"quantization": "nf4"}})
    with pytest.raises(TracedEstimateUnsupported, match="analytic"):
        estimate_traced(cfg)


def bitsandbytes_8bit_state_bytes(numel: int) -> int:
    """Two uint8 moments, an fp32 absmax per 256 elements each, two 256-entry fp32 quantile maps;
    fp32 moments below 4096 elements (bitsandbytes Optimizer2State, min_8bit_size)."""
    if numel < 4096:
        return 2 * 4 * numel
    return 2 * numel + 2 * 4 * -(-numel // 256) + 2 * 256 * 4


def test_bitsandbytes_8bit_states_are_sized_and_paged_ones_resident_only_in_the_step():
    sections = {"lora": None, "data": {"seq_len": 128}}
    cfg = make_config({**sections, "train": {"optimizer": "adamw_8bit"}})
    params = build_model(cfg.model, None, torch.device("meta")).model.parameters()
    expected = sum(bitsandbytes_8bit_state_bytes(p.numel()) for p in params)
    eight_bit = estimate_traced(cfg, device="cpu")
    assert eight_bit.totals["optimizer_states"] == expected
    assert eight_bit.breakdown["optimizer_states"] == expected  # held through forward and backward
    assert [term.bytes for term in eight_bit.terms] == [expected]

    paged = estimate_traced(make_config({**sections, "train": {"optimizer": "paged_adamw_8bit"}}), device="cpu")
    assert paged.totals["optimizer_states"] == expected
    assert paged.peak_phase == "optimizer" or paged.breakdown["optimizer_states"] == 0
    assert any("optimizer.step() runs only" in note for note in paged.notes)


def test_zero_sharding_divides_the_states_of_each_rank():
    single = traced("qwen2-full-checkpointing")
    zero2 = estimate_traced(
        make_config(
            {
                **AGREEMENT_CASES["qwen2-full-checkpointing"],
                "deepspeed": {"zero_stage": 2},
                "train": {"num_gpus": 4},
            }
        ),
        device="cpu",
    )
    # fp32 AdamW states ÷ 4 ranks; parameters whole below stage 3.
    assert zero2.totals["optimizer_states"] == -(-single.totals["optimizer_states"] // 4)
    assert zero2.totals["parameters"] == single.totals["parameters"]
    assert zero2.peak_allocated_bytes < single.peak_allocated_bytes
    assert any("ZeRO-2" in term.name for term in zero2.terms)


def test_fsdp_divides_every_state_and_adds_the_gathered_units_to_forward_and_backward():
    single = traced("qwen2-full-checkpointing")
    cfg = make_config({**AGREEMENT_CASES["qwen2-full-checkpointing"], "fsdp": {}, "train": {"num_gpus": 4}})
    fsdp = estimate_traced(cfg, device="cpu")
    for key in ("gradients", "optimizer_states"):
        assert fsdp.totals[key] == -(-single.totals[key] // 4)
    assert fsdp.totals["parameters"] < single.totals["parameters"]
    assert any("FSDP FULL_SHARD gathered units" in note for note in fsdp.notes)
    assert fsdp.peak_allocated_bytes < single.peak_allocated_bytes
    analytic = estimate_analytic(cfg, device="cpu")
    assert fsdp.peak_allocated_bytes == pytest.approx(analytic.peak_allocated_bytes, rel=0.10)


def test_a_checkpoint_directory_is_traced_from_its_config_alone(tmp_path):
    hf_config("tiny-llama").to_json_file(str(tmp_path / "config.json"))
    (tmp_path / "model.safetensors").write_bytes(b"not weights: reading this file would fail")
    estimate = estimate_traced(make_config({"model": {"name": str(tmp_path)}}), device="cpu")
    assert estimate.totals["parameters"] == traced("llama-lora-sdpa").totals["parameters"]


class _RssWatch:
    """The process's resident memory, sampled from a thread while the trace runs."""

    def __init__(self):
        self.peak = self.start = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="rss-watch", daemon=True)

    @staticmethod
    def _rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096

    def _watch(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._rss())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *_exc):
        self._stop.set()
        self._thread.join()


LLAMA_2_7B_SHAPE = dict(model_type="llama", **PRESETS["llama-2-7b"].config_kwargs)


def test_a_7b_shaped_model_traces_without_allocating_its_weights(tmp_path):
    layers = 4
    (tmp_path / "config.json").write_text(json.dumps(dict(LLAMA_2_7B_SHAPE, num_hidden_layers=layers)))
    cfg = validate_config(
        {
            "model": {"name": str(tmp_path / "config.json"), "dtype": "bf16", "attn_implementation": "sdpa"},
            "lora": {"r": 16, "target_modules": ["q_proj", "v_proj"]},
            "data": {"seq_len": 2048},
            "train": {"micro_batch_size": 1},
        }
    )
    with _RssWatch() as rss:
        estimate = estimate_traced(cfg, device="cuda")
    h, ffn, vocab = 4096, 11008, 32000
    base_params = 2 * vocab * h + layers * (4 * h * h + 3 * h * ffn + 2 * h) + h
    lora_params = layers * 2 * 16 * (h + h)
    assert estimate.totals["parameters"] == 2 * base_params + 4 * lora_params  # bf16 base, fp32 adapters
    assert estimate.totals["parameters"] > 1.9 * 1024**3
    # Real weights alone would take 1.9 GiB of RAM.
    assert rss.peak - rss.start < 512 * MIB
    assert estimate.breakdown["activations"] > layers * estimate.per_layer_activation_bytes * 0.9


def test_long_accumulation_traces_two_micro_batches_with_the_same_peak():
    base = {"model": {"name": "tiny-llama"}, "data": {"seq_len": 128}, "train": {"micro_batch_size": 1}}
    two = estimate_traced(validate_config({**base, "train": {"grad_accum_steps": 2}}), device="cpu")
    many = estimate_traced(validate_config({**base, "train": {"grad_accum_steps": 64}}), device="cpu")
    assert many.peak_allocated_bytes == two.peak_allocated_bytes and many.breakdown == two.breakdown
    assert any("2 of the 64 accumulation micro-batches" in note for note in many.notes)


def test_traces_from_two_threads_take_turns(monkeypatch):
    """The dashboard traces in session threads; the process-wide patches must not interleave."""
    import threading
    import time

    import diagnosis.traced as traced_module

    spans = []
    real = traced_module._trace_fake

    def slow_trace(cfg, on_cuda, libraries):
        started = time.monotonic()
        time.sleep(0.3)
        result = real(cfg, on_cuda, libraries)
        spans.append((started, time.monotonic()))
        return result

    monkeypatch.setattr(traced_module, "_trace_fake", slow_trace)
    cfg = make_config(AGREEMENT_CASES["llama-lora-sdpa"])
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(traced_module.estimate_traced(cfg, device="cpu")))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(results) == 2 and results[0].peak_allocated_bytes == results[1].peak_allocated_bytes
    (first_start, first_end), (second_start, _) = sorted(spans)
    assert second_start >= first_end  # the second began only after the first had finished


def test_cuda_fp32_gqa_sdpa_runs_the_math_kernel():
    """On an H100 (torch 2.11, transformers 5.17) tiny-llama's fp32 sdpa step peaked at exactly its
    eager step's bytes (tests/fixtures/gpu/): enable_gqa leaves CUDA only the math kernel in fp32."""
    sdpa = estimate_traced(make_config({}), device="cuda")
    eager = estimate_traced(make_config({"model": {"attn_implementation": "eager"}}), device="cuda")
    assert sdpa.peak_allocated_bytes == pytest.approx(eager.peak_allocated_bytes, rel=0.01)
    # A transformers before 4.54 repeats K/V itself: CUDA's memory-efficient kernel takes fp32 then.
    fused = estimate_traced(make_config({}), device="cuda", transformers="4.53.0")
    assert fused.peak_allocated_bytes < 0.9 * sdpa.peak_allocated_bytes
    # In bf16 the flash kernel takes enable_gqa.
    bf16 = make_config({"model": {"dtype": "bf16"}})
    bf16_eager = make_config({"model": {"dtype": "bf16", "attn_implementation": "eager"}})
    assert (
        estimate_traced(bf16, device="cuda").peak_allocated_bytes
        < 0.9 * estimate_traced(bf16_eager, device="cuda").peak_allocated_bytes
    )
