"""What a PyTorch CUDA memory snapshot says, in numbers a user can act on, without torch.

`torch.cuda.memory._dump_snapshot` pickles the caching allocator's state: every segment it holds
from the driver with the blocks carved out of it, and a ring buffer of recent allocator events
per device (REFERENCE §1). The viewer at pytorch.org/memory_viz draws it but needs the browser to
take the whole pickle and stalls on big ones; this module reduces it on the server to totals,
fragmentation, the biggest blocks, the code that holds the memory, a bounded timeline and the
OOMs, so the dashboard and the post-mortem can show it next to the run.

Layouts, told apart by keys since there is no version field (all seen in the shared fixtures):
  segment-list     a bare list of segments: `torch.cuda.memory_snapshot()`.
  block-history    dict; blocks carry `history` (list of {addr, real_size, frames}) instead of
                   `frames`, and no `address`; segments have no `frames`/`is_expandable`.
  segments-traces  dict with `segments` and `device_traces` only; blocks carry `address` and
                   `frames`; `time_us` may be missing from trace entries.
  current          as above plus `allocator_settings` (and, newer still, `external_annotations`).
"""

from __future__ import annotations

import heapq
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import BinaryIO

from diagnosis.safe_pickle import DEFAULT_MAX_BYTES, SnapshotFormatError, load_path, load_stream
from diagnosis.units import human_bytes

LAYOUT_SEGMENT_LIST = "segment-list"
LAYOUT_BLOCK_HISTORY = "block-history"
LAYOUT_SEGMENTS_TRACES = "segments-traces"
LAYOUT_CURRENT = "current"

TOP_BLOCKS = 10
TOP_SITES = 10
# Charts send every point to the browser (REFERENCE §4): a few thousand is plenty for a screen.
TIMELINE_MAX_POINTS = 2000

# Trace actions and how each moves the two replayed counters (what memory_viz's timeline does).
# alloc/free entries carry the size the caller requested, not the rounded block size (seen in the
# fixtures: alloc 1,000,000,000 for a 1,000,341,504-byte block), so the allocated series is in
# requested bytes. free_requested is left out on purpose: a block whose free waits on another
# stream stays in use (state active_pending_free) until free_completed, and is counted until then.
_ALLOCATED_STEP = {"alloc": 1, "free_completed": -1}
_RESERVED_STEP = {"segment_alloc": 1, "segment_free": -1, "segment_map": 1, "segment_unmap": -1}

# Python frames of torch itself (site-packages/torch/..., or a source checkout's torch/...): the
# allocation site a user can change is the first frame outside them.
_TORCH_INTERNAL = re.compile(r"(?:^|[/\\])torch[/\\]")


@dataclass(frozen=True)
class Frame:
    """One Python stack frame, as the allocator recorded it."""

    filename: str
    line: int | None
    name: str

    @property
    def label(self) -> str:
        return f"{self.filename}:{self.line} {self.name}"


@dataclass(frozen=True)
class MemoryTotals:
    """The allocator's view of one device (or all), from the segments at snapshot time.

    allocated = blocks handed to tensors; active = allocated plus blocks whose free is still
    pending on another stream; free = reserved - active, cached for reuse. split_free is the
    part of free that sits in segments already cut into several blocks (the snapshot's analogue
    of `inactive_split_bytes`, expandable segments excluded as there): a request larger than
    every such sliver cannot use them, which is how an OOM happens with GiBs "free"."""

    segments: int
    large_segments: int
    small_segments: int
    expandable_segments: int
    reserved_bytes: int
    allocated_bytes: int
    active_bytes: int
    requested_bytes: int
    free_bytes: int
    split_free_bytes: int
    largest_free_block_bytes: int
    split_free_share: float


@dataclass(frozen=True)
class Block:
    """One block of a segment; `user_frame` is the code that allocated it, when recorded."""

    device: int
    address: int
    size_bytes: int
    requested_bytes: int | None
    state: str
    segment_type: str | None
    user_frame: Frame | None


