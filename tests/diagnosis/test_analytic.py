"""The analytic model against measurement, and against the published formulas it must reproduce.

The calibration runs the runner's own pieces on the CPU (`trainer.loop.setup`, `make_monitor`,
`train`) for two steps and compares each component the collector measures: parameter, gradient
and optimizer-state bytes, and the bytes saved for backward (ActivationCounter: activations plus
the log-softmax the loss keeps). The peak is measured with a dispatch mode that follows every
storage an op creates until it is freed, on top of the parameters and optimizer states that exist
before the step.
"""

from __future__ import annotations

import json
import time
import weakref
from pathlib import Path

import pytest

from diagnosis.analytic import CUDA_CONTEXT_BYTES, NF4_BYTES_PER_PARAM, estimate_analytic
from diagnosis.architecture import shape_for, shape_from_config_dict
from diagnosis.estimate import BREAKDOWN_KEYS
from diagnosis.reserve import allocator_reserve_bytes
from diagnosis.sharding import REDUCE_BUCKET_ELEMENTS, gathered_parameter_bytes, shard_components
from trainer.config import RunConfig, apply_overrides, validate_config

GIB = 1024**3
# Components agree to the byte today; 2% leaves room for a library release moving a small tensor.
COMPONENT_TOLERANCE = 0.02
PEAK_TOLERANCE = 0.10


def config(**sections: dict) -> RunConfig:
    return validate_config(dict(sections))


def overrides(*items: str) -> RunConfig:
    return validate_config(apply_overrides({}, list(items)))


# --- calibration against the runner on the CPU ---------------------------------------------------
CALIBRATION = {
    "llama-lora-eager-fp32-adamw-b2": [
        "model.name=tiny-llama",
        "model.attn_implementation=eager",
        "data.seq_len=512",
        "train.micro_batch_size=2",
    ],
    "llama-lora-sdpa-bf16": [
        "model.name=tiny-llama",
        "model.dtype=bf16",
        "data.seq_len=512",
        "train.micro_batch_size=1",
    ],
    "llama-full-sdpa-ckpt-sgd-1024": [
        "model.name=tiny-llama",
        "lora=null",
        "model.gradient_checkpointing=true",
        "train.optimizer=sgd",
        "data.seq_len=1024",
        "train.micro_batch_size=1",
    ],
    "llama-full-eager-amp-bf16-b2": [
        "model.name=tiny-llama",
        "lora=null",
        "model.attn_implementation=eager",
        "train.mixed_precision=bf16",
        "data.seq_len=256",
        "train.micro_batch_size=2",
    ],
    "qwen2-full-eager-fp32": [
        "model.name=tiny-qwen2",
        "lora=null",
        "model.attn_implementation=eager",
        "data.seq_len=512",
        "train.micro_batch_size=1",
    ],
    "qwen2-lora-ckpt-bf16-sgd-b4": [
        "model.name=tiny-qwen2",
        "model.dtype=bf16",
        "model.gradient_checkpointing=true",
        "train.optimizer=sgd",
        "data.seq_len=128",
        "train.micro_batch_size=4",
    ],
    "gpt2-full-sdpa-fp32-b2": ["model.name=tiny-gpt2", "lora=null", "data.seq_len=256", "train.micro_batch_size=2"],
    "gpt2-lora-eager-b4": [
        "model.name=tiny-gpt2",
        "lora.target_modules=[c_attn]",
        "model.attn_implementation=eager",
        "data.seq_len=256",
        "train.micro_batch_size=4",
    ],
    # transformers' Adafactor upcasts a 16-bit gradient before making its states: fp32 states.
    "llama-full-adafactor-bf16": [
        "model.name=tiny-llama",
        "lora=null",
        "model.dtype=bf16",
        "train.optimizer=adafactor",
        "data.seq_len=128",
        "train.micro_batch_size=1",
    ],
    # GPT-2's softmax has no dtype argument: under autocast its input is the 16-bit scores plus the
    # fp32 causal mask, promoted to fp32, and softmax keeps an fp32 output.
    "gpt2-full-eager-amp-bf16": [
        "model.name=tiny-gpt2",
        "lora=null",
        "model.attn_implementation=eager",
        "train.mixed_precision=bf16",
        "data.seq_len=256",
    ],
    "gpt2-full-eager-ckpt-bf16-sgd": [
        "model.name=tiny-gpt2",
        "lora=null",
        "model.attn_implementation=eager",
        "model.gradient_checkpointing=true",
        "model.dtype=bf16",
        "train.optimizer=sgd",
        "data.seq_len=256",
        "train.micro_batch_size=1",
    ],
}


