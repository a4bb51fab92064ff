"""The Launch page's widgets, one section per config section, each field followed by its own problems.

Widgets hold their values in session state under `KEY + name` (names from app.views.launch_form);
the page reads them all before drawing, so every field can show the problems of the whole config.
`persist_state="session"` keeps what a user typed across page switches and hidden fields.
"""

from __future__ import annotations

from collections.abc import Mapping

import streamlit as st

from app.views import launch_form as form
from trainer.config import ModelConfig, TrainConfig
from trainer.presets import PRESETS

KEY = "launch."
_PERSIST = {"persist_state": "session"}


def _choices(model: type, field: str) -> list[str]:
    # The Literal's values, in the order the config declares them: the form offers what validates.
    return list(model.model_fields[field].annotation.__args__)


def _problems(errors: Mapping[str, list[str]], refusals: Mapping[str, list[str]], *fields: str) -> None:
    for field in fields:
        for message in errors.get(field, ()):
            st.error(f"`{field}`: {message}", icon=":material/error:")
        for message in refusals.get(field, ()):
            st.warning(f"`{field}`: the runner refuses this here: {message}", icon=":material/block:")


def model_section(errors: Mapping[str, list[str]], refusals: Mapping[str, list[str]]) -> None:
    st.subheader("Model")
    kind = st.radio(
        "Model",
        (form.PRESET, form.PATH),
        format_func={form.PRESET: "a preset (random weights)", form.PATH: "a local path or hub id"}.get,
        horizontal=True,
        key=KEY + "model_kind",
        **_PERSIST,
    )
    if kind == form.PRESET:
        name = st.selectbox(
            "Preset",
            form.model_choices(),
            format_func=form.model_label,
            key=KEY + "model.name",
            help="tiny-* train on a CPU in seconds; the others copy published architectures (random weights) and "
            "need a GPU of their size",
            **_PERSIST,
        )
        if not str(name).startswith("tiny-"):
            st.caption("A full-size architecture: check that it fits before launching (Plan, or the Diagnose CLI).")
    else:
        st.text_input(
            "Path",
            key=KEY + "model_path",
            placeholder="/models/my-llama (a directory with config.json) or owner/name",
            **_PERSIST,
        )
    _problems(errors, refusals, "model.name")
    dtype, attention, checkpointing = st.columns(3)
    with dtype:
        st.selectbox("Weights dtype", _choices(ModelConfig, "dtype"), key=KEY + "model.dtype", **_PERSIST)
        _problems(errors, refusals, "model.dtype")
    with attention:
        st.selectbox(
            "Attention",
            _choices(ModelConfig, "attn_implementation"),
            key=KEY + "model.attn_implementation",
            help="eager stores every seq_len × seq_len score matrix; sdpa and flash_attention_2 never do",
            **_PERSIST,
        )
        _problems(errors, refusals, "model.attn_implementation")
    with checkpointing:
        st.toggle(
            "Gradient checkpointing",
            key=KEY + "model.gradient_checkpointing",
            help="keep each layer's input only and recompute the rest in backward (~30% slower)",
            **_PERSIST,
        )
        _problems(errors, refusals, "model.gradient_checkpointing")


def lora_section(errors: Mapping[str, list[str]], refusals: Mapping[str, list[str]]) -> None:
    st.subheader("LoRA")
    on = st.toggle("LoRA adapters (off: full fine-tuning)", key=KEY + "lora_on", **_PERSIST)
    _problems(errors, refusals, "lora")
    if not on:
        st.caption("Full fine-tuning: every weight gets a gradient and optimizer states.")
        return
    r, alpha, dropout = st.columns(3)
    with r:
        st.number_input("Rank `r`", min_value=1, max_value=4096, step=1, key=KEY + "lora.r", **_PERSIST)
        _problems(errors, refusals, "lora.r")
    with alpha:
        st.number_input(
            "Alpha",
            min_value=0.001,
            step=1.0,
            key=KEY + "lora.alpha",
            help="a scale on the adapters' output: it changes no memory at all",
            **_PERSIST,
        )
        _problems(errors, refusals, "lora.alpha")
    with dropout:
        st.number_input("Dropout", min_value=0.0, max_value=0.99, step=0.05, key=KEY + "lora.dropout", **_PERSIST)
        _problems(errors, refusals, "lora.dropout")
    st.multiselect(
        "Target modules",
        form.target_choices(_model_name(), st.session_state.get(KEY + "lora.target_modules", ())),
        key=KEY + "lora.target_modules",
        accept_new_options=st.session_state.get(KEY + "model_kind") == form.PATH,
        help="the linear layers that get adapters; each adds r × (in + out) trainable parameters",
        **_PERSIST,
    )
    _problems(errors, refusals, "lora.target_modules")


def _model_name() -> str | None:
    if st.session_state.get(KEY + "model_kind") == form.PRESET:
        return st.session_state.get(KEY + "model.name")
    return None


def keep_targets_valid() -> None:
    """Switching presets changes the layer names: keep the targets the new model has, else its usual pair."""
    name = _model_name()
    if name not in PRESETS:
        return
    choices = form.target_choices(name)
    current = st.session_state.get(KEY + "lora.target_modules") or []
    kept = [target for target in current if target in choices]
    if kept != list(current) or not kept:
        st.session_state[KEY + "lora.target_modules"] = kept or form.default_targets(choices)