@dataclass(frozen=True)
class AllocationSite:
    """Live memory held by tensors allocated at one line of user code."""

    label: str
    filename: str
    line: int | None
    function: str
    bytes: int
    count: int


@dataclass(frozen=True)
class Timeline:
    """Allocated and reserved bytes after each traced event, downsampled (min/max kept per bucket).

    allocated counts the requested sizes of blocks in use (what the trace records, and what
    memory_viz plots); reserved counts segment bytes. The ring buffer holds only the last events,
    so the replay is anchored at its end to the snapshot's own blocks and segments;
    `*_before_trace_bytes` is what was already held when the buffer begins. `x` is `time_us`
    when every event has one, else the event's index in the trace."""

    device: int
    x_unit: str
    events: int
    allocated_before_trace_bytes: int
    reserved_before_trace_bytes: int
    x: tuple[int, ...]
    allocated_bytes: tuple[int, ...]
    reserved_bytes: tuple[int, ...]


@dataclass(frozen=True)
class OomEvent:
    """An `oom` trace entry: the request that failed and the allocator's state at that moment
    (allocated and reserved as in the Timeline, replayed to that event)."""

    device: int
    event_index: int
    time_us: int | None
    requested_bytes: int
    device_free_bytes: int | None
    allocated_bytes: int
    reserved_bytes: int
    user_frame: Frame | None
    frames: tuple[Frame, ...]


@dataclass(frozen=True)
class DeviceSummary:
    device: int
    totals: MemoryTotals
    timeline: Timeline | None


@dataclass(frozen=True)
class SnapshotSummary:
    """Everything the dashboard and the post-mortem show about one snapshot; plain data."""

    layout: str
    device_count: int
    totals: MemoryTotals
    devices: tuple[DeviceSummary, ...]
    largest_blocks: tuple[Block, ...]
    top_sites: tuple[AllocationSite, ...]
    # "blocks" (frames on live blocks), "trace" (allocs still live at the trace's end), or None.
    site_source: str | None
    unattributed_bytes: int
    ooms: tuple[OomEvent, ...]
    allocator_settings: dict | None
    headline: str

    def to_json(self) -> dict:
        return _plain(asdict(self))


