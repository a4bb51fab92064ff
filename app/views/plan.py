"""The Plan form as plain data: knob values to a run config, an uploaded config.json to a model, fits to rows.

Plan answers "will it fit, and how long a sequence fits" before any GPU is rented, so the config
it builds is the one the CLI and the runner read (`validate_config`); only `runner_issues` is not
asked, since a plan is for hardware that is not this machine.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from diagnosis.architecture import ArchitectureError, ModelShape, shape_for, shape_from_config_dict
from diagnosis.estimate import BREAKDOWN_LABELS, MemoryEstimate
from diagnosis.fit import FitResult, FitRow
from diagnosis.reserve import RESERVE_FRACTION, RESERVE_FRACTION_RANGE, reserve_shortfall_at_worst
from diagnosis.units import human_bytes
from trainer.config import ConfigError, ConfigIssue, RunConfig, apply_overrides, validate_config

# A config.json is a few KiB; anything near this is not one.
MAX_CONFIG_JSON_BYTES = 1024**2
CUSTOM_GPU = "Custom capacity"

# What the form shows first: a common 8B LoRA on one 80 GB card, the case most plans start from.
DEFAULTS: dict[str, Any] = {
    "model.name": "llama-3-8b",
    "model.dtype": "bf16",
    "model.attn_implementation": "sdpa",
    "model.gradient_checkpointing": False,
    "model.quantization": "none",
    "model.double_quantization": True,
    "model.implementation": "transformers",
    "lora_on": True,
    "lora.r": 16,
    "lora.alpha": 32.0,
    "lora.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "data.seq_len": 4096,
    "train.micro_batch_size": 1,
    "train.optimizer": "adamw",
    "train.mixed_precision": "no",
    "train.loss_chunk_tokens": 0,
    "train.num_gpus": 1,
    "deepspeed.zero_stage": 0,
    "deepspeed.offload_optimizer": "none",
    "deepspeed.offload_params": "none",
    "fsdp.sharding_strategy": "off",
    "fsdp.offload_params": False,
}


class PlanInputError(ValueError):
    """An upload or a value the user can fix; the message says how."""


def config_from_knobs(values: Mapping[str, Any], model_name: str) -> dict[str, Any]:
    """The raw run config the knobs describe: what validate_config checks and the estimator reads."""
    raw: dict[str, Any] = {
        "model": {
            "name": model_name,
            "dtype": values["model.dtype"],
            "attn_implementation": values["model.attn_implementation"],
            "gradient_checkpointing": values["model.gradient_checkpointing"],
            "quantization": values["model.quantization"],
            "double_quantization": values.get("model.double_quantization", True),
            "implementation": values.get("model.implementation", "transformers"),
        },
        "lora": None,
        "data": {"seq_len": values["data.seq_len"]},
        "train": {
            "micro_batch_size": values["train.micro_batch_size"],
            "optimizer": values["train.optimizer"],
            "mixed_precision": values["train.mixed_precision"],
            "loss_chunk_tokens": values.get("train.loss_chunk_tokens", 0),
            "num_gpus": values["train.num_gpus"],
        },
    }
    if values["lora_on"]:
        raw["lora"] = {
            "r": values["lora.r"],
            "alpha": values["lora.alpha"],
            "target_modules": list(values["lora.target_modules"]),
        }
    sharding = {key: values[f"deepspeed.{key}"] for key in ("zero_stage", "offload_optimizer", "offload_params")}
    if sharding != {"zero_stage": 0, "offload_optimizer": "none", "offload_params": "none"}:
        raw["deepspeed"] = sharding
    if values["fsdp.sharding_strategy"] != "off":
        raw["fsdp"] = {
            "sharding_strategy": values["fsdp.sharding_strategy"],
            "offload_params": values["fsdp.offload_params"],
        }
    return raw


def check(raw: Mapping[str, Any], shape: ModelShape | None = None) -> tuple[RunConfig | None, list[ConfigIssue]]:
    """The validated config, or every problem with it; LoRA targets are checked against any model's layers."""
    try:
        cfg = validate_config(dict(raw))
    except ConfigError as error:
        return None, error.issues
    if shape is not None and cfg.lora is not None:
        unknown = sorted(set(cfg.lora.target_modules) - set(shape.linear_module_names()))
        if unknown:
            allowed = ", ".join(shape.linear_module_names())
            return None, [ConfigIssue("lora.target_modules", f"{unknown} not in this model; allowed: {allowed}")]
    return cfg, []