def _live_peak_mode(preexisting):
    """A dispatch mode that tracks the bytes of storages created by ops, freed when they die."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class LivePeak(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.live = {tensor.untyped_storage().data_ptr(): 0 for tensor in preexisting}
            self.current = self.peak = 0

        def _free(self, key: int, size: int) -> None:
            if self.live.pop(key, None) is not None:
                self.current -= size

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in tree_flatten(out)[0]:
                if isinstance(tensor, torch.Tensor):
                    storage = tensor.untyped_storage()
                    key, size = storage.data_ptr(), storage.nbytes()
                    if key and key not in self.live:
                        self.live[key] = size
                        self.current += size
                        weakref.finalize(storage, self._free, key, size)
            self.peak = max(self.peak, self.current)
            return out

    return LivePeak()


def _measure(cfg: RunConfig):
    """Two steps of the runner; the second (optimizer states exist) under the peak tracker."""
    import torch

    from collector.tensors import unique_storage_bytes
    from trainer.loop import make_monitor, setup, train

    training = setup(cfg, torch.device("cpu"))
    samples: list = []
    monitor = make_monitor(cfg, training, samples.append)
    train(training, monitor, first_step=1)
    states = [
        value
        for state in training.optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    ]
    mode = _live_peak_mode([*training.built.model.parameters(), *states])
    with mode:
        train(training, monitor, first_step=2)
    monitor.close()
    tensors = samples[-1].tensors
    # Buffers (GPTBigCode's causal-mask table) are device memory the runner does not call parameters.
    buffers = unique_storage_bytes(training.built.model.buffers())
    return tensors, tensors.parameter_bytes + tensors.optimizer_state_bytes + buffers + mode.peak


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False")  # peft on GPT-2's Conv1D
@pytest.mark.parametrize("items", CALIBRATION.values(), ids=CALIBRATION.keys())
def test_components_and_peak_match_the_runner_on_cpu(items: list[str]):
    base = ["train.device=cpu", "train.max_steps=1", "monitor.track_modules=false"]
    cfg = overrides(*base, *items)
    measured, measured_peak = _measure(cfg)
    estimate = estimate_analytic(cfg, device="cpu")
    totals = estimate.totals
    pairs = {
        "parameters": (totals["parameters"], measured.parameter_bytes),
        "gradients": (totals["gradients"], measured.gradient_bytes),
        "optimizer_states": (totals["optimizer_states"], measured.optimizer_state_bytes),
        "saved_for_backward": (totals["saved_for_backward"], measured.activation_bytes),
    }
    for name, (analytic, actual) in pairs.items():
        assert analytic == pytest.approx(actual, rel=COMPONENT_TOLERANCE, abs=64), name
    assert estimate.peak_allocated_bytes == pytest.approx(measured_peak, rel=PEAK_TOLERANCE)


# Families without a tiny preset, as config.json directories (random weights).
FAMILIES = {
    "gemma-full-eager": (
        {"model_type": "gemma", "head_dim": 32, "num_key_value_heads": 1, "hidden_act": "gelu_pytorch_tanh"},
        ["lora=null", "model.attn_implementation=eager"],
    ),
    "gemma2-lora-eager-amp": (
        {"model_type": "gemma2", "head_dim": 32, "num_key_value_heads": 2},
        ["model.attn_implementation=eager", "train.mixed_precision=bf16"],
    ),
    "phi-full-sdpa": (
        {"model_type": "phi", "intermediate_size": 256, "partial_rotary_factor": 0.5, "resid_pdrop": 0.1},
        ["lora=null"],
    ),
    "phi3-lora-eager-bf16": (
        {"model_type": "phi3", "num_key_value_heads": 2, "pad_token_id": 0},
        ["lora.target_modules=[qkv_proj,gate_up_proj]", "model.attn_implementation=eager", "model.dtype=bf16"],
    ),
    "mistral-full-eager-ckpt": (
        {"model_type": "mistral", "num_key_value_heads": 2},
        ["lora=null", "model.attn_implementation=eager", "model.gradient_checkpointing=true"],
    ),
    # GPTBigCodeConfig reads n_inner, not intermediate_size: both given so that the two agree.
    "gpt_bigcode-full-sdpa": ({"model_type": "gpt_bigcode", "n_inner": 160}, ["lora=null"]),
    "gpt_bigcode-lora-eager-bf16": (
        {"model_type": "gpt_bigcode", "n_inner": 160},
        ["lora.target_modules=[c_attn,c_proj]", "model.attn_implementation=eager", "model.dtype=bf16"],
    ),
    "gpt_bigcode-mha-full-ckpt-amp": (
        {"model_type": "gpt_bigcode", "n_inner": 160, "multi_query": False},
        ["lora=null", "model.gradient_checkpointing=true", "train.mixed_precision=bf16"],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize(("architecture", "items"), FAMILIES.values(), ids=FAMILIES.keys())
def test_other_families_match_the_runner_on_cpu(tmp_path: Path, architecture: dict, items: list[str]):
    tiny = {
        "vocab_size": 1024,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 2048,
    }
    (tmp_path / "config.json").write_text(json.dumps({**tiny, **architecture}))
    test_components_and_peak_match_the_runner_on_cpu(
        [f"model.name={tmp_path}", "data.seq_len=256", "train.micro_batch_size=2", *items]
    )


# --- the published formulas ------------------------------------------------------------------------
def test_gpt_layer_activations_match_korthikanti():
    # Korthikanti et al. 2022, §4: s·b·h·(34 + 5·a·s/h) bytes per layer at 16 bits, for a GPT layer
    # with a 4h GELU MLP, dropout, and a 1-byte dropout mask (CUDA).
    shape = shape_from_config_dict(
        {
            "model_type": "gpt2",
            "vocab_size": 50257,
            "n_embd": 2048,
            "n_layer": 4,
            "n_head": 16,
            "n_positions": 4096,
            "activation_function": "gelu",
        }
    )
    s, b, h, a = 2048, 2, 2048, 16
    eager = config(
        model={"name": "tiny-gpt2", "dtype": "bf16", "attn_implementation": "eager"},
        lora=None,
        data={"seq_len": s},
        train={"micro_batch_size": b},
    )
    expected = s * b * h * (34 + 5 * a * s / h)
    assert estimate_analytic(eager, shape=shape).per_layer_activation_bytes == pytest.approx(expected, rel=0.01)
    sdpa = eager.model_copy(update={"model": eager.model.model_copy(update={"attn_implementation": "sdpa"})})
    # Fused attention keeps no b·a·s² tensor: the 5·a·s²·b term is exactly what it saves.
    saved = expected - estimate_analytic(sdpa, shape=shape).per_layer_activation_bytes
    assert saved == pytest.approx(5 * a * s * s * b, rel=0.02)


def _states(cfg: RunConfig) -> tuple[int, int, int]:
    totals = estimate_analytic(cfg).totals
    return totals["parameters"], totals["gradients"], totals["optimizer_states"]


def test_mixed_precision_adamw_is_16_bytes_and_pure_bf16_is_8():
    psi = shape_for("llama-2-7b").parameter_count()
    amp = config(model={"name": "llama-2-7b"}, lora=None, train={"mixed_precision": "bf16"})
    assert _states(amp) == (4 * psi, 4 * psi, 8 * psi)  # ZeRO §3.1: 16Ψ in all
    pure = config(model={"name": "llama-2-7b", "dtype": "bf16"}, lora=None)
    assert _states(pure) == (2 * psi, 2 * psi, 4 * psi)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_divide_as_the_paper_says(stage: int):
    psi, ranks = shape_for("llama-2-7b").parameter_count(), 8
    cfg = config(
        model={"name": "llama-2-7b", "dtype": "bf16"},
        lora=None,
        train={"num_gpus": ranks},
        deepspeed={"zero_stage": stage},
    )
    parameters, gradients, states = _states(cfg)
    bucket = min(REDUCE_BUCKET_ELEMENTS, psi) * 2
    expected = {
        1: (2 * psi, 2 * psi, 12 * psi / ranks),  # 4Ψ + 12Ψ/N
        2: (2 * psi, 2 * psi / ranks + bucket, 12 * psi / ranks),  # 2Ψ + 14Ψ/N
        3: (2 * psi / ranks, 2 * psi / ranks + bucket, 12 * psi / ranks),  # 16Ψ/N
    }[stage]
    assert (parameters, gradients, states) == pytest.approx(expected, rel=1e-6)


def test_offload_moves_states_and_parameters_off_the_device():
    cfg = config(
        model={"name": "llama-2-7b", "dtype": "bf16"},
        lora=None,
        train={"num_gpus": 4},
        deepspeed={"zero_stage": 3, "offload_optimizer": "cpu", "offload_params": "cpu"},
    )
    sharded, terms = shard_components({"parameters": 10, "gradients": 20, "optimizer_states": 40, "other": 7}, cfg)
    assert sharded["parameters"] == 0 and sharded["optimizer_states"] == 0 and sharded["other"] == 7
    assert any("offloaded to cpu" in term.name for term in terms)
    assert shard_components({"gradients": 20}, config())[0] == {"gradients": 20}  # no ZeRO: unchanged


def test_fsdp_shards_like_zero3_but_keeps_no_fp32_master_or_fp32_states():
    psi, ranks = shape_for("llama-2-7b").parameter_count(), 8
    common = dict(model={"name": "llama-2-7b", "dtype": "bf16"}, lora=None, train={"num_gpus": ranks})
    fsdp = config(**common, fsdp={"sharding_strategy": "full_shard"})
    # The torch optimizer steps the bf16 shards: 2 + 2 + 4 bytes per parameter, ÷ ranks.
    assert _states(fsdp) == pytest.approx((2 * psi / ranks, 2 * psi / ranks, 4 * psi / ranks), abs=1)
    zero3 = config(**common, deepspeed={"zero_stage": 3})
    assert _states(zero3)[2] == pytest.approx(3 * _states(fsdp)[2], rel=1e-6)  # 12Ψ/N against 4Ψ/N
    # DDP (no_shard) holds everything, as without FSDP; so does FSDP on one GPU, which switches to NO_SHARD.
    assert _states(config(**common, fsdp={"sharding_strategy": "no_shard"})) == _states(config(**common))
    one_gpu = {**common, "train": {"num_gpus": 1}}
    alone = estimate_analytic(config(**one_gpu, fsdp={}))
    assert alone.peak_allocated_bytes == estimate_analytic(config(**one_gpu)).peak_allocated_bytes
    assert any("switches itself to NO_SHARD" in note for note in alone.notes)


def test_fsdp_gathers_the_root_and_two_layer_units_and_shard_grad_op_every_unit():
    shape = shape_for("mistral-7b")
    full = config(model={"name": "mistral-7b", "dtype": "bf16"}, lora=None, train={"num_gpus": 2}, fsdp={})
    root = (shape.embedding_parameters() + shape.final_norm_parameters() + shape.lm_head_parameters()) * 2
    gathered = gathered_parameter_bytes(shape, full)
    assert gathered.forward == root + 2 * shape.layer_parameters() * 2
    # A full fine-tune's backward also holds the computing unit's and the root's unsharded gradients.
    grads = (shape.layer_parameters() + root // 2) * 2
    assert gathered.backward == gathered.forward + grads and gathered.holds_head_gradient
    grad_op = config(**{**full.to_dict(), "fsdp": {"sharding_strategy": "shard_grad_op"}})
    assert gathered_parameter_bytes(shape, grad_op).forward == root + shape.num_layers * shape.layer_parameters() * 2
    # LoRA: the adapters are FSDP units of their own (peft's wrap policy); frozen units make no gradient.
    lora = config(model={"name": "mistral-7b", "dtype": "bf16"}, train={"num_gpus": 2}, fsdp={})
    assert gathered_parameter_bytes(shape, lora).backward == gathered_parameter_bytes(shape, lora).forward
    # Offloaded, the shards live on the host but every unit is still gathered on the GPU.
    offload = config(**{**full.to_dict(), "fsdp": {"offload_params": True}})
    estimate = estimate_analytic(offload)
    assert estimate.totals["parameters"] == estimate.totals["optimizer_states"] == 0
    assert gathered_parameter_bytes(shape, offload) == gathered
    assert any(term.name.startswith("FSDP FULL_SHARD gathered") for term in estimate.terms)


def test_lora_trains_r_times_d_in_plus_d_out_per_matrix():
    # peft's print_trainable_parameters for Llama-2-7B, r=8 on q_proj and v_proj: 4,194,304.
    cfg = config(model={"name": "llama-2-7b", "dtype": "bf16"}, lora={"r": 8, "target_modules": ["q_proj", "v_proj"]})
    totals = estimate_analytic(cfg).totals
    assert totals["gradients"] == 4_194_304 * 4  # adapters of a bf16 base are fp32 (peft)
    assert totals["optimizer_states"] == 2 * 4_194_304 * 4


# --- what users ask (SCENARIOS.md) ------------------------------------------------------------------
def _seven_b_lora(**model) -> dict:
    return dict(
        model={"name": "llama-2-7b", "dtype": "bf16", **model}, data={"seq_len": 4096}, train={"micro_batch_size": 1}
    )


def test_lowering_lora_r_saves_little_at_long_context():
    big = estimate_analytic(config(**_seven_b_lora(attn_implementation="eager"), lora={"r": 64}))
    small = estimate_analytic(config(**_seven_b_lora(attn_implementation="eager"), lora={"r": 8}))
    checkpointed = estimate_analytic(config(**_seven_b_lora(gradient_checkpointing=True), lora={"r": 64}))
    assert big.device_bytes - small.device_bytes < 0.01 * big.device_bytes  # megabytes, not GiBs
    assert big.device_bytes - checkpointed.device_bytes > 50 * GIB  # where the memory really goes


def test_lora_alpha_changes_no_memory():
    one = estimate_analytic(config(**_seven_b_lora(), lora={"r": 16, "alpha": 16}))
    other = estimate_analytic(config(**_seven_b_lora(), lora={"r": 16, "alpha": 64}))
    assert one.to_json() == other.to_json()


def test_eager_attention_grows_with_the_square_of_the_length():
    def scores(seq: int) -> int:
        cfg = config(
            model={
                "name": "qwen2.5-7b",
                "dtype": "bf16",
                "attn_implementation": "eager",
                "gradient_checkpointing": False,
            },
            lora={"r": 8, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj"]},
            data={"seq_len": seq},
            train={"micro_batch_size": 1},
        )
        terms = estimate_analytic(cfg).terms
        return next(term.bytes for term in terms if term.name == "activations per layer: attention scores")

    assert scores(16384) == 4 * scores(8192)


def test_fp32_gqa_sdpa_on_cuda_is_estimated_as_the_math_kernel_it_runs():
    """Measured on an H100 (tests/fixtures/gpu/): tiny-llama's fp32 sdpa and eager steps peaked alike."""

    def peak(attention: str, dtype: str = "fp32", transformers: str | None = None) -> int:
        cfg = config(
            model={"name": "tiny-llama", "dtype": dtype, "attn_implementation": attention}, data={"seq_len": 512}
        )
        return estimate_analytic(cfg, device="cuda", transformers=transformers).peak_allocated_bytes

    assert peak("sdpa") == pytest.approx(peak("eager"), rel=0.01)
    assert peak("sdpa", transformers="4.53.0") < 0.9 * peak("sdpa")  # repeat_kv, then memory-efficient
    assert peak("sdpa", "bf16") < 0.9 * peak("eager", "bf16")  # the flash kernel takes enable_gqa
    cfg = config(model={"name": "tiny-llama"}, data={"seq_len": 512})
    assert any("math kernel" in note for note in estimate_analytic(cfg, device="cuda").notes)
    assert not any("math kernel" in note for note in estimate_analytic(cfg, device="cpu").notes)


