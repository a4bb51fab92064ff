"""What the Diagnose page says about one pasted OOM message: its figures, and the arithmetic a reader skips.

The message prints total, free, allocated and reserved, but not what they imply. Subtracting them
tells the two causes apart that need opposite fixes: memory PyTorch cached but could not use
(fragmentation: an allocator setting) and memory outside PyTorch (another process, the CUDA
context: nothing in this run's config wins it back).
"""

from __future__ import annotations

import pandas as pd

from app.views.postmortem import Figure
from diagnosis.oom_text import OomMessage
from diagnosis.units import GIB, MIB, human_bytes

# What each traceback location means to a reader (diagnosis.oom_text.LOCATIONS).
LOCATION_WORDS = {
    "attention": "in attention (the score matrices grow with the square of the sequence length)",
    "mlp": "in an MLP block",
    "embedding": "in the embedding",
    "logits_loss": "in the logits or the loss (vocabulary × tokens, upcast to fp32)",
    "backward": "in the backward pass",
    "optimizer_step": "in the optimizer step (its states are created on the first step)",
    "checkpoint_save": "while saving a checkpoint",
    "data": "while loading data",
    "model_load": "while loading the model",
    "evaluation": "during evaluation",
}
NOT_OOM = (
    "Not an OOM message: nothing here reads as a PyTorch out-of-memory error. Paste the lines around the "
    "error, from `Traceback (most recent call last):` to the line that says `CUDA out of memory. Tried to "
    "allocate …` (or `DefaultCPUAllocator: can't allocate memory`, `MPS backend out of memory`, `MemoryError`). "
    "A whole log works too: every OOM in it is read. For an allocator snapshot (`torch.cuda.memory._dump_snapshot`), "
    "upload the pickle instead."
)

# The classic message from a 40 GB card, with every figure the arithmetic needs (a user report, PyTorch 1.x).
EXAMPLE = """Traceback (most recent call last):
  File "train.py", line 212, in <module>
    loss.backward()
torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 3.90 GiB (GPU 0; 39.59 GiB total capacity; \
28.77 GiB already allocated; 3.20 GiB free; 34.50 GiB reserved in total by PyTorch) If reserved memory is >> \
allocated memory try setting max_split_size_mb to avoid fragmentation.  See documentation for Memory Management \
and PYTORCH_CUDA_ALLOC_CONF"""


def where(message: OomMessage) -> str | None:
    if message.location is None and message.frame is None:
        return None
    words = LOCATION_WORDS.get(message.location or "", message.location or "")
    frame = f" (`{message.frame}`)" if message.frame and message.frame != message.location else ""
    return (words or "in") + frame


def figures(message: OomMessage) -> list[Figure]:
    """Every number the message printed, plus the two it implies; a figure it does not print is left out."""
    candidates = [
        ("Requested", message.requested_bytes, "the allocation that failed (rounded by the allocator)"),
        ("Total capacity", message.total_bytes, "what the device reports as usable"),
        ("Free", message.free_bytes, "free on the device, as the driver saw it"),
        ("Allowed", message.allowed_bytes, "a cap set by torch.cuda.set_per_process_memory_fraction"),
        ("Allocated by PyTorch", message.allocated_bytes, "in live tensors"),
        ("Reserved by PyTorch", message.reserved_bytes, "held from the driver by the caching allocator"),
        (
            "Reserved but unallocated",
            message.reserved_unallocated_bytes,
            "cached by PyTorch, not in tensors: reusable only in pieces at least as large as the request",
        ),
        (
            "Outside PyTorch (T − F − R)",
            message.outside_pytorch_bytes,
            "CUDA context, NCCL, other libraries and other processes: no setting of this run's batch wins it back",
        ),
        ("Private pools", message.private_pool_bytes, "CUDA graphs' memory, part of allocated"),
        ("This process (NVML)", message.this_process_bytes, "everything this process holds, PyTorch or not"),
        ("Other allocations", message.other_allocations_bytes, "MPS: this process's memory outside the MPS pool"),
    ]
    shown = [Figure(label, printed(value), meaning) for label, value, meaning in candidates if value is not None]
    place = where(message)
    if place:
        shown.append(Figure("Where", (message.location or "?").replace("_", " "), place))
    return shown


