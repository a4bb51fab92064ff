"""What fits: the longest sequence or the largest micro-batch under a memory capacity.

Memory grows monotonically with sequence length and micro-batch size, so the answer is a search
over the estimate: doubling from the smallest value until it no longer fits, then bisection.
Every candidate goes through `apply_overrides` + `validate_config`, the path a user's `--set`
takes, so the answer is always a config the runner would accept. The Plan page asks this for a few
standard settings at once (`fit_table`): as is, then adding checkpointing, sdpa, LoRA and bf16.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from diagnosis.analytic import estimate_analytic
from diagnosis.architecture import ArchitectureError, shape_for
from diagnosis.estimate import MemoryEstimate
from diagnosis.sharding import fsdp_strategy, zero_stage
from trainer.config import DataConfig, RunConfig, TrainConfig, apply_overrides, validate_config

Estimator = Callable[[RunConfig], MemoryEstimate]
BYTES_PER_GIB = 1024**3

# knob → (smallest allowed value, largest the config accepts)
KNOBS = {
    "data.seq_len": (2, DataConfig.model_fields["seq_len"].metadata[-1].le),
    "train.micro_batch_size": (1, TrainConfig.model_fields["micro_batch_size"].metadata[-1].le),
}


@dataclass(frozen=True)
class FitResult:
    """The largest value of `knob` whose estimate fits, or None with the reason."""

    knob: str
    value: int | None
    capacity_bytes: int
    # The estimate at `value` (at the smallest value when nothing fits).
    estimate: MemoryEstimate | None
    # The largest value searched: the model's positions for a sequence length, or `upper`.
    limit: int
    reason: str

    def to_json(self) -> dict[str, Any]:
        """The `python -m diagnosis fit --json` contract."""
        return {
            "knob": self.knob,
            "value": self.value,
            "capacity_bytes": self.capacity_bytes,
            "limit": self.limit,
            "reason": self.reason,
            "estimate": self.estimate.to_json(self.capacity_bytes) if self.estimate else None,
        }


@dataclass(frozen=True)
class FitRow:
    """One line of the Plan page's table: a setting and what fits with it."""

    label: str
    overrides: tuple[str, ...]
    seq_len: FitResult
    micro_batch_size: FitResult

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "overrides": list(self.overrides),
            "seq_len": self.seq_len.to_json(),
            "micro_batch_size": self.micro_batch_size.to_json(),
        }


def _patched(cfg: RunConfig, knob: str, value: int) -> RunConfig:
    overrides = [f"{knob}={value}"]
    if knob == "data.seq_len" and cfg.data.min_seq_len is not None and cfg.data.min_seq_len > value:
        overrides.append(f"data.min_seq_len={value}")
    return validate_config(apply_overrides(cfg.to_dict(), overrides))


def _limit(cfg: RunConfig, knob: str, upper: int | None) -> int:
    limit = KNOBS[knob][1]
    if knob == "data.seq_len":
        try:
            limit = min(limit, shape_for(cfg.model.name).max_positions)
        except ArchitectureError:
            pass  # a hub id: the estimator will say what it cannot read
    return min(limit, upper) if upper is not None else limit