def test_logits_are_counted_over_the_vocabulary():
    cfg = config(model={"name": "qwen2.5-7b", "dtype": "bf16"}, data={"seq_len": 16384}, train={"micro_batch_size": 1})
    cells = 16384 * 152064
    terms = {term.name: term.bytes for term in estimate_analytic(cfg).terms}
    assert terms["logits"] == cells * 2 and terms["logits fp32 upcast"] == cells * 4
    assert terms["loss gradient over the vocabulary"] == 2 * cells * 4


# --- precision, quantisation and optimizers -----------------------------------------------------------
def test_nf4_stores_about_half_a_byte_per_quantised_weight():
    shape = shape_for("llama-3-8b")
    model = {"name": "llama-3-8b", "dtype": "bf16", "quantization": "nf4"}
    quantised = shape.num_layers * sum(linear.d_in * linear.d_out for linear in shape.linear_layers())
    terms = {term.name: term.bytes for term in estimate_analytic(config(model=model)).terms}
    assert terms["parameters, quantised linears (nf4)"] == round(quantised * NF4_BYTES_PER_PARAM)
    # prepare_model_for_kbit_training (the default, as TRL and the QLoRA examples run it) makes the rest fp32.
    assert terms["parameters, embeddings/norms/head (fp32)"] == (shape.parameter_count() - quantised) * 4
    unprepared = config(model={**model, "prepare_for_kbit_training": False})
    terms = {term.name: term.bytes for term in estimate_analytic(unprepared).terms}
    assert terms["parameters, embeddings/norms/head (bf16)"] == (shape.parameter_count() - quantised) * 2


