"""What an estimate of a training step's memory is, whichever way it was made.

The analytic model (`diagnosis.analytic`, formulas) and the traced model (`diagnosis.traced`, the
real transformers model run under fake tensors) both answer with a `MemoryEstimate`, so the CLI,
the suggestion engine's what-ifs and the dashboard's Plan page never care which one ran.

Three levels, as a user compares them with what they see:
- peak allocated: live tensor bytes at the step's worst moment (`max_memory_allocated()`),
  the sum of `breakdown`;
- peak reserved: what the caching allocator holds then (`max_memory_reserved()`): allocated plus
  the allocator's rounding and cache;
- device: what `nvidia-smi` shows for the process: reserved plus the CUDA context and libraries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

# The components a peak is made of. Every estimator fills all of them (0 where a term is absent),
# so a what-if can subtract one estimate from another key by key.
BREAKDOWN_KEYS = (
    "parameters",  # weights on the device (quantised bytes for nf4/int8; 1/N of them under ZeRO-3)
    "gradients",  # gradients of trainable parameters alive at the peak
    "optimizer_states",  # optimizer state (and fp32 master weights under AMP) on the device
    "activations",  # tensors saved for backward and alive at the peak
    "logits_loss",  # logits, their fp32 upcast and the loss's temporaries
    "transient",  # short-lived workspace at the peak (attention scores being built, optimizer temporaries)
    "workspaces",  # cuBLAS/cuBLASLt workspaces PyTorch keeps in its allocator (CUDA only; diagnosis.workspaces)
)
# What each component is called wherever a person reads it (charts, tables, sentences), so every
# page names the same bytes the same way.
BREAKDOWN_LABELS = {
    "parameters": "Parameters",
    "gradients": "Gradients",
    "optimizer_states": "Optimizer states",
    "activations": "Activations saved for backward",
    "logits_loss": "Logits and loss",
    "transient": "Transient buffers",
    "workspaces": "cuBLAS workspaces",
}
assert tuple(BREAKDOWN_LABELS) == BREAKDOWN_KEYS


@dataclass(frozen=True)
class Term:
    """One named contribution with the formula that gave it and where the formula comes from."""

    name: str
    bytes: int
    formula: str
    source: str = ""


@dataclass(frozen=True)
class MemoryEstimate:
    mode: Literal["analytic", "traced"]
    # Bytes per component at the peak moment; sums to peak_allocated_bytes.
    breakdown: Mapping[str, int]
    # When the peak happens: "forward" (end of forward, all activations alive), "backward" or "optimizer".
    peak_phase: str
    # Allocator rounding and cache at the peak (peak reserved − peak allocated).
    allocator_overhead_bytes: int = 0
    # CUDA context, cuDNN workspaces, NCCL buffers: in nvidia-smi, outside PyTorch's stats (cuBLAS's
    # workspaces are PyTorch allocations: the breakdown's "workspaces").
    runtime_overhead_bytes: int = 0
    # Persistent totals whatever the moment (a component can be smaller at the peak, e.g. gradients
    # freed by zero_grad before the forward that peaks): what suggestions about states quote.
    totals: Mapping[str, int] = field(default_factory=dict)
    # Activation bytes of one decoder layer (for per-layer views and "which layer" answers).
    per_layer_activation_bytes: int | None = None
    terms: tuple[Term, ...] = ()
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        missing = set(BREAKDOWN_KEYS) - set(self.breakdown)
        if missing:
            raise ValueError(f"breakdown lacks {sorted(missing)}")

    @property
    def peak_allocated_bytes(self) -> int:
        return sum(self.breakdown.values())

    @property
    def peak_reserved_bytes(self) -> int:
        return self.peak_allocated_bytes + self.allocator_overhead_bytes

    @property
    def device_bytes(self) -> int:
        return self.peak_reserved_bytes + self.runtime_overhead_bytes

    def term_bytes(self, name: str) -> int | None:
        """The bytes of the named term, None where this estimate has none by that name."""
        return next((term.bytes for term in self.terms if term.name == name), None)

    def fits(self, capacity_bytes: int) -> bool:
        return self.device_bytes <= capacity_bytes

    def to_json(self, capacity_bytes: int | None = None) -> dict[str, Any]:
        """The `python -m diagnosis estimate --json` contract."""
        return {
            "mode": self.mode,
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "peak_reserved_bytes": self.peak_reserved_bytes,
            "device_bytes": self.device_bytes,
            "breakdown": {key: int(self.breakdown[key]) for key in BREAKDOWN_KEYS},
            "allocator_overhead_bytes": self.allocator_overhead_bytes,
            "runtime_overhead_bytes": self.runtime_overhead_bytes,
            "totals": dict(self.totals),
            "peak_phase": self.peak_phase,
            "per_layer_activation_bytes": self.per_layer_activation_bytes,
            "capacity_bytes": capacity_bytes,
            "fits": None if capacity_bytes is None else self.fits(capacity_bytes),
            "terms": [vars(term) for term in self.terms],
            "notes": list(self.notes),
        }