def largest_fitting(
    cfg: RunConfig,
    capacity_bytes: int,
    knob: str,
    estimator: Estimator = estimate_analytic,
    *,
    upper: int | None = None,
) -> FitResult:
    """The largest `knob` ("data.seq_len" or "train.micro_batch_size") whose estimate fits.

    Fitting means `MemoryEstimate.fits(capacity_bytes)`: device bytes, CUDA context included.
    """
    if knob not in KNOBS:
        raise ValueError(f"knob {knob!r} is not searchable; allowed: {', '.join(KNOBS)}")
    lowest, limit = KNOBS[knob][0], _limit(cfg, knob, upper)
    estimates: dict[int, MemoryEstimate] = {}

    def fits(value: int) -> bool:
        if value not in estimates:
            estimates[value] = estimator(_patched(cfg, knob, value))
        return estimates[value].fits(capacity_bytes)

    # Start from the config's own value: a plan is usually near it, so few estimates are needed.
    start = min(max(_current(cfg, knob), lowest), limit)
    if fits(start):
        good, bad = start, None
        while bad is None and good < limit:  # double until it stops fitting or reaches the limit
            candidate = min(2 * good, limit)
            good, bad = (candidate, None) if fits(candidate) else (good, candidate)
    elif fits(lowest):
        good, bad = lowest, start
    else:
        need = estimates[lowest].device_bytes / BYTES_PER_GIB
        reason = f"even {knob}={lowest} needs {need:.2f} GiB, over {capacity_bytes / BYTES_PER_GIB:.2f} GiB"
        return FitResult(knob, None, capacity_bytes, estimates[lowest], limit, reason)
    if bad is None:
        return FitResult(knob, good, capacity_bytes, estimates[good], limit, f"fits up to the limit {knob}={limit}")
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return FitResult(
        knob,
        good,
        capacity_bytes,
        estimates[good],
        limit,
        f"{knob}={bad} would need "
        f"{estimates[bad].device_bytes / BYTES_PER_GIB:.2f} GiB of {capacity_bytes / BYTES_PER_GIB:.2f} GiB",
    )


def _current(cfg: RunConfig, knob: str) -> int:
    section, key = knob.split(".")
    return int(getattr(getattr(cfg, section), key))


def standard_settings(cfg: RunConfig) -> list[tuple[str, list[str]]]:
    """The Plan page's usual steps, each adding one change to the previous."""
    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    try:
        names = [linear.name for linear in shape_for(cfg.model.name).linear_layers() if linear.block == "attention"]
        attention = list(dict.fromkeys(names))
    except ArchitectureError:
        pass
    lora = f"lora={{r: 16, alpha: 32, dropout: 0.05, target_modules: [{', '.join(attention)}]}}"
    bf16 = ["model.dtype=bf16"] + (["train.mixed_precision=no"] if cfg.train.mixed_precision == "fp16" else [])
    # Across several GPUs, sharding is the full fine-tune's first lever, before giving up on it for LoRA.
    shard = (
        [(f"+ FSDP full_shard across {cfg.train.num_gpus} GPUs", ["fsdp={sharding_strategy: full_shard}"])]
        if cfg.train.num_gpus > 1 and not zero_stage(cfg) and not fsdp_strategy(cfg)
        else []
    )
    # Same loss and gradients without the micro-batch's logits: before anything that changes the model.
    # (litgpt already runs its head and loss in 128-token chunks; the runner's knob is not its.)
    chunked = [("+ loss in 1,024-token chunks", ["train.loss_chunk_tokens=1024"])]
    if cfg.train.loss_chunk_tokens or cfg.model.implementation != "transformers":
        chunked = []
    return [
        ("as is", []),
        ("+ gradient checkpointing", ["model.gradient_checkpointing=true"]),
        ("+ sdpa attention", ["model.attn_implementation=sdpa"]),
        *chunked,
        *shard,
        (f"+ LoRA r=16 on {'/'.join(attention)}", [lora]),
        ("+ bf16 weights", bf16),
    ]


def fit_table(
    cfg: RunConfig,
    capacity_bytes: int,
    settings: Sequence[tuple[str, Sequence[str]]] | None = None,
    *,
    estimator: Estimator = estimate_analytic,
    cumulative: bool = True,
) -> tuple[FitRow, ...]:
    """Longest sequence (at the config's micro-batch) and largest micro-batch (at its sequence
    length) for each setting; with `cumulative`, each setting keeps the previous ones' changes."""
    rows = []
    applied: list[str] = []
    for label, overrides in settings if settings is not None else standard_settings(cfg):
        applied = [*applied, *overrides] if cumulative else list(overrides)
        patched = validate_config(apply_overrides(cfg.to_dict(), applied))
        rows.append(
            FitRow(
                label,
                tuple(applied),
                largest_fitting(patched, capacity_bytes, "data.seq_len", estimator),
                largest_fitting(patched, capacity_bytes, "train.micro_batch_size", estimator),
            )
        )
    return tuple(rows)