# A quantised base on the CPU: bitsandbytes' 4-bit linears run on CUDA only, so each decoder linear is
# replaced by a stand-in that does what Linear4bit.forward does as autograd sees it, and the real
# peft.prepare_model_for_kbit_training (through the runner's `_prepare_kbit`) and get_peft_model run on it.
KBIT = {
    "llama-nf4-sdpa-fp32-stream": ["model.name=tiny-llama", "data.seq_len=256"],
    "llama-nf4-eager-amp-ckpt": [
        "model.name=tiny-llama",
        "model.attn_implementation=eager",
        "train.mixed_precision=bf16",
        "model.gradient_checkpointing=true",
        "data.seq_len=256",
    ],
    "qwen2-nf4-all-linear-amp-b4": [
        "model.name=tiny-qwen2",
        "train.mixed_precision=bf16",
        "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
        "data.seq_len=128",
        "train.micro_batch_size=4",
    ],
    "llama-nf4-unprepared": ["model.name=tiny-llama", "model.prepare_for_kbit_training=false", "data.seq_len=256"],
}


def _stand_in_for_bitsandbytes(model, kept: dict[int, int] | None = None) -> type:
    """Swap every decoder linear for a Linear4bit stand-in: the input cast to the bf16 compute dtype,
    a frozen weight that keeps nothing else for backward (MatMul4Bit keeps only the packed weight),
    the output cast back to the input's dtype. Its weight's class is named Params4bit, the name
    prepare_model_for_kbit_training checks to leave quantised weights alone.

    With `kept`, the matmul is bitsandbytes < 0.43.2's: it keeps its input on its autograd ctx
    whenever an input needs a gradient (`ctx.tensors = (A, B)`), out of saved-tensor hooks' sight;
    each kept storage's bytes are recorded there by address."""
    import torch

    class Params4bit(torch.nn.Parameter):
        pass

    class KeepsInput(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, weight, bias):
            if any(ctx.needs_input_grad[:2]):
                ctx.tensors = (a, weight)
                kept[a.untyped_storage().data_ptr()] = a.untyped_storage().nbytes()
            else:
                ctx.tensors = (None, weight)
            return torch.nn.functional.linear(a, weight, bias)

        @staticmethod
        def backward(ctx, grad):
            return grad @ ctx.tensors[1], None, None

    class Linear4bit(torch.nn.Linear):
        def forward(self, x):
            bias = None if self.bias is None else self.bias.to(torch.bfloat16)
            if kept is not None:
                return KeepsInput.apply(x.to(torch.bfloat16), self.weight, bias).to(x.dtype)
            return torch.nn.functional.linear(x.to(torch.bfloat16), self.weight, bias).to(x.dtype)

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear:
                    stand_in = Linear4bit(child.in_features, child.out_features, bias=child.bias is not None)
                    stand_in.weight = Params4bit(child.weight.detach().to(torch.bfloat16), requires_grad=False)
                    if child.bias is not None:
                        stand_in.bias = torch.nn.Parameter(child.bias.detach().to(torch.bfloat16))
                    setattr(parent, name, stand_in)
    return Params4bit