def model_shape(name: str) -> ModelShape | None:
    try:
        return shape_for(name)
    except ArchitectureError:
        return None


def read_model_config(data: bytes) -> tuple[dict[str, Any], ModelShape]:
    """An uploaded config.json, parsed as JSON and read as a decoder shape; PlanInputError says what is wrong."""
    if len(data) > MAX_CONFIG_JSON_BYTES:
        raise PlanInputError(
            f"This file is {human_bytes(len(data))}; a config.json is a few KiB (limit "
            f"{human_bytes(MAX_CONFIG_JSON_BYTES)}). Upload the model's config.json, not its weights."
        )
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PlanInputError(f"Not a JSON file ({error}). Upload the model's config.json from its hub page.") from None
    if not isinstance(raw, dict):
        raise PlanInputError("This JSON is not an object: a config.json maps keys such as hidden_size to values.")
    try:
        shape = shape_from_config_dict(raw)
    except ArchitectureError as error:
        raise PlanInputError(f"Cannot estimate this model: {error}.") from None
    return raw, shape


def store_model_config(raw: Mapping[str, Any], folder: Path) -> Path:
    """The config written where the estimators read a model from a path; named by content, so reruns reuse it."""
    text = json.dumps(raw, indent=2, sort_keys=True)
    path = folder / f"config-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return path


def margin_text(estimate: MemoryEstimate, capacity_bytes: int) -> tuple[bool, str]:
    """Whether the step fits the card, and by how much, against the device level (what nvidia-smi shows)."""
    margin = capacity_bytes - estimate.device_bytes
    share = abs(margin) / capacity_bytes if capacity_bytes else 0.0
    if margin >= 0:
        close = " Within 2% of the card: check on the real card." if share < 0.02 else ""
        # Only CUDA estimates carry an allocator reserve; its measured spread can eat a thin margin.
        modelled = estimate.allocator_overhead_bytes > 0
        short = reserve_shortfall_at_worst(estimate.peak_allocated_bytes, margin) if modelled else 0
        if short:
            close = (
                f" The allocator's reserve is taken as {RESERVE_FRACTION:.1%} of the peak; real runs have held up "
                f"to {RESERVE_FRACTION_RANGE[1]:.1%}, which would leave it {human_bytes(short)} short: "
                "check on the real card."
            )
        return True, f"Fits, with {human_bytes(margin)} to spare ({share:.0%} of the card).{close}"
    return False, f"Does not fit: {human_bytes(-margin)} over the card ({share:.0%} of it)."


def patched(cfg: RunConfig, overrides: Sequence[str]) -> RunConfig | None:
    try:
        return validate_config(apply_overrides(cfg.to_dict(), list(overrides)))
    except ConfigError:
        return None


def alpha_change_bytes(cfg: RunConfig, device_bytes: Callable[[RunConfig], int]) -> int | None:
    """Device bytes that doubling lora.alpha changes (0 in every model; measured here, not assumed)."""
    if cfg.lora is None:
        return None
    other = patched(cfg, [f"lora.alpha={cfg.lora.alpha * 2}"])
    return None if other is None else device_bytes(other) - device_bytes(cfg)


def halved_r_saving(cfg: RunConfig, device_bytes: Callable[[RunConfig], int]) -> int | None:
    """What halving lora.r saves: usually megabytes, where a reader expects gigabytes."""
    if cfg.lora is None or cfg.lora.r < 2:
        return None
    other = patched(cfg, [f"lora.r={cfg.lora.r // 2}"])
    return None if other is None else device_bytes(cfg) - device_bytes(other)


def _fit_value(result: FitResult, unit: str) -> str:
    if result.value is None:
        return "nothing fits"
    limit = " (model limit)" if result.value == result.limit else ""
    return f"{result.value:,} {unit}{limit}"


def fit_frame(rows: Sequence[FitRow], cfg: RunConfig) -> pd.DataFrame:
    """The fit table: per setting, the longest sequence at the config's micro-batch and the largest micro-batch."""
    return pd.DataFrame(
        [
            {
                "Setting": row.label,
                f"Longest seq_len (micro-batch {cfg.train.micro_batch_size})": _fit_value(row.seq_len, "tokens"),
                f"Largest micro-batch (seq_len {cfg.data.seq_len:,})": _fit_value(row.micro_batch_size, "sequences"),
                "Stops because": row.seq_len.reason,
            }
            for row in rows
        ]
    )