def _plain(value: object) -> object:
    """asdict keeps tuples; JSON writers and Streamlit want lists."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


# --- reading -------------------------------------------------------------------------------


def read_snapshot(source: str | os.PathLike[str] | BinaryIO, max_bytes: int = DEFAULT_MAX_BYTES) -> SnapshotSummary:
    """Summarise a snapshot file or upload (plain or gzip pickle) through the restricted unpickler."""
    if hasattr(source, "read"):
        data = load_stream(source, max_bytes, name=os.path.basename(str(getattr(source, "name", "snapshot"))))
    else:
        data = load_path(source, max_bytes)
    return summarize_snapshot(data)


def summarize_snapshot(data: dict | list) -> SnapshotSummary:
    """Summarise an already-loaded snapshot; anything that is not one raises SnapshotFormatError."""
    try:
        return _summarize(data, detect_layout(data))
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as error:
        raise SnapshotFormatError(
            f"this does not look like a PyTorch memory snapshot: {type(error).__name__}: {error}"
        ) from error


def detect_layout(data: object) -> str:
    """Which of the layouts in the module docstring this is; snapshots carry no version field."""
    if isinstance(data, list):
        return LAYOUT_SEGMENT_LIST
    if not isinstance(data, dict) or not isinstance(data.get("segments"), list):
        keys = sorted(map(str, data))[:8] if isinstance(data, dict) else type(data).__name__
        raise SnapshotFormatError(
            f"not a PyTorch memory snapshot: expected a dict with 'segments' or a list of segments, got {keys}"
        )
    if any("history" in block for segment in data["segments"] for block in segment.get("blocks", ())):
        return LAYOUT_BLOCK_HISTORY
    if "allocator_settings" in data or "external_annotations" in data:
        return LAYOUT_CURRENT
    return LAYOUT_SEGMENTS_TRACES


def _summarize(data: dict | list, layout: str) -> SnapshotSummary:
    segments = data if isinstance(data, list) else data["segments"]
    traces = [] if isinstance(data, list) else list(data.get("device_traces") or [])
    settings = None if isinstance(data, list) else data.get("allocator_settings")

    by_device: dict[int, list[dict]] = defaultdict(list)
    for segment in segments:
        by_device[segment.get("device", 0)].append(segment)
    devices, ooms = _per_device(by_device, traces)
    totals = _totals(segments)
    sites, source, unattributed = _allocation_sites(segments, traces)
    return SnapshotSummary(
        layout=layout,
        # device_traces has one entry per device the process had, used or not.
        device_count=max(len(traces), len(by_device)),
        totals=totals,
        devices=devices,
        largest_blocks=_largest_blocks(segments, TOP_BLOCKS),
        top_sites=sites,
        site_source=source,
        unattributed_bytes=unattributed,
        ooms=tuple(ooms),
        allocator_settings=dict(settings) if isinstance(settings, dict) else None,
        headline=_headline(totals, sum(1 for d in devices if d.totals.segments), ooms),
    )


def _per_device(
    by_device: dict[int, list[dict]], traces: Sequence[list]
) -> tuple[tuple[DeviceSummary, ...], list[OomEvent]]:
    """Totals and timeline of each device that holds memory or has traced events."""
    devices, ooms = [], []
    for device in sorted(set(by_device) | {index for index, trace in enumerate(traces) if trace}):
        segments = by_device.get(device, [])
        trace = traces[device] if device < len(traces) else []
        timeline, device_ooms = _replay(device, trace, segments) if trace else (None, [])
        devices.append(DeviceSummary(device, _totals(segments), timeline))
        ooms.extend(device_ooms)
    return tuple(devices), ooms


# --- segments and blocks -------------------------------------------------------------------


def _segment_blocks(segment: dict) -> Iterator[tuple[int, dict]]:
    """(address, block) for each block; block-history snapshots leave the address out, but
    blocks tile their segment in address order, so it is the segment's plus the sizes before."""
    address = segment.get("address", 0)
    for block in segment.get("blocks", ()):
        yield block.get("address", address), block
        address = block.get("address", address) + block["size"]


def _totals(segments: Iterable[dict]) -> MemoryTotals:
    counts = {"segments": 0, "large": 0, "small": 0, "expandable": 0}
    reserved = allocated = active = requested = split_free = largest_free = 0
    for segment in segments:
        counts["segments"] += 1
        if segment.get("segment_type") in ("large", "small"):
            counts[segment["segment_type"]] += 1
        expandable = bool(segment.get("is_expandable"))
        counts["expandable"] += expandable
        reserved += segment["total_size"]
        blocks = segment.get("blocks", ())
        for block in blocks:
            size, state = block["size"], block["state"]
            if state == "active_allocated":
                allocated += size
                requested += block.get("requested_size", size)
            if state != "inactive":
                active += size
                continue
            largest_free = max(largest_free, size)
            if len(blocks) > 1 and not expandable:
                split_free += size
    return MemoryTotals(
        segments=counts["segments"],
        large_segments=counts["large"],
        small_segments=counts["small"],
        expandable_segments=counts["expandable"],
        reserved_bytes=reserved,
        allocated_bytes=allocated,
        active_bytes=active,
        requested_bytes=requested,
        free_bytes=reserved - active,
        split_free_bytes=split_free,
        largest_free_block_bytes=largest_free,
        split_free_share=split_free / reserved if reserved else 0.0,
    )


def _block_frames(block: dict) -> list[dict]:
    """The stack of the block's (latest) allocation: `frames`, or the last `history` entry's."""
    frames = block.get("frames")
    if frames:
        return frames
    history = block.get("history")
    return history[-1].get("frames") or [] if history else []