def _kbit_model(cfg: RunConfig, kept: dict[int, int] | None = None):
    """The runner's QLoRA model on the CPU with bitsandbytes stood in for: (model, vocab, Params4bit)."""
    import torch

    from trainer.models import _apply_lora, _enable_checkpointing, _prepare_kbit, build_model

    torch.manual_seed(0)
    built = build_model(cfg.model.model_copy(update={"quantization": "none"}), None, torch.device("cpu"))
    model = built.model
    quantised_class = _stand_in_for_bitsandbytes(model, kept)
    if cfg.model.prepare_for_kbit_training:
        model = _prepare_kbit(model, cfg.model.gradient_checkpointing)
    if cfg.model.gradient_checkpointing:
        _enable_checkpointing(model)
    model = _apply_lora(model, cfg.lora)
    model.train()
    return model, built.vocab_size, quantised_class


@pytest.mark.parametrize("items", KBIT.values(), ids=KBIT.keys())
def test_kbit_prepared_model_matches_the_walk_on_cpu(items: list[str]):
    """prepare_model_for_kbit_training casts embeddings, norms and lm_head to fp32; the hidden states
    follow them between the quantised matmuls. The walk must know what each op then keeps."""
    import torch

    from collector.tensors import ActivationCounter

    cfg = overrides("train.device=cpu", "model.dtype=bf16", "model.quantization=nf4", *items)
    model, vocab, quantised_class = _kbit_model(cfg)
    counter = ActivationCounter(model)
    ids = torch.randint(0, vocab, (cfg.train.micro_batch_size, cfg.data.seq_len))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.mixed_precision != "no")
    with autocast, counter.forward():
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    estimate = estimate_analytic(cfg, device="cpu", bitsandbytes="0.43.2")
    assert estimate.totals["saved_for_backward"] == pytest.approx(counter.peak_bytes, rel=COMPONENT_TOLERANCE, abs=64)
    dense = [p for name, p in model.named_parameters() if not isinstance(p, quantised_class) and "lora_" not in name]
    dtype = torch.float32 if cfg.model.prepare_for_kbit_training else torch.bfloat16
    assert {p.dtype for p in dense} == {dtype}
    terms = {term.name: term for term in estimate.terms}
    rest = terms[f"parameters, embeddings/norms/head ({'fp32' if dtype == torch.float32 else 'bf16'})"]
    assert rest.bytes == sum(p.nbytes for p in dense)
    if cfg.model.prepare_for_kbit_training:
        assert "prepare_model_for_kbit_training" in rest.source
        assert any("prepare_model_for_kbit_training" in term.source for term in estimate.terms if "activ" in term.name)


