"""Two or more runs side by side: what changed in their configs, and what that did to memory and speed."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from app.views.dotted import flatten, section, yaml_value
from db.queries import PostmortemRecord, RunRecord, RunSummary, StepSeries
from diagnosis.units import human_bytes
from trainer.config import ConfigError, validate_config

_MISSING = object()


@dataclass(frozen=True)
class Change:
    key: str
    before: Any
    after: Any

    def __str__(self) -> str:
        return f"{self.key}: {_shown(self.before)} → {_shown(self.after)}"


def _shown(value: Any) -> str:
    return "(not set)" if value is _MISSING else yaml_value(value)


def _complete(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config as the runner saw it, defaults filled in, so a key left out and its default compare equal.

    A config that no longer validates (a data file moved away) is compared as stored.
    """
    try:
        return validate_config(dict(config)).to_dict()
    except ConfigError:
        return dict(config)


def config_diff(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[Change]:
    """Every dotted key whose value differs, in key order.

    A section that is null on one side (`lora: null`, full fine-tuning) is one change of the whole
    section, not one per key inside it.
    """
    full_before, full_after = _complete(before), _complete(after)
    flat_before, flat_after = flatten(full_before), flatten(full_after)
    changes: dict[str, Change] = {}
    for key in sorted(flat_before.keys() | flat_after.keys()):
        if key in flat_before and key in flat_after:
            if flat_before[key] != flat_after[key]:
                changes[key] = Change(key, flat_before[key], flat_after[key])
            continue
        other = flat_after if key in flat_before else flat_before
        owner = _leaf_ancestor(key, other)
        if owner is not None:
            changes[owner] = Change(owner, section(full_before, owner), section(full_after, owner))
        else:
            changes[key] = Change(key, flat_before.get(key, _MISSING), flat_after.get(key, _MISSING))
    return [changes[key] for key in sorted(changes)]


def _leaf_ancestor(key: str, flat: Mapping[str, Any]) -> str | None:
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        ancestor = ".".join(parts[:end])
        if ancestor in flat:
            return ancestor
    return None


def default_selection(runs: Sequence[RunRecord], wanted: int | None) -> list[int]:
    """The run asked for and its parent (a relaunch and the run it fixed), else the two newest runs."""
    by_id = {run.id: run for run in runs}
    if wanted in by_id:
        parent = by_id[wanted].parent_run_id
        return [parent, wanted] if parent in by_id else [wanted]
    return [run.id for run in runs[:2]][::-1]


def run_label(run: RunRecord) -> str:
    return f"run {run.id}" + (f" · {run.name}" if run.name else "")


@dataclass(frozen=True)
class RunFigures:
    """One run's figures for the table; memory peaks include what its post-mortem saw at the failure."""

    run: RunRecord
    summary: RunSummary | None
    postmortem: PostmortemRecord | None
    step_seconds: StepSeries | None  # the `step_seconds` column, for the median

    def peak(self, column: str) -> tuple[int | None, bool]:
        """The run's peak and whether it is the post-mortem's reading (then the failed request came on top)."""
        stepped = getattr(self.summary, column) if self.summary else None
        failed = _at_failure(self.postmortem, column)
        if failed is not None and (stepped is None or failed > stepped):
            return failed, True
        return stepped, False

    def needed(self, column: str) -> tuple[int | None, bool]:
        """What the run needed at least: its peak, or for a run that failed, what it held when the
        request failed plus that request (the failed run's peak is otherwise understated, and a fix
        that works would read as using more memory). The flag says the value is a lower bound."""
        value, failed = self.peak(column)
        request = self.postmortem.requested_bytes if self.postmortem else None
        if not failed or value is None or request is None:
            return value, False
        held = _at_failure(self.postmortem, column, current=True)
        return max(value, (held if held is not None else value) + request), True

    def median_step_s(self) -> float | None:
        """Exact up to 500 steps; beyond, the median of the buckets' midpoints."""
        series = self.step_seconds
        if series is None or not len(series):
            return None
        lows, highs = series.minimum["step_seconds"], series.maximum["step_seconds"]
        mids = [(low + high) / 2 for low, high in zip(lows, highs, strict=True) if low is not None]
        return statistics.median(mids) if mids else None


def _at_failure(postmortem: PostmortemRecord | None, column: str, *, current: bool = False) -> int | None:
    """The post-mortem's reading for a peak column: the peak so far, or (`current`) the value at the failure."""
    if postmortem is None:
        return None
    if column == "peak_rss_bytes":
        return (postmortem.host or {}).get("rss_bytes")
    stats = postmortem.allocator_stats or {}
    name = {"peak_allocated_bytes": "allocated_bytes", "peak_reserved_bytes": "reserved_bytes"}.get(column)
    return stats.get(f"{name}.all.{'current' if current else 'peak'}") if name else None


_PEAKS = {
    "peak_allocated_bytes": "Peak allocated",
    "peak_reserved_bytes": "Peak reserved",
    "peak_rss_bytes": "Peak RSS",
}


def figures_table(figures: Sequence[RunFigures]) -> pd.DataFrame:
    """A row per figure, a column per run, then each later run's difference from the first (the "before").

    A memory row is left out when no run has it (allocator peaks on the CPU); sizes are text in
    MiB/GiB, so a missing reading reads "n/a", never zero.
    """
    rows: list[dict[str, str]] = []
    for column, label in _PEAKS.items():
        peaks = [figure.peak(column) for figure in figures]
        if all(value is None for value, _ in peaks):
            continue
        needs = [figure.needed(column) for figure in figures]
        shown = [_peak_text(peak, need) for peak, need in zip(peaks, needs, strict=True)]
        rows.append(_row(label, figures, shown, needs, _needed_change))
    requests = [f.postmortem.requested_bytes if f.postmortem else None for f in figures]
    if any(value is not None for value in requests):
        rows.append(_row("Failed request", figures, [human_bytes(value) for value in requests]))
    medians = [f.median_step_s() for f in figures]
    rows.append(_row("Median step time", figures, [_seconds(value) for value in medians], medians, _seconds_change))
    rows.append(_row("Steps recorded", figures, [f"{f.summary.steps:,}" if f.summary else "0" for f in figures]))
    rows.append(_row("Status", figures, [f.run.status for f in figures]))
    return pd.DataFrame(rows).fillna("")


def _row(
    label: str,
    figures: Sequence[RunFigures],
    shown: Sequence[str],
    values: Sequence[Any] | None = None,
    change: Callable[[Any, Any], str] | None = None,
) -> dict[str, str]:
    row = {"": label}
    for figure, text in zip(figures, shown, strict=True):
        row[run_label(figure.run)] = text
    if values is not None and change is not None:
        for figure, value in zip(figures[1:], values[1:], strict=True):
            row[f"run {figure.run.id} vs run {figures[0].run.id}"] = change(values[0], value)
    return row


def _peak_text(peak: tuple[int | None, bool], need: tuple[int | None, bool]) -> str:
    (value, failed), (needed, lower_bound) = peak, need
    if lower_bound:
        return f"≥ {human_bytes(needed)} needed ({human_bytes(value)} held at the failure + the failed request)"
    return human_bytes(value) + (" at the failure" if failed else "")


def _needed_change(before: tuple[int | None, bool], after: tuple[int | None, bool]) -> str:
    """After minus before; when before is only a lower bound (it failed), the saving is at least that."""
    (first, first_bound), (second, second_bound) = before, after
    change = _bytes_change(first, second)
    if not change or change == "same" or first_bound == second_bound:
        return change
    if first_bound:
        return change + (" or more" if second < first else " at most")
    return change + (" or more" if second > first else " at most")


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.3f} s"


def _bytes_change(before: int | None, after: int | None) -> str:
    if before is None or after is None:
        return ""
    if after == before:
        return "same"
    return ("+" if after > before else "−") + human_bytes(abs(after - before))


def _seconds_change(before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return ""
    return ("+" if after >= before else "−") + f"{abs(after - before):,.3f} s"