def _largest_blocks(segments: Iterable[dict], n: int) -> tuple[Block, ...]:
    """The n biggest blocks in any state; stacks are only looked at for those n."""
    placed = ((segment, address, block) for segment in segments for address, block in _segment_blocks(segment))
    return tuple(
        Block(
            device=segment.get("device", 0),
            address=address,
            size_bytes=block["size"],
            requested_bytes=block.get("requested_size"),
            state=block["state"],
            segment_type=segment.get("segment_type"),
            user_frame=user_frame(_block_frames(block)),
        )
        for segment, address, block in heapq.nlargest(n, placed, key=lambda item: item[2]["size"])
    )


# --- frames and allocation sites -----------------------------------------------------------


def _is_python(filename: str) -> bool:
    # C++ frames (with stacks="all") name .cpp/.c/.h files, "??" or nothing; CPython's own C
    # frames carry real line numbers, so the extension is what tells them apart.
    return filename.endswith(".py") or (filename.startswith("<") and not filename.startswith("<frozen"))


def python_frames(frames: Sequence[dict]) -> tuple[Frame, ...]:
    """The Python frames of a recorded stack, innermost first, as the allocator orders them."""
    return tuple(
        Frame(frame.get("filename", ""), frame.get("line"), frame.get("name", "?"))
        for frame in frames
        if _is_python(frame.get("filename", ""))
    )


def user_frame(frames: Sequence[dict]) -> Frame | None:
    """The innermost Python frame outside torch: the line a user would change.

    Other libraries count as user code on purpose: `modeling_bert.py:703 forward` names the
    layer that holds the memory, where the training script's frame would name one call to
    the whole model for every tensor."""
    for frame in frames:
        filename = frame.get("filename", "")
        if _is_python(filename) and not _TORCH_INTERNAL.search(filename):
            return Frame(filename, frame.get("line"), frame.get("name", "?"))
    return None


def _allocation_sites(
    segments: Sequence[dict], traces: Sequence[list]
) -> tuple[tuple[AllocationSite, ...], str | None, int]:
    """Live bytes by user frame: from the blocks' stacks (block sizes), else from the trace's
    still-live allocs (requested sizes), as history recorded with context="alloc" leaves blocks
    without stacks. Live blocks with no Python frame outside torch are `unattributed`."""
    live = [
        (block["size"], _block_frames(block))
        for s in segments
        for _, block in _segment_blocks(s)
        if block["state"] == "active_allocated"
    ]
    source = "blocks"
    if not any(frames for _, frames in live):
        live = [(event["size"], event.get("frames") or []) for trace in traces for event in _live_allocs(trace)]
        source = "trace"
    if not any(frames for _, frames in live):
        return (), None, 0

    bytes_by_frame: dict[Frame, list[int]] = defaultdict(lambda: [0, 0])
    unattributed = 0
    for size, frames in live:
        frame = user_frame(frames)
        if frame is None:
            unattributed += size
            continue
        bytes_by_frame[frame][0] += size
        bytes_by_frame[frame][1] += 1
    top = heapq.nlargest(TOP_SITES, bytes_by_frame.items(), key=lambda item: item[1][0])
    sites = tuple(AllocationSite(f.label, f.filename, f.line, f.name, total, count) for f, (total, count) in top)
    return sites, source, unattributed


def _live_allocs(trace: Sequence[dict]) -> Iterable[dict]:
    """Alloc events of the trace not freed by its end, by address."""
    live: dict[int, dict] = {}
    for event in trace:
        action = event.get("action")
        if action == "alloc":
            live[event["addr"]] = event
        elif action == "free_completed":
            live.pop(event["addr"], None)
    return live.values()


# --- trace replay --------------------------------------------------------------------------