@pytest.mark.parametrize("name", ["llama-nf4-sdpa-fp32-stream", "llama-nf4-unprepared", "qwen2-nf4-all-linear-amp-b4"])
def test_old_bitsandbytes_keeps_the_4bit_inputs_the_walk_adds(name: str):
    """bitsandbytes < 0.43.2 keeps each 4-bit linear's (compute-dtype) input until backward: a bf16
    copy per linear when the hidden states are fp32, the hidden states themselves when bf16, and only
    where autograd does not already keep the same storage. Measured as the storages the stand-in's
    ctx holds that no saved tensor shares, against the walk's difference between the versions."""
    import torch

    cfg = overrides("train.device=cpu", "model.dtype=bf16", "model.quantization=nf4", *KBIT[name])
    kept: dict[int, int] = {}
    model, vocab, _ = _kbit_model(cfg, kept)
    saved: set[int] = set()

    def pack(tensor):
        saved.add(tensor.untyped_storage().data_ptr())
        return tensor

    ids = torch.randint(0, vocab, (cfg.train.micro_batch_size, cfg.data.seq_len))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.mixed_precision != "no")
    with autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=ids).loss
    only_on_ctx = sum(nbytes for address, nbytes in kept.items() if address not in saved)
    loss.backward()
    old = estimate_analytic(cfg, device="cpu", bitsandbytes="0.42.0")
    new = estimate_analytic(cfg, device="cpu", bitsandbytes="0.43.2")
    assert only_on_ctx > 0
    assert old.totals["saved_for_backward"] == new.totals["saved_for_backward"]  # hooks never see ctx.tensors
    added = old.totals["activations"] - new.totals["activations"]
    assert added == pytest.approx(only_on_ctx, rel=COMPONENT_TOLERANCE)
    assert any("bitsandbytes 0.42.0 keeps every 4-bit linear's input" in note for note in old.notes)
    assert not any("bitsandbytes" in note and "keeps every" in note for note in new.notes)


