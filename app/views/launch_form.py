"""The Launch form as plain data: widget values to the run config the CLI reads, and back.

The form edits a base config (a common setup, or a past run's config) rather than building one
from nothing, so keys it has no widget for (monitor, debug, deepspeed) are kept as they were.
Values are keyed by the dotted config key they set; the few that are not config keys (which kind
of model or data source) have plain names.
"""

from __future__ import annotations

import copy
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from app.views.dotted import flatten, yaml_value
from trainer.config import ConfigIssue, RunConfig, apply_overrides, validate_config
from trainer.presets import PRESETS

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PRESET, PATH = "preset", "path"
SYNTHETIC, FILE = "synthetic", "file"
CLI = ".venv/bin/python -m trainer run"

# Fields that show their own problems, by the dotted key validate_config names. A problem whose
# key is none of these (or below one of them) is shown once, above the Launch button.
FIELDS = (
    "model.name",
    "model.dtype",
    "model.attn_implementation",
    "model.gradient_checkpointing",
    "lora",
    "lora.r",
    "lora.alpha",
    "lora.dropout",
    "lora.target_modules",
    "data.source",
    "data.text_field",
    "data.seq_len",
    "data.vary_length",
    "data.min_seq_len",
    "train.micro_batch_size",
    "train.grad_accum_steps",
    "train.max_steps",
    "train.lr",
    "train.optimizer",
    "train.mixed_precision",
    "train.device",
    "train.loss_chunk_tokens",
    "memory.limit_gb",
    "memory.alloc_conf",
)


@dataclass(frozen=True)
class Setup:
    """A common starting point: an example file with a few overrides."""

    slug: str  # also `?setup=` in the Launch page's URL
    title: str
    description: str
    example: str  # a file in examples/
    overrides: tuple[str, ...] = ()

    def config(self) -> dict[str, Any]:
        return _setup_config(self)


SETUPS = (
    Setup(
        "tiny-lora-cpu",
        "Tiny LoRA on the CPU",
        "A 2-layer Llama (random weights) with LoRA on q/v: 20 steps train in seconds on two cores.",
        "tiny-llama-lora.yaml",
        ("train.device=cpu",),
    ),
    Setup(
        "scenario-1",
        "Scenario 1: long-context LoRA that runs out of its CPU budget",
        "Eager attention at 4,096 tokens under a 0.25 GiB budget (examples/cpu-oom.yaml): it dies in its first "
        "step, as a 7B LoRA does at 4k tokens on an A100, and leaves a post-mortem with ranked fixes.",
        "cpu-oom.yaml",
    ),
    Setup(
        "full-fine-tune",
        "Full fine-tune on the CPU",
        "Every weight trained: gradients and AdamW states for all parameters, to set against LoRA's peak.",
        "tiny-llama-lora.yaml",
        ("lora=null", "train.device=cpu"),
    ),
    Setup(
        "variable-length",
        "Variable-length batches",
        "Each micro-batch draws its length from 64 to 1,024 tokens: the pattern that fragments a CUDA caching "
        "allocator.",
        "tiny-llama-lora.yaml",
        ("data.seq_len=1024", "data.vary_length=true", "data.min_seq_len=64"),
    ),
)
SETUPS_BY_SLUG = {setup.slug: setup for setup in SETUPS}


@cache
def _setup_config_cached(setup: Setup) -> str:
    raw = yaml.safe_load((EXAMPLES / setup.example).read_text()) or {}
    return validate_config(apply_overrides(raw, list(setup.overrides))).to_yaml()


def _setup_config(setup: Setup) -> dict[str, Any]:
    # Cached as text, so a caller editing the dict cannot change the next caller's copy.
    return yaml.safe_load(_setup_config_cached(setup))


def model_choices() -> list[str]:
    """Presets for the model menu: the tiny ones (they train here) first, then the published architectures."""
    tiny = [name for name in PRESETS if name.startswith("tiny-")]
    return tiny + sorted(name for name in PRESETS if name not in tiny)


def model_label(name: str) -> str:
    preset = PRESETS.get(name)
    return f"{name} · {preset.description}" if preset and preset.description else name


def target_choices(model_name: str | None, current: Iterable[str] = ()) -> list[str]:
    """LoRA target options: the preset's linear layers, or (a local model) the usual Llama names plus the current."""
    preset = PRESETS.get(model_name or "")
    if preset is not None:
        return list(preset.linear_module_names)
    names = list(PRESETS["tiny-llama"].linear_module_names)
    return names + [name for name in current if name not in names]


def default_targets(choices: list[str]) -> list[str]:
    """q/v when the model has them (the LoRA paper's choice), else the first linear layer."""
    wanted = [name for name in ("q_proj", "v_proj") if name in choices]
    return wanted or choices[:1]


