"""Builds the model a run trains: a preset, a local directory, or a hub id; then LoRA via peft.

A directory holding only `config.json` gets random weights, so an architecture can be measured
without its checkpoint; a directory with weights loads them. Gradient checkpointing uses the
non-reentrant implementation PyTorch recommends (works with frozen LoRA bases without
`enable_input_require_grads`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from trainer.config import LoraConfig, ModelConfig
from trainer.presets import PRESETS

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class ModelSetupError(RuntimeError):
    """The config was valid on paper but this model cannot be built as asked."""


@dataclass(frozen=True)
class BuiltModel:
    model: torch.nn.Module
    source: str  # "preset", "config.json (random weights)", "checkpoint" or "hub"
    attn_implementation: str  # what transformers actually loaded
    vocab_size: int
    tokenizer_path: str | None  # a directory with a tokenizer, when the model came with one


def _has_weights(path: Path) -> bool:
    return any((path / name).is_file() for name in _WEIGHT_FILES)


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def _load_base(cfg: ModelConfig) -> tuple[torch.nn.Module, str, str | None]:
    common = dict(attn_implementation=cfg.attn_implementation, dtype=TORCH_DTYPES[cfg.dtype])
    auto = transformers.AutoModelForCausalLM
    preset = PRESETS.get(cfg.name)
    if preset is not None:
        config = getattr(transformers, preset.config_class)(**preset.config_kwargs)
        return auto.from_config(config, **common), "preset", None
    path = Path(cfg.name).expanduser()
    if path.is_dir():
        tokenizer = str(path) if _has_tokenizer(path) else None
        if _has_weights(path):
            return auto.from_pretrained(str(path), **common), "checkpoint", tokenizer
        config = transformers.AutoConfig.from_pretrained(str(path))
        return auto.from_config(config, **common), "config.json (random weights)", tokenizer
    try:
        return auto.from_pretrained(cfg.name, **common), "hub", cfg.name
    except OSError as error:
        raise ModelSetupError(f"model.name {cfg.name!r}: could not load from the hub ({error})") from error


def _apply_lora(model: torch.nn.Module, lora: LoraConfig) -> torch.nn.Module:
    import peft

    lora_config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    try:
        return peft.get_peft_model(model, lora_config)
    except ValueError as error:
        raise ModelSetupError(f"lora.target_modules {list(lora.target_modules)}: {error}") from error


def _enable_checkpointing(model: torch.nn.Module) -> None:
    # transformers 5 renamed the method; older releases only have the gradient_ spelling.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def build_model(cfg: ModelConfig, lora: LoraConfig | None, device: torch.device) -> BuiltModel:
    if cfg.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ModelSetupError("model.attn_implementation flash_attention_2 needs the flash-attn package (CUDA only)")
    model, source, tokenizer = _load_base(cfg)
    if cfg.gradient_checkpointing:
        _enable_checkpointing(model)
    model.config.use_cache = False  # a KV cache is dead weight in training
    attn = getattr(model.config, "_attn_implementation", None) or cfg.attn_implementation
    vocab_size = int(model.get_input_embeddings().num_embeddings)
    if lora is not None:
        model = _apply_lora(model, lora)
    model.to(device)
    model.train()
    return BuiltModel(model, source, attn, vocab_size, tokenizer)