def test_eight_bit_adam_keeps_about_two_bytes_per_parameter():
    psi = shape_for("llama-2-7b").parameter_count()
    cfg = config(model={"name": "llama-2-7b", "dtype": "bf16"}, lora=None, train={"optimizer": "adamw_8bit"})
    assert estimate_analytic(cfg).totals["optimizer_states"] == pytest.approx(2.03 * psi, rel=0.01)


def test_paged_states_count_only_in_the_optimizer_step():
    cfg = config(
        model={"name": "llama-2-7b", "dtype": "bf16", "gradient_checkpointing": True},
        lora={"r": 8},
        data={"seq_len": 4096},
        train={"optimizer": "paged_adamw_8bit"},
    )
    estimate = estimate_analytic(cfg)
    assert estimate.peak_phase != "optimizer" and estimate.breakdown["optimizer_states"] == 0
    assert estimate.totals["optimizer_states"] > 0


def test_cuda_dropout_masks_are_bytes_and_cpu_masks_are_floats():
    cfg = config(model={"name": "gpt2", "attn_implementation": "eager"}, lora=None, data={"seq_len": 512})
    cuda = estimate_analytic(cfg, device="cuda").per_layer_activation_bytes
    cpu = estimate_analytic(cfg, device="cpu").per_layer_activation_bytes
    tokens, h, a = 2 * 512, 768, 12
    # fp32 model: two hidden-size masks and one b·a·s² mask per layer shrink from 4 bytes to 1.
    assert cpu - cuda == 3 * (2 * tokens * h + a * 2 * 512 * 512)


