"""What the Diagnose page shows of an uploaded allocator snapshot: figures and tables, in MiB/GiB.

The summary (diagnosis.snapshot) is already reduced on the server; these turn it into the rows a
reader scans, keeping the user's own code (the first frame outside torch) as the "where".
"""

from __future__ import annotations

import pandas as pd

from app.views.postmortem import Figure
from diagnosis.snapshot import Frame, MemoryTotals, SnapshotSummary
from diagnosis.units import human_bytes


def _share(fraction: float) -> str:
    return "<1%" if 0 < fraction < 0.01 else f"{fraction:.0%}"


def totals_figures(totals: MemoryTotals) -> list[Figure]:
    return [
        Figure("Reserved", human_bytes(totals.reserved_bytes), "held from the driver by the caching allocator"),
        Figure("Allocated", human_bytes(totals.allocated_bytes), "in blocks handed to tensors"),
        Figure(
            "Cached free",
            human_bytes(totals.free_bytes),
            "reserved − active: kept by the allocator for reuse, invisible to other processes",
        ),
        Figure(
            "Free inside split segments",
            f"{human_bytes(totals.split_free_bytes)} ({_share(totals.split_free_share)})",
            "free slivers of segments already cut into blocks: a request larger than each sliver cannot use them "
            "(the share is of reserved)",
        ),
        Figure(
            "Largest free block", human_bytes(totals.largest_free_block_bytes), "the largest request the cache serves"
        ),
        Figure(
            "Segments",
            f"{totals.segments:,}",
            f"{totals.large_segments:,} large, {totals.small_segments:,} small, "
            f"{totals.expandable_segments:,} expandable",
        ),
    ]


def _where(frame: Frame | None) -> str:
    return frame.label if frame is not None else "not recorded"


def blocks_frame(summary: SnapshotSummary) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "Device": block.device,
                "Size": human_bytes(block.size_bytes),
                "Requested": human_bytes(block.requested_bytes),
                "State": block.state.replace("_", " "),
                "Segment": block.segment_type or "",
                "Allocated at": _where(block.user_frame),
            }
            for block in summary.largest_blocks
        ]
    )


def sites_frame(summary: SnapshotSummary) -> pd.DataFrame:
    return pd.DataFrame(
        [{"Code": site.label, "Holds": human_bytes(site.bytes), "Blocks": site.count} for site in summary.top_sites]
    )


def sites_caption(summary: SnapshotSummary) -> str:
    source = {
        "blocks": "from the stack recorded on each live block",
        "trace": "from the allocations still live at the end of the trace",
    }.get(summary.site_source or "", "")
    unattributed = (
        f" {human_bytes(summary.unattributed_bytes)} has no recorded stack." if summary.unattributed_bytes else ""
    )
    return f"Live memory by the line of your code that allocated it, {source}.{unattributed}"


def ooms_frame(summary: SnapshotSummary) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "Device": oom.device,
                "Event": oom.event_index,
                "Requested": human_bytes(oom.requested_bytes),
                "Device free": human_bytes(oom.device_free_bytes),
                "Allocated then": human_bytes(oom.allocated_bytes),
                "Reserved then": human_bytes(oom.reserved_bytes),
                "Where": _where(oom.user_frame),
            }
            for oom in summary.ooms
        ]
    )


NO_STACKS = (
    "No stacks were recorded with this snapshot, so memory cannot be tied to code. Record them next time: "
    "`torch.cuda.memory._record_memory_history(max_entries=100_000)` before the step, "
    "`torch.cuda.memory._dump_snapshot('snapshot.pickle')` after."
)