def data_section(errors: Mapping[str, list[str]], refusals: Mapping[str, list[str]]) -> None:
    st.subheader("Data")
    kind = st.radio(
        "Source",
        (form.SYNTHETIC, form.FILE),
        format_func={form.SYNTHETIC: "synthetic tokens", form.FILE: "a .txt or .jsonl file"}.get,
        horizontal=True,
        key=KEY + "data_kind",
        **_PERSIST,
    )
    if kind == form.FILE:
        path, field = st.columns([3, 1])
        with path:
            st.text_input("File", key=KEY + "data_path", placeholder="/data/train.jsonl", **_PERSIST)
        with field:
            st.text_input("JSONL text field", key=KEY + "data.text_field", **_PERSIST)
    _problems(errors, refusals, "data.source", "data.text_field")
    length, vary, shortest = st.columns(3)
    with length:
        st.number_input(
            "Sequence length (tokens)", min_value=2, max_value=1_048_576, step=256, key=KEY + "data.seq_len", **_PERSIST
        )
        _problems(errors, refusals, "data.seq_len")
    with vary:
        st.toggle(
            "Variable lengths",
            key=KEY + "data.vary_length",
            help="each micro-batch draws its length from [min, seq_len]: the pattern that fragments the allocator",
            **_PERSIST,
        )
        _problems(errors, refusals, "data.vary_length")
    with shortest:
        if st.session_state.get(KEY + "data.vary_length"):
            st.number_input("Shortest length", min_value=2, step=64, key=KEY + "data.min_seq_len", **_PERSIST)
        _problems(errors, refusals, "data.min_seq_len")


def train_section(errors: Mapping[str, list[str]], refusals: Mapping[str, list[str]]) -> None:
    st.subheader("Training")
    micro, accumulation, steps, lr = st.columns(4)
    with micro:
        st.number_input(
            "Micro-batch", min_value=1, max_value=65_536, step=1, key=KEY + "train.micro_batch_size", **_PERSIST
        )
        _problems(errors, refusals, "train.micro_batch_size")
    with accumulation:
        st.number_input(
            "Accumulation steps", min_value=1, max_value=65_536, step=1, key=KEY + "train.grad_accum_steps", **_PERSIST
        )
        _problems(errors, refusals, "train.grad_accum_steps")
    with steps:
        st.number_input("Optimizer steps", min_value=1, step=10, key=KEY + "train.max_steps", **_PERSIST)
        _problems(errors, refusals, "train.max_steps")
    with lr:
        st.number_input("Learning rate", min_value=1e-12, step=1e-5, format="%.2e", key=KEY + "train.lr", **_PERSIST)
        _problems(errors, refusals, "train.lr")
    optimizer, precision, device, chunk = st.columns(4)
    with optimizer:
        st.selectbox("Optimizer", _choices(TrainConfig, "optimizer"), key=KEY + "train.optimizer", **_PERSIST)
        _problems(errors, refusals, "train.optimizer")
    with precision:
        st.selectbox(
            "Mixed precision (autocast)",
            _choices(TrainConfig, "mixed_precision"),
            key=KEY + "train.mixed_precision",
            **_PERSIST,
        )
        _problems(errors, refusals, "train.mixed_precision")
    with device:
        devices = ["auto", "cpu", "cuda"]
        typed = st.session_state.get(KEY + "train.device")
        st.selectbox(
            "Device",
            devices + ([typed] if typed and typed not in devices else []),
            key=KEY + "train.device",
            accept_new_options=True,
            help="auto: CUDA when there is one; type cuda:N for another GPU",
            **_PERSIST,
        )
        _problems(errors, refusals, "train.device")
    with chunk:
        st.number_input(
            "Loss chunk (tokens)",
            min_value=0,
            max_value=1 << 20,
            step=256,
            key=KEY + "train.loss_chunk_tokens",
            help="the LM head and cross-entropy this many tokens at a time, with the same loss and gradients: "
            "no logits for the whole micro-batch (0: all at once, as transformers does)",
            **_PERSIST,
        )
        _problems(errors, refusals, "train.loss_chunk_tokens")


def memory_section(errors: Mapping[str, list[str]], refusals: Mapping[str, list[str]]) -> None:
    st.subheader("Memory")
    limit, alloc = st.columns(2)
    with limit:
        st.number_input(
            "Memory limit (GiB)",
            min_value=0.01,
            step=0.25,
            key=KEY + "memory.limit_gb",
            placeholder="no limit",
            help="a budget that makes a real out-of-memory failure past it: a per-process fraction on CUDA, a "
            "data-segment limit on the CPU",
            **_PERSIST,
        )
        _problems(errors, refusals, "memory.limit_gb")
    with alloc:
        st.text_input(
            "Allocator settings (`PYTORCH_CUDA_ALLOC_CONF`)",
            key=KEY + "memory.alloc_conf",
            placeholder="expandable_segments:True",
            **_PERSIST,
        )
        _problems(errors, refusals, "memory.alloc_conf")