def _replay(device: int, trace: Sequence[dict], segments: Sequence[dict]) -> tuple[Timeline, list[OomEvent]]:
    """Walk the ring buffer once, anchoring both counters so the last event matches the segments."""
    allocated, reserved = [], []
    current_allocated = current_reserved = 0
    for event in trace:
        action, size = event.get("action"), event.get("size", 0)
        current_allocated += _ALLOCATED_STEP.get(action, 0) * size
        current_reserved += _RESERVED_STEP.get(action, 0) * size
        allocated.append(current_allocated)
        reserved.append(current_reserved)
    allocated_offset = _in_use_requested_bytes(segments) - current_allocated
    reserved_offset = sum(segment["total_size"] for segment in segments) - current_reserved

    ooms = [
        OomEvent(
            device=device,
            event_index=index,
            time_us=event.get("time_us"),
            requested_bytes=event.get("size", 0),
            device_free_bytes=event.get("addr"),  # for "oom" the trace puts device_free in addr
            allocated_bytes=allocated_offset + allocated[index],
            reserved_bytes=reserved_offset + reserved[index],
            user_frame=user_frame(event.get("frames") or []),
            frames=python_frames(event.get("frames") or []),
        )
        for index, event in enumerate(trace)
        if event.get("action") == "oom"
    ]

    timed = all(isinstance(event.get("time_us"), int) for event in trace)
    keep = downsample_indices([allocated, reserved], TIMELINE_MAX_POINTS)
    timeline = Timeline(
        device=device,
        x_unit="time_us" if timed else "event",
        events=len(trace),
        allocated_before_trace_bytes=allocated_offset,
        reserved_before_trace_bytes=reserved_offset,
        x=tuple(trace[i]["time_us"] if timed else i for i in keep),
        allocated_bytes=tuple(allocated_offset + allocated[i] for i in keep),
        reserved_bytes=tuple(reserved_offset + reserved[i] for i in keep),
    )
    return timeline, ooms


def _in_use_requested_bytes(segments: Iterable[dict]) -> int:
    """What the trace's allocated counter reads at snapshot time: requested sizes of blocks in use."""
    return sum(
        block.get("requested_size", block["size"])
        for segment in segments
        for block in segment.get("blocks", ())
        if block["state"] != "inactive"
    )


def downsample_indices(series: Sequence[Sequence[int]], max_points: int) -> list[int]:
    """Indices to keep so that at most `max_points` remain and no peak or trough is lost.

    Each bucket keeps the positions of the minimum and maximum of every series (plus the first
    and last point), so a one-event spike survives; O(n) per series."""
    n = len(series[0]) if series else 0
    if n <= max_points:
        return list(range(n))
    buckets = max(1, (max_points - 2) // (2 * len(series)))
    width = math.ceil(n / buckets)
    keep = {0, n - 1}
    for start in range(0, n, width):
        window = range(start, min(start + width, n))
        for values in series:
            keep.add(min(window, key=values.__getitem__))
            keep.add(max(window, key=values.__getitem__))
    return sorted(keep)


# --- headline ------------------------------------------------------------------------------


def _share(fraction: float) -> str:
    return "<1%" if 0 < fraction < 0.01 else f"{fraction:.0%}"


def _headline(totals: MemoryTotals, devices_with_memory: int, ooms: Sequence[OomEvent]) -> str:
    if totals.segments == 0:
        parts = ["Empty snapshot: the allocator held no memory"]
    else:
        parts = [f"{human_bytes(totals.reserved_bytes)} reserved, {human_bytes(totals.allocated_bytes)} allocated"]
        if devices_with_memory > 1:
            parts[0] += f" across {devices_with_memory} devices"
        if totals.expandable_segments == totals.segments:
            parts.append(f"{human_bytes(totals.free_bytes)} cached free (expandable segments: no split slivers)")
        else:
            parts.append(
                f"{human_bytes(totals.split_free_bytes)} free inside split segments "
                f"({_share(totals.split_free_share)} of reserved)"
            )
    if ooms:
        more = f" ({len(ooms)} OOM events)" if len(ooms) > 1 else ""
        parts.append(f"OOM at {human_bytes(ooms[-1].requested_bytes)} request{more}")
    return "; ".join(parts)
