"""The one run configuration: YAML files, `--set` overrides and the dashboard form all build it.

Imports nothing heavy (no torch, no transformers) so that the launcher, the dashboard and the
estimator can validate a config in milliseconds, before any process starts.

Validation collects every problem and raises once (`ConfigError.issues`), each naming the dotted
key and what is allowed, so a user fixes a YAML file in one pass instead of five.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trainer.presets import PRESETS


@dataclass(frozen=True)
class ConfigIssue:
    """One problem with a config: the dotted key it concerns and what is wrong."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


class ConfigError(ValueError):
    """Raised with every problem found, never just the first."""

    def __init__(self, issues: list[ConfigIssue]):
        self.issues = issues
        lines = "\n".join(f"  - {issue}" for issue in issues)
        super().__init__(f"invalid run config ({len(issues)} problem(s)):\n{lines}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    # A preset from trainer/presets.py, a directory with config.json (random weights unless it
    # also holds weights), or a hub id where the network allows.
    name: str = "tiny-llama"
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = "sdpa"
    gradient_checkpointing: bool = False
    # Base weights quantised by bitsandbytes (QLoRA: nf4 with LoRA adapters); CUDA only.
    quantization: Literal["none", "nf4", "int8"] = "none"
    # With quantization: peft.prepare_model_for_kbit_training before LoRA, as TRL's SFTTrainer, the
    # peft/HF QLoRA examples and axolotl do (the non-quantised weights: embeddings, norms, lm_head,
    # biases, become fp32). false keeps them in model.dtype (litgpt; TRL skips it for sharded QLoRA).
    prepare_for_kbit_training: bool = True
    # With nf4: quantise the per-block scales too (QLoRA's double quantization, ~0.4 bit per weight less).
    double_quantization: bool = True
    # The modelling code the step runs. "transformers" is the runner's; "litgpt" is Lightning's own
    # GPT (fused qkv, its LoRA, 128-token chunked bf16 loss, Fabric's quantisation of every linear),
    # for estimates of runs made with litgpt: the runner refuses it.
    implementation: Literal["transformers", "litgpt"] = "transformers"


class LoraConfig(_Section):
    r: int = Field(8, ge=1, le=4096)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)


class DataConfig(_Section):
    # "synthetic" (random token ids) or a path to a local .txt / .jsonl file.
    source: str = "synthetic"
    seq_len: int = Field(256, ge=2, le=1_048_576)
    # Synthetic only: draw each micro-batch's length uniformly from [min_seq_len, seq_len], the
    # pattern that fragments the caching allocator.
    vary_length: bool = False
    min_seq_len: int | None = Field(None, ge=2)
    # JSONL only: the field holding the text.
    text_field: str = "text"


