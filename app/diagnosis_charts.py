"""Charts of what the diagnosis engine computes: an estimate's peak against the card, a snapshot's timeline.

Kept apart from app.charts (a run's step series from the database): these draw plain results,
never rows, and share only the MiB/GiB axis rule.
"""

from __future__ import annotations

from collections.abc import Mapping

import altair as alt
import pandas as pd

from app.charts import byte_unit
from diagnosis.estimate import BREAKDOWN_KEYS, BREAKDOWN_LABELS, MemoryEstimate
from diagnosis.snapshot import Timeline

_LEVEL_COLORS = {"peak reserved": "#72b7b2", "device (nvidia-smi)": "#b279a2", "capacity": "#e45756"}
_LEGEND = alt.Legend(orient="bottom", title=None)


def levels(estimate: MemoryEstimate, capacity_bytes: int | None) -> dict[str, int]:
    """The levels a reader compares the stacked peak with, lowest first."""
    marks = {"peak reserved": estimate.peak_reserved_bytes, "device (nvidia-smi)": estimate.device_bytes}
    if capacity_bytes is not None:
        marks["capacity"] = capacity_bytes
    return marks


def estimate_chart(
    estimate: MemoryEstimate, capacity_bytes: int | None, title: str = "Estimated peak of one step"
) -> alt.LayerChart:
    """The peak allocated bytes stacked by component, with reserved, device and the card as ticks."""
    marks = levels(estimate, capacity_bytes)
    unit = byte_unit(max([estimate.peak_allocated_bytes, *marks.values()]))
    order = [BREAKDOWN_LABELS[key] for key in BREAKDOWN_KEYS]
    parts = pd.DataFrame(
        {
            "bar": "peak allocated",
            "part": order,
            "size": [estimate.breakdown[key] / unit.size for key in BREAKDOWN_KEYS],
            "order": range(len(order)),
        }
    )
    bar = (
        alt.Chart(parts)
        .mark_bar()
        .encode(
            y=alt.Y("bar:N", title=None),
            x=alt.X("size:Q", stack="zero", title=unit.name, axis=alt.Axis(format=unit.format)),
            # Three columns: six parts in one row run past a half-width column and are cut off.
            color=alt.Color("part:N", sort=order, legend=alt.Legend(orient="bottom", title=None, columns=3)),
            order=alt.Order("order:Q"),
            tooltip=[alt.Tooltip("part:N", title="what"), alt.Tooltip("size:Q", title=unit.name, format=unit.format)],
        )
    )
    levels_frame = pd.DataFrame(
        {"bar": "peak allocated", "level": list(marks), "size": [value / unit.size for value in marks.values()]}
    )
    # Ticks on the bar's own band, not rules: a layer without the bar's y axis collapses it in Streamlit.
    ticks = (
        alt.Chart(levels_frame)
        .mark_tick(thickness=3, size=34)
        .encode(
            x=alt.X("size:Q"),
            y=alt.Y("bar:N"),
            color=alt.Color(
                "level:N",
                scale=alt.Scale(domain=list(marks), range=[_LEVEL_COLORS[name] for name in marks]),
                legend=alt.Legend(orient="top", title=None),
            ),
            tooltip=[alt.Tooltip("level:N"), alt.Tooltip("size:Q", title=unit.name, format=unit.format)],
        )
    )
    # A step, not a height: Streamlit fits a fixed height around the legends and squeezes the bar to a line.
    return alt.layer(bar, ticks).resolve_scale(color="independent").properties(title=title, height=alt.Step(40))


def compare_chart(
    estimates: Mapping[str, MemoryEstimate], capacity_bytes: int | None, title: str = "Peak allocated, by estimator"
) -> alt.Chart:
    """Several estimates (analytic and traced, or two models) as stacked bars on one axis."""
    largest = max(estimate.device_bytes for estimate in estimates.values())
    unit = byte_unit(max(largest, capacity_bytes or 0))
    order = [BREAKDOWN_LABELS[key] for key in BREAKDOWN_KEYS]
    rows = [
        (name, BREAKDOWN_LABELS[key], estimate.breakdown[key] / unit.size, index)
        for name, estimate in estimates.items()
        for index, key in enumerate(BREAKDOWN_KEYS)
    ]
    frame = pd.DataFrame(rows, columns=["estimate", "part", "size", "order"])
    return (
        alt.Chart(frame)
        .mark_bar()
        .encode(
            y=alt.Y("estimate:N", title=None, sort=list(estimates)),
            x=alt.X("size:Q", stack="zero", title=unit.name, axis=alt.Axis(format=unit.format)),
            color=alt.Color("part:N", sort=order, legend=_LEGEND),
            order=alt.Order("order:Q"),
            tooltip=[
                alt.Tooltip("estimate:N"),
                alt.Tooltip("part:N", title="what"),
                alt.Tooltip("size:Q", title=unit.name, format=unit.format),
            ],
        )
        .properties(title=title, height=alt.Step(40))
    )


def timeline_chart(timeline: Timeline) -> alt.Chart:
    """Allocated and reserved after each traced event (already downsampled by diagnosis.snapshot)."""
    unit = byte_unit(max([*timeline.allocated_bytes, *timeline.reserved_bytes], default=None))
    x_title = "time (ms, from the first event)" if timeline.x_unit == "time_us" else "event"
    start = timeline.x[0] if timeline.x else 0
    scale = 1000.0 if timeline.x_unit == "time_us" else 1.0
    rows = [
        ((x - start) / scale, series, value / unit.size)
        for series, values in (("allocated", timeline.allocated_bytes), ("reserved", timeline.reserved_bytes))
        for x, value in zip(timeline.x, values, strict=True)
    ]
    frame = pd.DataFrame(rows, columns=["x", "series", "value"])
    return (
        alt.Chart(frame)
        .mark_line(interpolate="step-after", point=len(timeline.x) < 60)
        .encode(
            x=alt.X("x:Q", title=x_title),
            y=alt.Y("value:Q", title=unit.name, axis=alt.Axis(format=unit.format)),
            color=alt.Color("series:N", legend=_LEGEND),
            tooltip=[
                alt.Tooltip("x:Q", title=x_title, format=",.3~f"),
                alt.Tooltip("series:N", title="what"),
                alt.Tooltip("value:Q", title=unit.name, format=unit.format),
            ],
        )
        .properties(title=f"Device {timeline.device}: memory over the traced events", height=260)
    )