def _in_a_sentence(label: str) -> str:
    """A label inside a sentence: its first letter lowered ("logits and loss"), which leaves
    "cuBLAS workspaces" as it is."""
    return label[:1].lower() + label[1:]


# Scenario 5: two models of about the same size, one trains and one does not. Side by side, the
# components say where the bytes differ and the shapes say why.
# Which shape facts drive each component, for the sentence that explains a difference.
_DRIVERS = {
    "parameters": ("parameter_count",),
    "gradients": ("parameter_count",),
    "optimizer_states": ("parameter_count",),
    "activations": ("num_layers", "hidden_size", "intermediate_size", "num_heads"),
    "logits_loss": ("vocab_size",),
    "transient": ("num_heads", "intermediate_size", "vocab_size"),
    "workspaces": (),  # the card's and the torch release's, not the model's
}
_SHAPE_LABELS = {
    "parameter_count": "parameters",
    "num_layers": "layers",
    "hidden_size": "hidden size",
    "intermediate_size": "MLP width",
    "num_heads": "attention heads",
    "num_kv_heads": "KV heads",
    "vocab_size": "vocabulary",
}


def _shape_value(shape: ModelShape, fact: str) -> int:
    return shape.parameter_count() if fact == "parameter_count" else int(getattr(shape, fact))


def _shape_text(fact: str, value: int) -> str:
    return f"{value / 1e9:.1f}B" if fact == "parameter_count" else f"{value:,}"


def side_by_side_frame(
    names: tuple[str, str], estimates: tuple[MemoryEstimate, MemoryEstimate], shapes: tuple[ModelShape, ModelShape]
) -> pd.DataFrame:
    """One row per component at each model's peak, the device level, then the shapes behind them."""
    a, b = estimates

    def bytes_row(label: str, first: int, second: int) -> dict[str, str]:
        difference = second - first
        signed = "same" if difference == 0 else ("+" if difference > 0 else "−") + human_bytes(abs(difference))
        return {"": label, names[0]: human_bytes(first), names[1]: human_bytes(second), "Difference": signed}

    rows = [bytes_row(label, a.breakdown[key], b.breakdown[key]) for key, label in BREAKDOWN_LABELS.items()]
    rows.append(bytes_row("Peak allocated", a.peak_allocated_bytes, b.peak_allocated_bytes))
    rows.append(bytes_row("Device (nvidia-smi)", a.device_bytes, b.device_bytes))
    for fact, label in _SHAPE_LABELS.items():
        first, second = (_shape_value(shape, fact) for shape in shapes)
        ratio = "" if first == second or not first else f"×{second / first:.2f}"
        rows.append(
            {"": label[0].upper() + label[1:], names[0]: _shape_text(fact, first), names[1]: _shape_text(fact, second),
             "Difference": ratio}
        )  # fmt: skip
    return pd.DataFrame(rows)


def side_by_side_summary(
    names: tuple[str, str], estimates: tuple[MemoryEstimate, MemoryEstimate], shapes: tuple[ModelShape, ModelShape]
) -> str:
    """Which model needs more at the device level, and the two components that differ most, with the
    shape facts that make them differ."""
    a, b = estimates
    if a.device_bytes == b.device_bytes:
        return f"{names[0]} and {names[1]} need the same at the device level: {human_bytes(a.device_bytes)}."
    if a.device_bytes > b.device_bytes:  # put the hungrier model second
        names, estimates, shapes = names[::-1], estimates[::-1], shapes[::-1]
        a, b = estimates
    less, more = names
    other, hungrier = shapes
    differences = sorted(((b.breakdown[key] - a.breakdown[key], key) for key in BREAKDOWN_LABELS), reverse=True)
    reasons = []
    for difference, key in differences[:2]:
        if difference <= 0:
            break
        # Only the facts that point the same way: a wider MLP explains more activations, fewer layers do not.
        drivers = [
            f"{_SHAPE_LABELS[fact]} {_shape_text(fact, _shape_value(hungrier, fact))} vs "
            f"{_shape_text(fact, _shape_value(other, fact))}"
            for fact in _DRIVERS[key]
            if _shape_value(hungrier, fact) > _shape_value(other, fact)
        ]
        why = f" ({', '.join(drivers)})" if drivers else ""
        reasons.append(f"{_in_a_sentence(BREAKDOWN_LABELS[key])} +{human_bytes(difference)}{why}")
    total = b.device_bytes - a.device_bytes
    return f"{more} needs {human_bytes(total)} more than {less} at the device level" + (
        ": " + "; ".join(reasons) + "." if reasons else "."
    )