def missing(message: OomMessage) -> list[str]:
    """The usual figures this message's layout does not print, so their absence reads as such, not as zero."""
    usual = {
        "total capacity": message.total_bytes,
        "free": message.free_bytes,
        "allocated": message.allocated_bytes,
        "reserved": message.reserved_bytes,
    }
    return [name for name, value in usual.items() if value is None]


def printed(value: int | None) -> str:
    """A size as c10's format_size prints it ("N bytes", then two decimals of KiB/MiB/GiB), so every figure
    reads as in the message and the reader can redo the subtractions."""
    if value is None:
        return "n/a"
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if abs(value) >= size:
            return f"{value / size:,.2f} {unit}"
    return f"{value} bytes"


def arithmetic(message: OomMessage) -> list[str]:
    """The subtractions behind the headline, each as a line the reader can check against the message."""
    lines = []
    total, free, allocated, reserved = (
        message.total_bytes,
        message.free_bytes,
        message.allocated_bytes,
        message.reserved_bytes,
    )
    rest = message.not_in_tensors_bytes
    if rest is not None:
        lines.append(
            f"{printed(total)} total − {printed(allocated)} allocated − {printed(free)} free = **{printed(rest)}** "
            "held by something other than live tensors."
        )
    cached = message.reserved_unallocated_bytes
    if reserved is not None and allocated is not None and cached is not None:
        lines.append(
            f"Of that, {printed(reserved)} reserved − {printed(allocated)} allocated = **{printed(cached)}** is cached "
            "by PyTorch's allocator but unallocated."
        )
    outside = message.outside_pytorch_bytes
    if outside is not None and message.backend != "mps":
        lines.append(
            f"{printed(total)} total − {printed(free)} free − {printed(reserved)} reserved = **{printed(outside)}** is "
            "outside PyTorch (CUDA context, other libraries, other processes)."
        )
    elif total is not None and free is not None and reserved is not None:
        lines.append(
            "The figures contradict each other (reserved is above total − free: a shared-memory GPU), so the memory "
            "outside PyTorch cannot be told."
        )
    return lines


def verdict(message: OomMessage) -> str | None:
    """Which of the two causes the numbers point at, or None when the message lacks the figures."""
    requested, cached, outside = (
        message.requested_bytes,
        message.reserved_unallocated_bytes,
        message.outside_pytorch_bytes,
    )
    if requested is None or requested <= 0:
        return None
    if cached is not None and (outside is None or cached >= outside) and cached > 0:
        served = min(cached, requested) / requested
        if cached >= requested:
            return (
                f"Fragmentation: the allocator's cache held {human_bytes(cached)}, more than the "
                f"{human_bytes(requested)} request, but in pieces too small to serve it. An allocator setting "
                "(expandable segments, or max_split_size_mb on older PyTorch) is the first thing to try."
            )
        return (
            f"The cache ({human_bytes(cached)}) could have served {served:.0%} of the {human_bytes(requested)} "
            "request had it been one piece; the rest is the model's real size."
        )
    if outside is not None and outside > 0 and (cached is None or outside > cached):
        return (
            f"{human_bytes(outside)} of the device was held outside PyTorch's allocator: the CUDA context (~0.3 to "
            "1 GiB), other libraries, or another process. Check `nvidia-smi` for other processes on this GPU."
        )
    return None


def messages_frame(messages: list[OomMessage]) -> pd.DataFrame:
    """One row per message in a log, every figure as the reader reads it ("n/a": not printed)."""
    rows = [
        {
            "#": index,
            "Rank": message.rank,
            "Device": f"{message.backend} {message.device}" if message.device is not None else message.backend,
            "Requested": printed(message.requested_bytes),
            "Total": printed(message.total_bytes),
            "Free": printed(message.free_bytes),
            "Allocated": printed(message.allocated_bytes),
            "Reserved": printed(message.reserved_bytes),
            "Reserved, unallocated": printed(message.reserved_unallocated_bytes),
            "Outside PyTorch": printed(message.outside_pytorch_bytes),
            "Where": (message.location or "").replace("_", " "),
        }
        for index, message in enumerate(messages, start=1)
    ]
    return pd.DataFrame(rows)


def processes_frame(message: OomMessage) -> pd.DataFrame | None:
    if not message.process_bytes:
        return None
    return pd.DataFrame(
        [
            {
                "Process": f"process {usage.pid}" if usage.pid is not None else "this process (incl. non-PyTorch)",
                "Memory in use": printed(usage.bytes),
            }
            for usage in message.process_bytes
        ]
    )
