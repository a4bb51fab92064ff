"""The widgets of an estimate: a model (preset or uploaded config.json), a card, and the knobs that move memory.

Plan draws them all; Diagnose draws the same ones (under its own key prefix) when a user describes
the run that failed, so both pages build the config the same way (app.views.plan).
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from app.views import launch_form
from app.views import plan as view
from db.engine import workspace_dir
from diagnosis.architecture import ModelShape
from diagnosis.gpus import GPUS, gpu_capacity_bytes, known_gpus
from diagnosis.units import GIB, human_bytes
from trainer.config import DeepSpeedConfig, FsdpConfig, ModelConfig, TrainConfig

PRESET, UPLOAD = "preset", "upload"
# Knobs keep their values across page switches (a user checks Launch or Diagnose and comes back).
_PERSIST = {"persist_state": "session"}
NO_GPU = "(the message's total capacity)"


def _choices(model: type, field: str) -> list[str]:
    # The Literal's values, in the order the config declares them: the form offers what validates.
    return list(model.model_fields[field].annotation.__args__)


def _defaults(prefix: str, values: dict[str, Any]) -> None:
    # Session state, not `value=`: a widget given both warns, and a page switch would reset it.
    for name, value in values.items():
        st.session_state.setdefault(prefix + name, value)


def model_input(prefix: str, default: str | None = None) -> tuple[str | None, ModelShape | None]:
    """The model's name as the config takes it (a preset, or the stored upload's path) and its shape."""
    _defaults(prefix, {"model_kind": PRESET, "model.name": default or view.DEFAULTS["model.name"]})
    kind = st.radio(
        "Model",
        (PRESET, UPLOAD),
        format_func={PRESET: "a preset", UPLOAD: "upload its config.json"}.get,
        horizontal=True,
        key=prefix + "model_kind",
        **_PERSIST,
    )
    if kind == PRESET:
        name = st.selectbox(
            "Preset",
            launch_form.model_choices(),
            format_func=launch_form.model_label,
            key=prefix + "model.name",
            **_PERSIST,
        )
        return name, view.model_shape(name)
    upload = st.file_uploader(
        "config.json (the model's, from its hub page or checkpoint folder)",
        type=["json"],
        key=prefix + "config_json",
        max_upload_size=1,
    )
    if upload is None:
        st.info("Upload the model's `config.json` (a few KiB; no weights needed), or pick a preset.")
        return None, None
    try:
        raw, shape = view.read_model_config(upload.getvalue())
    except view.PlanInputError as error:
        st.error(f"`{upload.name}`: {error}")
        return None, None
    path = view.store_model_config(raw, workspace_dir() / "uploads")
    parameters = shape.parameter_count() / 1e9
    st.caption(
        f"`{upload.name}`: a {shape.model_type} decoder, {shape.num_layers} layers, {parameters:.2f}B parameters."
    )
    return str(path), shape


def gpu_input(prefix: str, *, optional: bool = False) -> tuple[str, int] | None:
    """The card (its name and the bytes a process can use), or None when optional and left unset."""
    default = NO_GPU if optional else "A100 80GB"
    _defaults(prefix, {"gpu": default, "capacity_gib": 32.0})
    options = ([NO_GPU] if optional else []) + [*known_gpus(), view.CUSTOM_GPU]
    gpu = st.selectbox(
        "GPU",
        options,
        key=prefix + "gpu",
        **_PERSIST,
        format_func=lambda name: name if name in (NO_GPU, view.CUSTOM_GPU) else f"{name} · {_usable(name)} usable",
        help="the capacity a process sees (cudaMemGetInfo's total): a little under the card's marketing size",
    )
    if gpu == NO_GPU:
        return None
    if gpu == view.CUSTOM_GPU:
        gib = st.number_input(
            "Capacity (GiB)",
            min_value=0.25,
            max_value=4096.0,
            step=1.0,
            key=prefix + "capacity_gib",
            format="%.2f",
            **_PERSIST,
        )
        return f"a {gib:g} GiB card", int(gib * GIB)
    return gpu, gpu_capacity_bytes(gpu)


def _usable(name: str) -> str:
    return next(human_bytes(gpu.capacity_bytes) for gpu in GPUS if gpu.name == name)


def _keep_targets_valid(key: str, shape: ModelShape | None) -> list[str]:
    """LoRA target options for this model; targets the model lacks are dropped rather than failing the widget."""
    if shape is None:
        return list(st.session_state.get(key) or view.DEFAULTS["lora.target_modules"])
    choices = list(shape.linear_module_names())
    current = [name for name in st.session_state.get(key, view.DEFAULTS["lora.target_modules"]) if name in choices]
    if not current:
        attention = [linear.name for linear in shape.linear_layers() if linear.block == "attention"]
        current = list(dict.fromkeys(attention)) or choices[:1]
    st.session_state[key] = current
    return choices


def knobs(prefix: str, shape: ModelShape | None) -> dict[str, Any]:
    """Every knob that moves the estimate, keyed by its dotted config key (plus `lora_on`)."""
    _defaults(prefix, {name: value for name, value in view.DEFAULTS.items() if name != "lora.target_modules"})

    def key(name: str) -> str:
        return prefix + name

    length, batch = st.columns(2)
    max_length = shape.max_positions if shape is not None else 1_048_576
    if st.session_state[key("data.seq_len")] > max_length:
        st.session_state[key("data.seq_len")] = max_length
    length.number_input(
        "Sequence length (tokens)", min_value=2, max_value=max_length, step=512, key=key("data.seq_len"), **_PERSIST
    )
    batch.number_input(
        "Micro-batch", min_value=1, max_value=65_536, step=1, key=key("train.micro_batch_size"), **_PERSIST
    )

    dtype, precision = st.columns(2)
    dtype.selectbox("Weights dtype", _choices(ModelConfig, "dtype"), key=key("model.dtype"), **_PERSIST)
    precision.selectbox(
        "Mixed precision (autocast)",
        _choices(TrainConfig, "mixed_precision"),
        key=key("train.mixed_precision"),
        **_PERSIST,
        help="fp16 autocast needs fp32 weights (GradScaler); bf16 weights train without autocast",
    )
    attention, quantization = st.columns(2)
    attention.selectbox(
        "Attention",
        _choices(ModelConfig, "attn_implementation"),
        key=key("model.attn_implementation"),
        **_PERSIST,
        help="eager stores every seq_len × seq_len score matrix; sdpa and flash_attention_2 never do",
    )
    quantization.selectbox(
        "Base weights quantised",
        _choices(ModelConfig, "quantization"),
        key=key("model.quantization"),
        **_PERSIST,
        help="bitsandbytes nf4 (QLoRA) or int8; needs LoRA adapters",
    )
    code, double = st.columns(2)
    code.selectbox(
        "Training code",
        _choices(ModelConfig, "implementation"),
        key=key("model.implementation"),
        **_PERSIST,
        help="the code the estimate walks: transformers + PEFT (this runner, the HF Trainer, TRL, axolotl) or "
        "litgpt's own GPT (one qkv linear and LoRA dropout, 128-token bf16 loss chunks, a quantised lm_head)",
    )
    double.toggle(
        "nf4 double quantisation",
        key=key("model.double_quantization"),
        **_PERSIST,
        help="quantise nf4's per-block scales too (QLoRA's recipe; litgpt's bnb.nf4 does not, bnb.nf4-dq does)",
    )
    checkpointing, chunk = st.columns(2)
    checkpointing.toggle(
        "Gradient checkpointing",
        key=key("model.gradient_checkpointing"),
        **_PERSIST,
        help="keep each layer's input only and recompute the rest in backward (~30% slower)",
    )
    chunk.number_input(
        "Loss chunk (tokens)",
        min_value=0,
        max_value=1 << 20,
        step=256,
        key=key("train.loss_chunk_tokens"),
        **_PERSIST,
        help="the LM head and cross-entropy this many tokens at a time, same loss and gradients: no logits for the "
        "whole micro-batch (0: all at once, as transformers does)",
    )

    st.toggle("LoRA adapters (off: full fine-tuning)", key=key("lora_on"), **_PERSIST)
    targets = key("lora.target_modules")
    choices = _keep_targets_valid(targets, shape)
    if st.session_state[key("lora_on")]:
        rank, alpha = st.columns(2)
        rank.number_input("Rank r", min_value=1, max_value=4096, step=1, key=key("lora.r"), **_PERSIST)
        alpha.number_input(
            "Alpha",
            min_value=0.001,
            step=1.0,
            key=key("lora.alpha"),
            **_PERSIST,
            help="scales the adapters' output; it changes no memory (the caption under the estimate checks it)",
        )
        st.multiselect("Target modules", choices, key=targets, accept_new_options=shape is None, **_PERSIST)

    optimizer, gpus = st.columns(2)
    optimizer.selectbox("Optimizer", _choices(TrainConfig, "optimizer"), key=key("train.optimizer"), **_PERSIST)
    gpus.number_input(
        "GPUs (data parallel)",
        min_value=1,
        max_value=65_536,
        step=1,
        key=key("train.num_gpus"),
        **_PERSIST,
        help="ZeRO divides states across them; without ZeRO each GPU holds everything",
    )
    stage, offload_states, offload_params = st.columns(3)
    stage.selectbox("ZeRO stage", [0, 1, 2, 3], key=key("deepspeed.zero_stage"), **_PERSIST)
    offload = _choices(DeepSpeedConfig, "offload_optimizer")
    offload_states.selectbox(
        "Offload optimizer", offload, key=key("deepspeed.offload_optimizer"), help="needs ZeRO ≥ 1", **_PERSIST
    )
    offload_params.selectbox(
        "Offload parameters", offload, key=key("deepspeed.offload_params"), help="needs ZeRO 3", **_PERSIST
    )
    strategy, fsdp_offload = st.columns(2)
    strategy.selectbox(
        "FSDP sharding",
        ["off", *_choices(FsdpConfig, "sharding_strategy")],
        key=key("fsdp.sharding_strategy"),
        help="PyTorch FSDP instead of DeepSpeed: full_shard splits like ZeRO-3, shard_grad_op like ZeRO-2, "
        "and the optimizer keeps its states in the weights' dtype (no fp32 master copy)",
        **_PERSIST,
    )
    fsdp_offload.checkbox(
        "FSDP offload", key=key("fsdp.offload_params"), help="CPU offload: the shards live in host memory", **_PERSIST
    )
    return {name: st.session_state[key(name)] for name in view.DEFAULTS}