def _cuda_block(nbytes: int) -> int:
    """c10/cuda/CUDACachingAllocator.cpp round_size(): a multiple of kMinBlockSize, 512 bytes."""
    return -(-nbytes // 512) * 512


def test_cuda_rounds_every_tensor_to_the_caching_allocators_512_byte_blocks():
    """The CUDA caching allocator rounds each allocation up to 512 bytes and max_memory_allocated
    counts the rounded sizes: the many small tensors of a model (norms, Adafactor's factored
    states and RMS scalars) cost more than their bytes. Shapes are the real model's."""
    import torch

    from trainer.models import build_model

    cfg = config(model={"name": "tiny-llama"}, lora=None, train={"optimizer": "adafactor"})
    params = list(build_model(cfg.model, None, torch.device("meta")).model.parameters())

    def adafactor_states(param, block) -> int:
        # transformers Adafactor, fp32: row and column second moments of a matrix, the whole
        # second moment of a vector, and a 0-dim RMS.
        cells = list(param.shape) if param.dim() == 2 else [param.numel()]
        return sum(block(4 * n) for n in cells) + block(4)

    cuda, cpu = estimate_analytic(cfg, device="cuda"), estimate_analytic(cfg, device="cpu")
    assert cuda.totals["parameters"] == cuda.totals["gradients"] == sum(_cuda_block(p.nbytes) for p in params)
    assert cuda.totals["optimizer_states"] == sum(adafactor_states(p, _cuda_block) for p in params)
    assert cpu.totals["optimizer_states"] == sum(adafactor_states(p, lambda nbytes: nbytes) for p in params)
    assert cuda.totals["optimizer_states"] > 2 * cpu.totals["optimizer_states"]
    assert all(value % 512 == 0 for value in (*cuda.breakdown.values(), cuda.totals["saved_for_backward"]))
    assert any("512 bytes" in note for note in cuda.notes)
    assert any("CUDACachingAllocator" in term.source for term in cuda.terms)
    assert not any("CUDACachingAllocator" in term.source for term in cpu.terms)


# --- the result itself -------------------------------------------------------------------------------
def test_breakdown_sums_to_the_peak_and_terms_cite_sources():
    estimate = estimate_analytic(config(model={"name": "mistral-7b", "dtype": "bf16"}, data={"seq_len": 2048}))
    assert set(estimate.breakdown) == set(BREAKDOWN_KEYS)
    assert estimate.peak_allocated_bytes == sum(estimate.breakdown.values())
    assert all(term.source for term in estimate.terms if term.bytes), [t.name for t in estimate.terms if not t.source]
    assert estimate.runtime_overhead_bytes == CUDA_CONTEXT_BYTES
    assert any("allocator reserve" in note for note in estimate.notes)
    tensors = estimate.peak_allocated_bytes - estimate.breakdown["workspaces"]  # the reserve is among tensors
    assert estimate.allocator_overhead_bytes == allocator_reserve_bytes(tensors) > 0
    assert estimate.peak_reserved_bytes == estimate.peak_allocated_bytes + estimate.allocator_overhead_bytes
    json.dumps(estimate.to_json(80 * GIB))


def test_cpu_estimates_have_no_runtime_overhead():
    estimate = estimate_analytic(config(), device="cpu")
    assert estimate.runtime_overhead_bytes == 0 and estimate.allocator_overhead_bytes == 0
    assert estimate.device_bytes == estimate.peak_allocated_bytes


def test_a_config_json_directory_is_estimated(tmp_path: Path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "vocab_size": 32000,
                "hidden_size": 2048,
                "intermediate_size": 5632,
                "num_hidden_layers": 22,
                "num_attention_heads": 32,
                "num_key_value_heads": 4,
            }
        )
    )
    from_dir = estimate_analytic(config(model={"name": str(tmp_path)}, lora={"r": 8}))
    from_preset = estimate_analytic(config(model={"name": "tinyllama-1.1b"}, lora={"r": 8}))
    assert from_dir.peak_allocated_bytes == from_preset.peak_allocated_bytes


def test_one_estimate_takes_milliseconds():
    cfg = config(
        model={"name": "llama-3-70b", "dtype": "bf16"},
        lora=None,
        train={"num_gpus": 8},
        deepspeed={"zero_stage": 3},
        data={"seq_len": 8192},
    )
    best = min(_timed(cfg) for _ in range(5))
    assert best < 0.05


def _timed(cfg: RunConfig) -> float:
    started = time.perf_counter()
    estimate_analytic(cfg)
    return time.perf_counter() - started
