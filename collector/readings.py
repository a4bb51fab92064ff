"""The readings the collector produces: small immutable records with units in their field names.

A field a probe could not read is None, never a made-up zero. Every reading carries the wall
time it was taken at (`taken_at`, seconds since the epoch) so fields taken together agree.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class AllocatorReading:
    """One `torch.cuda.memory_stats()` call, reduced to what a timeline needs.

    Peaks are since the previous reading: the collector resets peak stats after each step.
    """

    taken_at: float
    allocated_bytes: int
    reserved_bytes: int
    active_bytes: int
    inactive_split_bytes: int
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    num_alloc_retries: int
    num_ooms: int


@dataclass(frozen=True)
class TensorBreakdown:
    """What the training step's tensors hold, counted from the tensors themselves (any device).

    activation_bytes is the largest total saved for backward by one micro-batch's forward
    (saved-tensor hooks, parameters excluded, shared storage counted once).
    """

    parameter_bytes: int
    trainable_parameter_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int
    activation_bytes: int | None


@dataclass(frozen=True)
class HostReading:
    """The trainer process as the operating system sees it."""

    taken_at: float
    rss_bytes: int | None
    peak_rss_bytes: int | None
    cpu_percent: float | None


@dataclass(frozen=True)
class DeviceReading:
    """One NVML sample of one GPU, taken in one pass."""

    taken_at: float
    gpu_index: int
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    gpu_util_percent: float | None
    memory_util_percent: float | None
    temperature_c: float | None
    power_w: float | None
    process_used_bytes: int | None


@dataclass(frozen=True)
class StepSample:
    """Everything recorded for one optimizer step; the unit the sink writes to `step_samples`."""

    step: int
    wall_time: float
    loss: float | None
    tokens: int
    seq_len: int
    step_seconds: float
    tokens_per_s: float | None
    allocator: AllocatorReading | None
    tensors: TensorBreakdown
    host: HostReading

    def columns(self) -> dict:
        """Flat, one key per `step_samples` column (the readings' own timestamps excluded):
        the form the database stores and a post-mortem's recent steps keep."""
        flat = {name: getattr(self, name) for name in _STEP_FIELDS}
        for reading_type, reading in (
            (AllocatorReading, self.allocator),
            (TensorBreakdown, self.tensors),
            (HostReading, self.host),
        ):
            for field in fields(reading_type):
                if field.name != "taken_at":
                    flat[field.name] = getattr(reading, field.name) if reading is not None else None
        return flat


_STEP_FIELDS = ("step", "wall_time", "loss", "tokens", "seq_len", "step_seconds", "tokens_per_s")


@dataclass(frozen=True)
class LayerReading:
    """One module's memory on a profiled step.

    activation_bytes: saved for backward by this module's own operations (not its children's).
    The CUDA fields come from the allocator around the module's forward and backward and are
    None on devices without a caching allocator.
    """

    step: int
    module: str
    activation_bytes: int
    forward_alloc_delta_bytes: int | None = None
    forward_peak_bytes: int | None = None
    backward_peak_bytes: int | None = None


# `PostMortem.module` for a failure in the loss over the logits: after the LM head's forward, or in
# backward before it reaches the head (collector.whereabouts places it; no module of the model's).
LOSS_MODULE = "loss"
# transformers' names for the LM head: lm_head in nearly every family, embed_out in GPT-NeoX (Pythia).
HEAD_MODULES = ("lm_head", "embed_out")


@dataclass(frozen=True)
class PostMortem:
    """Everything saved at an out-of-memory failure, enough to diagnose without the process.

    Mappings are plain JSON-able data (allocator stats, breakdown, batch shape) so a later
    reader needs neither torch nor this code's version to read them.
    """

    step: int | None
    micro_batch: int | None
    phase: str | None
    module: str | None
    module_stack: tuple[str, ...]
    batch_shape: dict | None
    requested_bytes: int | None
    error_type: str
    error_text: str
    traceback: str
    device: str
    device_total_bytes: int | None
    device_free_bytes: int | None
    allocator_stats: dict | None
    tensors: dict | None
    host: dict | None
    nvml: dict | None
    recent_steps: tuple[dict, ...]
    layer_profile: tuple[dict, ...]
    snapshot_path: str | None
    snapshot_bytes: int | None
    snapshot_note: str | None
    finding: str
    finding_details: dict
