"""The runs list as one table: a row per run. Sizes are numbers in GiB, so a click on the header sorts them by
size (text would put "512 MiB" after "1.2 GiB"); an unavailable peak is an empty cell, never 0."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime

import pandas as pd

from app import nav
from app.views.facts import device_label, duration_s, human_duration, max_steps, model_name, steps_label
from app.views.status import cell_label, display_status
from db.queries import RunRecord, RunSummary

COLUMNS = (
    "Run",
    "Status",
    "Name",
    "Model",
    "Device",
    "Started",
    "Duration",
    "Steps",
    "Peak allocated",
    "Peak reserved",
    "Peak RSS",
    "Open",
)
SIZE_COLUMNS = ("Peak allocated", "Peak reserved", "Peak RSS")
_GIB = 1024**3


def _gib(value: int | None) -> float | None:
    return None if value is None else value / _GIB


def status_counts(runs: list[RunRecord], now: float) -> dict[str, int]:
    counts: dict[str, int] = {}
    for run in runs:
        status = display_status(run, now)
        counts[status] = counts.get(status, 0) + 1
    return counts


def runs_frame(
    runs: list[RunRecord], summaries: dict[int, RunSummary], now: float, statuses: Collection[str] = ()
) -> pd.DataFrame:
    """Runs in the order given, keeping only `statuses` (all when empty)."""
    rows = []
    for run in runs:
        status = display_status(run, now)
        if statuses and status not in statuses:
            continue
        summary = summaries.get(run.id)
        rows.append(
            {
                "Run": run.id,
                "Status": cell_label(status),
                "Name": run.name or "",
                "Model": model_name(run),
                "Device": device_label(run),
                "Started": datetime.fromtimestamp(run.started_at or run.created_at),
                "Duration": human_duration(duration_s(run, now)),
                "Steps": steps_label(summary.last_step if summary else 0, max_steps(run)),
                "Peak allocated": _gib(summary.peak_allocated_bytes if summary else None),
                "Peak reserved": _gib(summary.peak_reserved_bytes if summary else None),
                "Peak RSS": _gib(summary.peak_rss_bytes if summary else None),
                # Relative to the page's own URL, so it also works under a server.baseUrlPath.
                "Open": f"{nav.RUN.url_path}?run={run.id}",
            }
        )
    return pd.DataFrame(rows, columns=list(COLUMNS))