class TrainConfig(_Section):
    micro_batch_size: int = Field(2, ge=1, le=65_536)
    grad_accum_steps: int = Field(1, ge=1, le=65_536)
    max_steps: int = Field(20, ge=1)
    lr: float = Field(1.0e-4, gt=0)
    # adamw_8bit / paged_adamw_8bit / paged_adamw come from bitsandbytes (CUDA only).
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw", "adafactor", "sgd"] = "adamw"
    weight_decay: float = Field(0.0, ge=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    device: str = "auto"
    seed: int = 0
    # The LM head and the loss N tokens at a time, each chunk's gradients made in forward
    # (trainer/chunked_loss.py): no b·s·V logits. 0: transformers' loss over all logits at once.
    loss_chunk_tokens: int = Field(0, ge=0, le=1 << 20)
    # Data-parallel ranks the step is spread over. The estimator divides ZeRO-sharded states by it;
    # the runner itself trains on one device.
    num_gpus: int = Field(1, ge=1, le=65_536)


class MemoryConfig(_Section):
    # Budget for the run's tensors: on CUDA a per-process memory fraction (the allocator raises a
    # real OOM past it); on CPU a data-segment rlimit on the trainer process on top of what it
    # uses before the model is built, so exceeding it is a real allocation failure.
    limit_gb: float | None = Field(None, gt=0)
    # Becomes PYTORCH_CUDA_ALLOC_CONF (and PYTORCH_ALLOC_CONF) for the trainer process.
    alloc_conf: str | None = None


class DeepSpeedConfig(_Section):
    """ZeRO sharding and offload (the DeepSpeed config's `zero_optimization` keys)."""

    zero_stage: int = Field(0, ge=0, le=3)
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    offload_params: Literal["none", "cpu", "nvme"] = "none"


class FsdpConfig(_Section):
    """PyTorch FSDP, as accelerate's `fsdp_config` names it. The estimator models it; the runner
    does not train with it. Kept apart from `deepspeed` because FSDP lays the optimizer out
    differently: AdamW states in the parameters' own dtype and no fp32 master copy."""

    # full_shard: weights, gradients and states (ZeRO-3's split); shard_grad_op: gradients and
    # states, weights kept whole from forward to backward (ZeRO-2's); no_shard: DDP.
    sharding_strategy: Literal["full_shard", "shard_grad_op", "no_shard"] = "full_shard"
    # CPUOffload(offload_params=True): sharded weights, gradients and optimizer states live in host
    # memory; each unit is still gathered onto the GPU to compute.
    offload_params: bool = False


class MonitorConfig(_Section):
    nvml_interval_s: float = Field(1.0, ge=0.05, le=3600)
    # Count activation bytes saved for backward (saved-tensor hooks) ...
    track_activations: bool = True
    # ... on a batch shape's first forward, then again every N steps (1: every forward); between,
    # the shape's last count is carried, and a shape whose recounts disagree is counted every time.
    activation_recount_every: int = Field(10, ge=1)
    # Module hooks that keep the current layer known, so a post-mortem can name it.
    track_modules: bool = True
    # Per-layer profile on the first N steps, then every M steps (0: never after the first N).
    layer_profile_steps: int = Field(2, ge=0)
    layer_profile_every: int = Field(50, ge=0)
    # CUDA allocator history kept for the OOM snapshot (Python stacks only; 0 turns it off).
    snapshot_max_entries: int = Field(100_000, ge=0)
    # A compressed snapshot larger than this is not kept (the post-mortem says so).
    snapshot_max_mb: float = Field(256, gt=0)


class DebugConfig(_Section):
    # Keep this many MiB of tensors alive per step: a deliberate leak, for demos and tests.
    leak_mb_per_step: float = Field(0, ge=0)


class RunConfig(_Section):
    """A whole run. `lora: null` means full fine-tuning."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig | None = Field(default_factory=LoraConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    deepspeed: DeepSpeedConfig | None = None
    fsdp: FsdpConfig | None = None
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    debug: DebugConfig = Field(default_factory=DebugConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_DEVICE_FORMS = "auto, cpu, cuda or cuda:N"


def _check_device(device: str) -> str | None:
    if device in ("auto", "cpu", "cuda"):
        return None
    if device.startswith("cuda:") and device[5:].isdigit():
        return None
    return f"{device!r} is not a device; allowed: {_DEVICE_FORMS}"


def _check_model_name(name: str) -> str | None:
    if name in PRESETS:
        return None
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            return f"directory {name!r} has no config.json"
        return None
    if path.is_file():
        if path.suffix != ".json":
            return f"{name!r} is a file but not a config.json; give a preset, a directory, a config.json or a hub id"
        return None
    # A hub id has the form owner/name; anything else is a typo of a preset or a path.
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return None
    return (
        f"{name!r} is neither a preset ({', '.join(sorted(PRESETS))}), an existing directory or config.json, "
        "nor a hub id"
    )


def _check_data_source(source: str) -> str | None:
    if source == "synthetic":
        return None
    path = Path(source).expanduser()
    if path.suffix not in (".txt", ".jsonl"):
        return f"{source!r}: allowed: synthetic, or a path to a .txt or .jsonl file"
    if not path.is_file():
        return f"{source!r} does not exist or is not a file"
    return None


def _cross_checks(cfg: RunConfig, broken: set[str]) -> list[ConfigIssue]:
    """Checks that need more than one field, or the filesystem.

    `broken` holds keys that already failed validation (their values here are defaults): a check
    that reads one of them is skipped rather than reported against a value the user never gave.
    """
    issues: list[ConfigIssue] = []

    def add(key: str, message: str | None, reads: tuple[str, ...] = ()) -> None:
        if not message:
            return
        for read in (key, *reads):
            if any(read == bad or read.startswith(bad + ".") or bad.startswith(read + ".") for bad in broken):
                return
        issues.append(ConfigIssue(key, message))

    add("model.name", _check_model_name(cfg.model.name))
    add("data.source", _check_data_source(cfg.data.source))
    add("train.device", _check_device(cfg.train.device))
    if cfg.data.min_seq_len is not None and cfg.data.min_seq_len > cfg.data.seq_len:
        add(
            "data.min_seq_len",
            f"{cfg.data.min_seq_len} is above data.seq_len ({cfg.data.seq_len})",
            reads=("data.seq_len",),
        )
    if cfg.model.dtype != "fp32" and cfg.train.mixed_precision == "fp16":
        # GradScaler refuses to unscale fp16/bf16 gradients: AMP needs fp32 master weights.
        add(
            "train.mixed_precision",
            f"fp16 autocast needs fp32 weights, got model.dtype={cfg.model.dtype}",
            reads=("model.dtype",),
        )
    if cfg.model.implementation == "litgpt":
        add(
            "model.attn_implementation",
            None if cfg.model.attn_implementation == "sdpa" else "litgpt's GPT always runs torch SDPA; use sdpa",
            reads=("model.implementation",),
        )
        add(
            "train.loss_chunk_tokens",
            "litgpt chunks its own head and loss (128 tokens); train.loss_chunk_tokens is the runner's, leave it 0"
            if cfg.train.loss_chunk_tokens
            else None,
            reads=("model.implementation",),
        )
    preset = PRESETS.get(cfg.model.name)
    if cfg.lora is not None and preset is not None:
        unknown = sorted(set(cfg.lora.target_modules) - set(preset.linear_module_names))
        if unknown:
            add(
                "lora.target_modules",
                f"{unknown} not in {cfg.model.name}; allowed: {', '.join(preset.linear_module_names)}",
                reads=("model.name",),
            )
    if preset is not None and cfg.data.seq_len > preset.max_positions:
        add(
            "data.seq_len",
            f"{cfg.data.seq_len} exceeds {cfg.model.name}'s {preset.max_positions} positions",
            reads=("model.name",),
        )
    if cfg.model.quantization != "none" and cfg.lora is None:
        add(
            "model.quantization",
            f"{cfg.model.quantization} base weights cannot be trained in full; add a lora section (QLoRA)",
            reads=("lora",),
        )
    stage = cfg.deepspeed.zero_stage if cfg.deepspeed else 0
    if cfg.deepspeed and cfg.deepspeed.offload_optimizer != "none" and stage < 1:
        add("deepspeed.offload_optimizer", "needs deepspeed.zero_stage 1, 2 or 3", reads=("deepspeed.zero_stage",))
    if cfg.deepspeed and cfg.deepspeed.offload_params != "none" and stage != 3:
        add("deepspeed.offload_params", "needs deepspeed.zero_stage 3", reads=("deepspeed.zero_stage",))
    if cfg.fsdp is not None and _deepspeed_on(cfg.deepspeed):
        add(
            "fsdp", "FSDP and DeepSpeed ZeRO both shard the model: keep one of fsdp and deepspeed", reads=("deepspeed",)
        )
    if cfg.fsdp is not None and cfg.fsdp.offload_params and cfg.fsdp.sharding_strategy == "no_shard":
        add(
            "fsdp.offload_params",
            "needs sharding_strategy full_shard or shard_grad_op",
            reads=("fsdp.sharding_strategy",),
        )
    if cfg.memory.alloc_conf is not None and not cfg.memory.alloc_conf.strip():
        add("memory.alloc_conf", "empty; leave it null or give e.g. expandable_segments:True")
    return issues


def _deepspeed_on(deepspeed: DeepSpeedConfig | None) -> bool:
    """A deepspeed section that asks for anything (a ZeRO stage or an offload), not one left at its defaults."""
    return deepspeed is not None and (
        deepspeed.zero_stage > 0 or deepspeed.offload_optimizer != "none" or deepspeed.offload_params != "none"
    )


_BITSANDBYTES_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw")


def runner_issues(cfg: RunConfig) -> list[ConfigIssue]:
    """What stops the runner on this machine from training a config that is valid on paper.

    Kept apart from `validate_config` because the estimator must accept these configs: a user plans
    a flash-attention QLoRA run across 8 GPUs on a laptop without any of those packages.
    """
    issues: list[ConfigIssue] = []
    on_cpu = cfg.train.device == "cpu"
    if cfg.model.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        issues.append(
            ConfigIssue(
                "model.attn_implementation",
                "flash_attention_2 needs the flash-attn package (CUDA only); use sdpa or eager",
            )
        )
    needs_bnb = []
    if cfg.model.quantization != "none":
        needs_bnb.append(("model.quantization", f"{cfg.model.quantization} quantisation"))
    if cfg.train.optimizer in _BITSANDBYTES_OPTIMIZERS:
        needs_bnb.append(("train.optimizer", f"the {cfg.train.optimizer} optimizer"))
    for key, what in needs_bnb:
        if on_cpu:
            issues.append(ConfigIssue(key, f"{what} runs on CUDA only (bitsandbytes); train.device is cpu"))
        elif importlib.util.find_spec("bitsandbytes") is None:
            issues.append(ConfigIssue(key, f"{what} needs the bitsandbytes package (pip install bitsandbytes)"))
    if _deepspeed_on(cfg.deepspeed):
        issues.append(
            ConfigIssue(
                "deepspeed",
                "the runner trains without DeepSpeed for now; the deepspeed keys are for estimates "
                "(python -m diagnosis estimate)",
            )
        )
    if cfg.fsdp is not None:
        issues.append(ConfigIssue("fsdp", "the runner trains without FSDP for now; the fsdp keys are for estimates"))
    if cfg.model.implementation != "transformers":
        issues.append(
            ConfigIssue(
                "model.implementation",
                f"the runner trains transformers models; {cfg.model.implementation} is for estimates "
                "(python -m diagnosis estimate)",
            )
        )
    if cfg.train.num_gpus > 1:
        issues.append(ConfigIssue("train.num_gpus", "the runner trains on one device; num_gpus > 1 is for estimates"))
    return issues


def _pydantic_issues(error: ValidationError) -> list[ConfigIssue]:
    issues = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(root)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        issues.append(ConfigIssue(key, message))
    return issues


def _without(raw: dict[str, Any], keys: set[str]) -> dict[str, Any]:
    """A copy of `raw` with the given dotted keys removed, so their defaults stand in."""
    result = yaml.safe_load(yaml.safe_dump(raw)) or {}
    for key in keys:
        *parents, leaf = key.split(".")
        node: Any = result
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return result


def validate_config(raw: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from plain data, raising ConfigError with every issue found."""
    if not isinstance(raw, dict):
        raise ConfigError([ConfigIssue("(root)", f"expected a mapping, got {type(raw).__name__}")])
    issues: list[ConfigIssue] = []
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as error:
        issues = _pydantic_issues(error)
        # Validate the rest with the broken keys left at their defaults, so that the cross-field
        # problems are reported in the same pass.
        try:
            cfg = RunConfig.model_validate(_without(raw, {issue.key for issue in issues}))
        except (ValidationError, yaml.YAMLError):
            raise ConfigError(issues) from None
    issues += _cross_checks(cfg, {issue.key for issue in issues})
    if issues:
        raise ConfigError(issues)
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.max_steps=5` → (['train', 'max_steps'], 5); the value is read as YAML."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError([ConfigIssue(key or text, "override must look like dotted.key=value")])
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError([ConfigIssue(key, f"value {value!r} is not valid YAML: {error}")]) from None
    return key.split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `raw` with each `dotted.key=value` set; sections are created as needed."""
    result = yaml.safe_load(yaml.safe_dump(raw)) or {}
    issues: list[ConfigIssue] = []
    for text in overrides:
        try:
            path, value = parse_override(text)
        except ConfigError as error:
            issues.extend(error.issues)
            continue
        node = result
        for part in path[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                issues.append(ConfigIssue(".".join(path), f"{part!r} is not a section"))
                break
            node = node[part]
        else:
            node[path[-1]] = value
    if issues:
        raise ConfigError(issues)
    return result


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML file (or start from defaults), apply overrides, validate."""
    raw: Any = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError([ConfigIssue("--config", f"{str(path)!r} does not exist or is not a file")])
        try:
            raw = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError([ConfigIssue("--config", f"{str(path)!r} is not valid YAML: {error}")]) from None
    if not isinstance(raw, dict):
        raise ConfigError([ConfigIssue("(root)", f"expected a mapping, got {type(raw).__name__}")])
    return validate_config(apply_overrides(raw, overrides or []))
