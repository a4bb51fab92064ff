"""Builds the model a run trains: a preset, a local directory, or a hub id; then LoRA via peft.

A directory holding only `config.json` gets random weights, so an architecture can be measured
without its checkpoint; a directory with weights loads them. Gradient checkpointing uses the
non-reentrant implementation PyTorch recommends (works with frozen LoRA bases without
`enable_input_require_grads`). A quantised base goes through `peft.prepare_model_for_kbit_training`
before LoRA, as TRL's SFTTrainer, the peft/HF QLoRA examples and axolotl do, unless
`model.prepare_for_kbit_training` is false.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
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


def has_weights(path: Path) -> bool:
    return any((path / name).is_file() for name in _WEIGHT_FILES)


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def hf_config(name: str) -> transformers.PretrainedConfig | None:
    """The transformers config of a preset, a directory holding config.json, or a config.json file;
    None for anything else (a hub id). The estimator's traced mode builds from the same object."""
    preset = PRESETS.get(name)
    if preset is not None:
        return getattr(transformers, preset.config_class)(**preset.config_kwargs)
    path = Path(name).expanduser()
    if path.is_file():
        raw = json.loads(path.read_text())
        if "model_type" not in raw:
            raise ModelSetupError(f"model.name {name!r}: config.json has no model_type")
        return transformers.AutoConfig.for_model(**raw)
    if path.is_dir():
        return transformers.AutoConfig.from_pretrained(str(path))
    return None


def _quantization_config(quantization: str, double_quantization: bool = True) -> transformers.BitsAndBytesConfig | None:
    if quantization == "nf4":
        return transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=double_quantization,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    if quantization == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return None


def _quantized_from_config(config: transformers.PretrainedConfig, common: dict, loading: dict) -> torch.nn.Module:
    """bitsandbytes quantises while loading a checkpoint only: random weights go through a
    temporary one."""
    with tempfile.TemporaryDirectory(prefix="oomlens-random-weights-") as tmp:
        transformers.AutoModelForCausalLM.from_config(config, **common).save_pretrained(tmp)
        return transformers.AutoModelForCausalLM.from_pretrained(tmp, **loading)


def _load_base(cfg: ModelConfig, device: torch.device) -> tuple[torch.nn.Module, str, str | None]:
    common = dict(attn_implementation=cfg.attn_implementation, dtype=TORCH_DTYPES[cfg.dtype])
    quantization = _quantization_config(cfg.quantization, cfg.double_quantization)
    # bitsandbytes places quantised weights while loading; such a model refuses a later .to().
    loading = dict(common, quantization_config=quantization, device_map={"": device}) if quantization else common
    auto = transformers.AutoModelForCausalLM
    path = Path(cfg.name).expanduser()
    if path.is_dir() and has_weights(path):
        tokenizer = str(path) if _has_tokenizer(path) else None
        return auto.from_pretrained(str(path), **loading), "checkpoint", tokenizer
    config = hf_config(cfg.name)
    if config is not None:
        source = "preset" if cfg.name in PRESETS else "config.json (random weights)"
        tokenizer = str(path) if path.is_dir() and _has_tokenizer(path) else None
        if quantization is not None:
            return _quantized_from_config(config, common, loading), source, tokenizer
        return auto.from_config(config, **common), source, tokenizer
    try:
        return auto.from_pretrained(cfg.name, **loading), "hub", cfg.name
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


def _prepare_kbit(model: torch.nn.Module, gradient_checkpointing: bool) -> torch.nn.Module:
    """peft.prepare_model_for_kbit_training: freezes every parameter, casts the non-quantised 16-bit
    ones (embeddings, norms, lm_head, biases) to fp32 and, with checkpointing, enables it
    (non-reentrant, as `_enable_checkpointing`, so it adds no input-gradient hook)."""
    import peft

    return peft.prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )


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
    model, source, tokenizer = _load_base(cfg, device)
    if cfg.quantization != "none" and cfg.prepare_for_kbit_training:
        model = _prepare_kbit(model, cfg.gradient_checkpointing)
    if cfg.gradient_checkpointing:
        _enable_checkpointing(model)
    model.config.use_cache = False  # a KV cache is dead weight in training
    attn = getattr(model.config, "_attn_implementation", None) or cfg.attn_implementation
    vocab_size = int(model.get_input_embeddings().num_embeddings)
    if lora is not None:
        model = _apply_lora(model, lora)
    if cfg.quantization == "none":
        model.to(device)
    model.train()
    return BuiltModel(model, source, attn, vocab_size, tokenizer)
