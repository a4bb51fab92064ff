"""What the Post-mortems page says about one failure: the headline figures, the breakdown, each fix's labels."""

from __future__ import annotations

from dataclasses import dataclass

from collector.readings import LOSS_MODULE
from db.queries import PostmortemRecord
from diagnosis.device_use import device_use_at_failure
from diagnosis.suggest import Suggestion
from diagnosis.units import human_bytes

# The tensor breakdown's parts as the post-mortem stores them, in stacking order.
TENSOR_PARTS = {
    "parameter_bytes": "parameters",
    "gradient_bytes": "gradients",
    "optimizer_state_bytes": "optimizer states",
    "activation_bytes": "activations so far",
}


@dataclass(frozen=True)
class Figure:
    label: str
    value: str
    help: str | None = None


def headline(pm: PostmortemRecord, cached_bytes: int | None, shortfall_bytes: int | None) -> list[Figure]:
    """The figures a reader needs first: when, where, what was asked for and what was there."""
    micro = f"micro-batch {pm.micro_batch}" if pm.micro_batch is not None else None
    batch = pm.batch_shape or {}
    shape = (
        f"{batch['batch_size']} × {batch['seq_len']:,} tokens"
        if batch.get("batch_size") is not None and batch.get("seq_len") is not None
        else None
    )
    on_cpu = pm.device.startswith("cpu")
    return [
        Figure("Step", str(pm.step) if pm.step is not None else "n/a", micro),
        Figure("Phase", pm.phase or "n/a", shape and f"batch: {shape}"),
        Figure("Requested", human_bytes(pm.requested_bytes), "the allocation that failed"),
        Figure(
            "Device free",
            human_bytes(pm.device_free_bytes),
            "the CPU has no device reading: the budget was memory.limit_gb" if on_cpu else "as the driver saw it",
        ),
        Figure(
            "Reserved, unallocated",
            human_bytes(cached_bytes),
            "cached by PyTorch's allocator but not in tensors (fragmentation when it could not serve the request)"
            if not on_cpu
            else "the CPU has no caching allocator",
        ),
        Figure("Short by", human_bytes(shortfall_bytes), "bytes the failing step lacked, measured or estimated"),
    ]


def where(pm: PostmortemRecord) -> str:
    """The layer in words: module names are too long for a metric tile."""
    if not pm.module:
        return "The module it failed in was not recorded (module tracking off, or outside the model)."
    stack = [name for name in pm.module_stack if name != pm.module]
    inside = f", inside {' › '.join(f'`{name}`' for name in stack)}" if stack else ""
    batch = pm.batch_shape or {}
    shape = (
        f", on a batch of {batch['batch_size']} × {batch['seq_len']:,} tokens"
        if batch.get("batch_size") is not None and batch.get("seq_len") is not None
        else ""
    )
    if pm.module == LOSS_MODULE:
        return (
            f"**Layer:** the loss, after the LM head{shape}: the logits' fp32 copy, log-softmax and their "
            "gradients over the whole vocabulary, outside any module of the model."
        )
    return f"**Layer:** `{pm.module}`{inside}{shape}."


def error_line(pm: PostmortemRecord) -> str:
    lines = [line.strip() for line in pm.error_text.strip().splitlines() if line.strip()]
    return f"{pm.error_type}: {lines[0]}" if lines else pm.error_type


def tensor_parts(pm: PostmortemRecord) -> dict[str, int]:
    """The tensor breakdown at the failure, only the parts that were measured."""
    tensors = pm.tensors or {}
    return {label: int(tensors[key]) for key, label in TENSOR_PARTS.items() if tensors.get(key) is not None}


def snapshot_text(pm: PostmortemRecord) -> str:
    if pm.snapshot_path:
        size = f" ({human_bytes(pm.snapshot_bytes)})" if pm.snapshot_bytes else ""
        return (
            f"Allocator snapshot{size}: `{pm.snapshot_path}`. Read it with "
            f"`.venv/bin/python -m diagnosis snapshot {pm.snapshot_path}`, or drop it on pytorch.org/memory_viz."
        )
    return f"No allocator snapshot: {pm.snapshot_note or 'none was taken'}."


def saves_text(fix: Suggestion) -> str:
    if fix.saves_bytes is None:
        return "saves ?" + (f" ({fix.saves_reason})" if fix.saves_reason else "")
    return f"saves {human_bytes(fix.saves_bytes)}"


def verdict(fix: Suggestion) -> str:
    """Whether the fix would make the run fit, in the words a reader scans for."""
    if not fix.helps:
        return "cannot help"
    if fix.sufficient:
        return "fits alone"
    if fix.sufficient is False:
        return "helps, not enough alone"
    return "helps"


def category_label(category: str) -> str:
    return category.replace("_", " ")


def gpu_line(pm: PostmortemRecord) -> str | None:
    """What the driver (NVML) saw at the failure: the card's use, this process's share, the rest
    (other processes, which the allocator's own figures cannot show). None for a post-mortem that
    predates the field; a reason where there was no reading."""
    use = device_use_at_failure(pm.nvml)
    if use is None:
        return None
    if not use.available:
        return f"No GPU reading from NVML at the failure: {use.text}."
    return f"**GPU at the failure** (NVML, {use.taken}): {use.text}."