def form_values(config: Mapping[str, Any]) -> dict[str, Any]:
    """Widget values for a config (complete or not: defaults stand in for what it leaves out)."""
    full = _complete(config)
    model, data, train, memory = full["model"], full["data"], full["train"], full["memory"]
    lora = full.get("lora")
    lora_shown = lora or RunConfig().to_dict()["lora"]
    preset = model["name"] in PRESETS
    return {
        "model_kind": PRESET if preset else PATH,
        "model.name": model["name"] if preset else "tiny-llama",
        "model_path": "" if preset else model["name"],
        "model.dtype": model["dtype"],
        "model.attn_implementation": model["attn_implementation"],
        "model.gradient_checkpointing": model["gradient_checkpointing"],
        "lora_on": lora is not None,
        "lora.r": lora_shown["r"],
        "lora.alpha": float(lora_shown["alpha"]),
        "lora.dropout": float(lora_shown["dropout"]),
        "lora.target_modules": list(lora_shown["target_modules"]),
        "data_kind": SYNTHETIC if data["source"] == "synthetic" else FILE,
        "data_path": "" if data["source"] == "synthetic" else data["source"],
        "data.text_field": data["text_field"],
        "data.seq_len": data["seq_len"],
        "data.vary_length": data["vary_length"],
        "data.min_seq_len": data["min_seq_len"] if data["min_seq_len"] is not None else max(2, data["seq_len"] // 4),
        "train.micro_batch_size": train["micro_batch_size"],
        "train.grad_accum_steps": train["grad_accum_steps"],
        "train.max_steps": train["max_steps"],
        "train.lr": float(train["lr"]),
        "train.optimizer": train["optimizer"],
        "train.mixed_precision": train["mixed_precision"],
        "train.device": train["device"],
        "train.loss_chunk_tokens": train["loss_chunk_tokens"],
        # number_input wants one numeric type: a YAML `limit_gb: 1` reads as an int.
        "memory.limit_gb": float(memory["limit_gb"]) if memory["limit_gb"] is not None else None,
        "memory.alloc_conf": memory["alloc_conf"] or "",
    }


def _complete(config: Mapping[str, Any]) -> dict[str, Any]:
    """`config` over the defaults, section by section; a null `lora` stays null."""
    full = RunConfig().to_dict()
    for key, value in config.items():
        if isinstance(value, Mapping) and isinstance(full.get(key), dict):
            full[key] = {**full[key], **value}
        else:
            full[key] = copy.deepcopy(value)
    return full


def config_from_form(values: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """The raw config the form describes, over `base`: what validate_config checks and the trainer reads."""
    raw = _complete(base)
    model = raw["model"]
    model["name"] = values["model.name"] if values["model_kind"] == PRESET else str(values["model_path"]).strip()
    for key in ("dtype", "attn_implementation", "gradient_checkpointing"):
        model[key] = values[f"model.{key}"]
    if values["lora_on"]:
        raw["lora"] = {key: values[f"lora.{key}"] for key in ("r", "alpha", "dropout")}
        raw["lora"]["target_modules"] = list(values["lora.target_modules"])
    else:
        raw["lora"] = None
    data = raw["data"]
    data["source"] = SYNTHETIC if values["data_kind"] == SYNTHETIC else str(values["data_path"]).strip()
    data["text_field"] = values["data.text_field"]
    data["seq_len"] = values["data.seq_len"]
    data["vary_length"] = values["data.vary_length"]
    data["min_seq_len"] = values["data.min_seq_len"] if values["data.vary_length"] else None
    train = raw["train"]
    for key in (
        "micro_batch_size",
        "grad_accum_steps",
        "max_steps",
        "lr",
        "optimizer",
        "mixed_precision",
        "device",
        "loss_chunk_tokens",
    ):
        train[key] = values[f"train.{key}"]
    raw["memory"]["limit_gb"] = values["memory.limit_gb"]
    raw["memory"]["alloc_conf"] = str(values["memory.alloc_conf"] or "").strip() or None
    return raw


def issues_by_field(issues: Iterable[ConfigIssue]) -> dict[str, list[str]]:
    """Each problem under the most specific field it concerns; "" holds those no field shows."""
    grouped: dict[str, list[str]] = {}
    for issue in issues:
        owners = [field for field in FIELDS if issue.key == field or issue.key.startswith(field + ".")]
        owner = max(owners, key=len) if owners else ""
        message = issue.message if owner else str(issue)
        grouped.setdefault(owner, []).append(message)
    return grouped


def overrides(config: Mapping[str, Any]) -> list[str]:
    """`key=value` for every key that differs from the defaults: the shortest `--set` list that rebuilds it."""
    defaults = flatten(RunConfig().to_dict())
    return [
        f"{key}={yaml_value(value)}"
        for key, value in flatten(config).items()
        if key not in defaults or defaults[key] != value
    ]


def cli_command(config: Mapping[str, Any], name: str | None = None) -> str:
    """The terminal command that starts the same run, quoted for a POSIX shell, one `--set` per line."""
    parts = [CLI]
    parts += [f"--set {shlex.quote(item)}" for item in overrides(config)]
    if name:
        parts.append(f"--name {shlex.quote(name)}")
    return " \\\n    ".join(parts)


# Every value the form holds, by name.
NAMES = tuple(form_values({}))
