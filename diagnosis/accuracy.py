"""How far to trust an estimate: the analytic model's error as measured against published GPU runs.

An estimate shown without its error reads as exact. `bench.estimator_error --write` (or
`--write-summary`) measures the analytic model against every published point in
bench/published_measurements.yaml and leaves its summaries in `measured_error.json` beside this
module; the screens quote them from there, so the figure a user reads is the last measured one,
never a number typed into a page.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

MEASURED_ERROR_PATH = Path(__file__).with_name("measured_error.json")


@dataclass(frozen=True)
class ErrorSummary:
    """One row of the bench's summary table: |error| of n points, in percent."""

    label: str
    count: int
    median_abs_pct: float
    p90_abs_pct: float


@dataclass(frozen=True)
class MeasuredError:
    measured: str  # the date of the bench run
    details: str  # where the full table is
    by_label: dict[str, ErrorSummary]


def measured_error(path: Path = MEASURED_ERROR_PATH) -> MeasuredError | None:
    """The last bench run's summaries; None when there is none or it cannot be read."""
    try:
        document = json.loads(path.read_text())
        rows = {
            row["label"]: ErrorSummary(row["label"], int(row["count"]), row["median_abs_pct"], row["p90_abs_pct"])
            for row in document["analytic"]
            if row.get("count") and row.get("median_abs_pct") is not None and row.get("p90_abs_pct") is not None
        }
        return MeasuredError(str(document["measured"]), str(document["details"]), rows)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _figures(summary: ErrorSummary) -> str:
    return f"{summary.median_abs_pct:.1f}% median, {summary.p90_abs_pct:.1f}% p90, {summary.count} runs"


def trust_text(measured: MeasuredError | None) -> str | None:
    """One paragraph for a screen that shows an analytic estimate: its measured error on the
    training code the runner uses (transformers + PEFT), and on litgpt's own models."""
    if measured is None:
        return None
    rows = measured.by_label
    parts = []
    transformers = rows.get("peak_allocated, stack hf-trainer")
    if transformers is not None:
        parts.append(f"peak allocated of transformers + PEFT runs within {_figures(transformers)}")
    device = rows.get("nvidia_smi")
    if device is not None:  # the level a fit is judged on, and the least certain one
        parts.append(f"what nvidia-smi showed within {_figures(device)}")
    if not parts:
        return None
    text = "Measured against GPU runs others published: " + "; ".join(parts) + "."
    other = rows.get("peak_allocated, stack litgpt")
    if other is not None:
        text += f" Runs of litgpt's own models, estimated with model.implementation: litgpt: {_figures(other)}."
    return text + f" Details: {measured.details} ({measured.measured})."
