"""Altair charts of a run: bytes on MiB/GiB axes, downsampled buckets drawn as bands, events as rules.

A downsampled bucket is drawn as a band from its minimum to its maximum with a line along the
maximum: memory questions are about the peak, and a one-step spike must stay visible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import altair as alt
import pandas as pd

from db.queries import DeviceSeries, LayerRecord, PostmortemRecord, StepEvent, StepSeries
from diagnosis.units import GIB, MIB

ALLOCATOR = {
    "allocated_bytes": "allocated",
    "reserved_bytes": "reserved",
    "peak_allocated_bytes": "peak allocated in the step",
    "peak_reserved_bytes": "peak reserved in the step",
}
FRAGMENTATION = {"reserved_unallocated_bytes": "reserved − allocated", "inactive_split_bytes": "inactive split"}
HOST = {"rss_bytes": "RSS", "peak_rss_bytes": "peak RSS"}
TENSORS = {
    "parameter_bytes": "parameters",
    "gradient_bytes": "gradients",
    "optimizer_state_bytes": "optimizer states",
    "activation_bytes": "activations",
}
LOSS = {"loss": "loss"}
STEP_TIME = {"step_seconds": "step time"}
# The Memory tab's columns, read in one query: the host's stand in where the allocator's are missing.
MEMORY_COLUMNS = (*ALLOCATOR, *FRAGMENTATION, *HOST)

NVML_MEMORY = {"memory_used_bytes": "used", "process_used_bytes": "this process", "memory_total_bytes": "total"}
NVML_UTILISATION = {"gpu_util_percent": "GPU busy", "memory_util_percent": "memory busy"}
NVML_TEMPERATURE = {"temperature_c": "temperature"}
NVML_POWER = {"power_w": "power"}
DEVICE_COLUMNS = tuple({**NVML_MEMORY, **NVML_UTILISATION, **NVML_TEMPERATURE, **NVML_POWER})

_HEIGHT = 260
_RETRY_COLOR = "#f58518"
_OOM_COLOR = "#e45756"
_LEGEND = alt.Legend(orient="bottom", title=None)


@dataclass(frozen=True)
class ByteUnit:
    name: str
    size: int
    format: str  # d3 format of a value in this unit


def byte_unit(largest: float | None) -> ByteUnit:
    """GiB once the largest value reaches 1 GiB, else MiB: never bare bytes on an axis."""
    if largest is not None and abs(largest) >= GIB:
        return ByteUnit("GiB", GIB, ",.2f")
    return ByteUnit("MiB", MIB, ",.1f")


def has_readings(series: StepSeries | DeviceSeries, columns: Sequence[str]) -> bool:
    return any(value is not None for column in columns for value in series.maximum[column])


def largest(series: StepSeries | DeviceSeries, columns: Sequence[str]) -> float | None:
    values = [value for column in columns for value in series.maximum[column] if value is not None]
    return max(values) if values else None


def step_frame(series: StepSeries, labels: Mapping[str, str], scale: float = 1.0) -> pd.DataFrame:
    """Long form for Altair: a row per bucket and column that has a reading (step, last_step, series, low, high)."""
    rows = [
        (series.first_step[i], series.last_step[i], label, low / scale, high / scale)
        for column, label in labels.items()
        for i, (low, high) in enumerate(zip(series.minimum[column], series.maximum[column], strict=True))
        if high is not None
    ]
    return pd.DataFrame(rows, columns=["step", "last_step", "series", "low", "high"])


def device_frame(series: DeviceSeries, labels: Mapping[str, str], scale: float = 1.0) -> pd.DataFrame:
    """Long form per bucket, GPU and column; a GPU's number joins the label only when there are several."""
    several = len(set(series.gpu_index)) > 1
    rows = [
        (
            series.first_taken_at[i],
            f"{label} (GPU {series.gpu_index[i]})" if several else label,
            low / scale,
            high / scale,
        )
        for column, label in labels.items()
        for i, (low, high) in enumerate(zip(series.minimum[column], series.maximum[column], strict=True))
        if high is not None
    ]
    frame = pd.DataFrame(rows, columns=["taken_at", "series", "low", "high"])
    frame["time"] = pd.to_datetime(frame["taken_at"], unit="s", utc=True)
    return frame.drop(columns="taken_at")


def markers_frame(events: Sequence[StepEvent], postmortem: PostmortemRecord | None) -> pd.DataFrame:
    """Steps worth a vertical rule: allocator retries and OOMs it counted, and where the run died."""
    rows = []
    for event in events:
        what = "allocator retries" if event.kind == "alloc_retry" else "allocator OOMs"
        rows.append((event.record.step, event.kind, f"{event.count} {what} at step {event.record.step}"))
    if postmortem is not None and postmortem.step is not None:
        where = f" in {postmortem.phase}" if postmortem.phase else ""
        rows.append((postmortem.step, "died", f"out of memory at step {postmortem.step}{where}"))
    return pd.DataFrame(rows, columns=["step", "kind", "what"])


def bytes_over_steps(
    series: StepSeries, labels: Mapping[str, str], title: str, markers: pd.DataFrame | None = None
) -> alt.Chart | alt.LayerChart:
    unit = byte_unit(largest(series, list(labels)))
    frame = step_frame(series, labels, unit.size)
    layers = _bands(frame, _step_x(), unit.name, unit.format, series.bucket_steps > 1)
    if markers is not None and not markers.empty:
        layers += _rules(markers)
    return _layered(layers, title, _HEIGHT)


def values_over_steps(
    series: StepSeries, labels: Mapping[str, str], title: str, y_title: str
) -> alt.Chart | alt.LayerChart:
    frame = step_frame(series, labels)
    return _layered(_bands(frame, _step_x(), y_title, ",.3~f", series.bucket_steps > 1), title, _HEIGHT)


def stacked_bytes(series: StepSeries, labels: Mapping[str, str], title: str) -> alt.Chart:
    """Categories stacked on each other; a downsampled bucket stacks each category's maximum."""
    frame = step_frame(series, labels)
    unit = byte_unit(frame.groupby("step")["high"].sum().max() if not frame.empty else None)
    frame[["low", "high"]] = frame[["low", "high"]] / unit.size
    order = list(labels.values())
    return (
        alt.Chart(frame)
        .mark_area(opacity=0.85)
        .encode(
            x=_step_x(),
            y=alt.Y("high:Q", stack="zero", title=unit.name, axis=alt.Axis(format=unit.format)),
            color=alt.Color("series:N", sort=order, legend=_LEGEND),
            order=alt.Order("order:Q"),
            tooltip=[
                alt.Tooltip("step:Q", format=","),
                alt.Tooltip("series:N", title="what"),
                alt.Tooltip("high:Q", title=unit.name, format=unit.format),
            ],
        )
        .transform_calculate(order=f"indexof({order!r}, datum.series)")
        .properties(title=title, height=_HEIGHT)
    )


def bytes_over_time(series: DeviceSeries, labels: Mapping[str, str], title: str) -> alt.Chart | alt.LayerChart:
    unit = byte_unit(largest(series, list(labels)))
    frame = device_frame(series, labels, unit.size)
    x = alt.X("time:T", title=None)
    return _layered(_bands(frame, x, unit.name, unit.format, series.bucket_seconds > 1.5), title, 200)


def values_over_time(
    series: DeviceSeries, labels: Mapping[str, str], title: str, y_title: str
) -> alt.Chart | alt.LayerChart:
    frame = device_frame(series, labels)
    x = alt.X("time:T", title=None)
    return _layered(_bands(frame, x, y_title, ",.0f", series.bucket_seconds > 1.5), title, 200)


def layers_chart(layers: Sequence[LayerRecord], failed_module: str | None) -> alt.Chart:
    """Activation memory saved for backward by each module's own operations; the failing one in red."""
    unit = byte_unit(max((layer.activation_bytes for layer in layers), default=None))
    frame = pd.DataFrame(
        {
            "module": [layer.module for layer in layers],
            "activations": [layer.activation_bytes / unit.size for layer in layers],
            "failed": [layer.module == failed_module for layer in layers],
        }
    )
    return (
        alt.Chart(frame)
        .mark_bar()
        .encode(
            y=alt.Y("module:N", sort="-x", title=None, axis=alt.Axis(labelLimit=420)),
            x=alt.X(
                "activations:Q",
                title=f"activations saved for backward ({unit.name})",
                axis=alt.Axis(format=unit.format),
            ),
            color=alt.condition(alt.datum.failed, alt.value(_OOM_COLOR), alt.value("#4c78a8")),
            tooltip=[alt.Tooltip("module:N"), alt.Tooltip("activations:Q", title=unit.name, format=unit.format)],
        )
        .properties(title="Activation memory by module", height=alt.Step(22))
    )


def _step_x() -> alt.X:
    # tickMinStep: a two-step run would otherwise label fractional ticks "1 1 1 … 2".
    return alt.X("step:Q", title="step", axis=alt.Axis(format=",d", tickMinStep=1), scale=alt.Scale(zero=False))


def _bands(frame: pd.DataFrame, x: alt.X, y_title: str, fmt: str, downsampled: bool) -> list[alt.Chart]:
    # Each layer is built with a single encode(), channel objects rather than shorthand strings, and
    # layered once: Altair deep-copies and re-validates at every step, ~50 ms a chart on this project's
    # CPU machine, which is most of a page's server time (bench/dashboard_run_page.py).
    color = alt.Color("series:N", legend=_LEGEND)
    x_field = x.to_dict()["field"]
    tooltip = [alt.Tooltip(f"{x_field}:{'T' if x_field == 'time' else 'Q'}"), alt.Tooltip("series:N", title="what")]
    if downsampled:
        if x_field == "step":
            tooltip.append(alt.Tooltip("last_step:Q", title="to step", format=","))
        tooltip += [
            alt.Tooltip("low:Q", title=f"min ({y_title})", format=fmt),
            alt.Tooltip("high:Q", title=f"max ({y_title})", format=fmt),
        ]
    else:
        tooltip.append(alt.Tooltip("high:Q", title=y_title, format=fmt))
    y = alt.Y("high:Q", title=y_title, axis=alt.Axis(format=fmt))
    line = alt.Chart(frame).mark_line().encode(x=x, y=y, color=color, tooltip=tooltip)
    if not downsampled:
        return [line]
    band = alt.Chart(frame).mark_area(opacity=0.2).encode(x=x, y=alt.Y("low:Q"), y2=alt.Y2("high"), color=color)
    return [band, line]


def _layered(layers: list[alt.Chart], title: str, height: int) -> alt.Chart | alt.LayerChart:
    if len(layers) == 1:
        return layers[0].properties(title=title, height=height)
    # Layers sharing one frame hand it to the layer: alt.layer would otherwise compare their data by
    # hashing each frame's text rendering (~25 ms).
    shared, rest = layers[0].data, []
    for layer in layers:
        if layer.data is shared:
            layer = layer.copy(deep=False)
            layer.data = alt.Undefined
        rest.append(layer)
    return alt.layer(*rest, data=shared).properties(title=title, height=height)


def _rules(markers: pd.DataFrame) -> list[alt.Chart]:
    rules = []
    for kind, color, dash in (
        ("alloc_retry", _RETRY_COLOR, [4, 3]),
        ("oom", _OOM_COLOR, [4, 3]),
        ("died", _OOM_COLOR, []),
    ):
        subset = markers[markers["kind"] == kind]
        if not subset.empty:
            rule = alt.Chart(subset).mark_rule(color=color, strokeDash=dash, size=2)
            rules.append(rule.encode(x=alt.X("step:Q"), tooltip=[alt.Tooltip("what:N", title="event")]))
    return rules


def overlay_frame(series_by_run: Mapping[str, StepSeries], column: str, scale: float = 1.0) -> pd.DataFrame:
    """One column of several runs in long form (step, run, value): each bucket's maximum, as the Run page draws."""
    rows = [
        (series.first_step[i], label, high / scale)
        for label, series in series_by_run.items()
        for i, high in enumerate(series.maximum.get(column, ()))
        if high is not None
    ]
    return pd.DataFrame(rows, columns=["step", "run", "value"])


def runs_over_steps(
    series_by_run: Mapping[str, StepSeries],
    column: str,
    title: str,
    *,
    y_title: str | None = None,
    died: Mapping[str, int] | None = None,
) -> alt.Chart | alt.LayerChart:
    """One column of several runs in one chart coloured by run; bytes (no y_title) on a MiB/GiB axis.

    `died` maps a run to the step it ran out of memory in, drawn as a rule in the run's colour.
    """
    if y_title is None:
        values = [v for series in series_by_run.values() for v in series.maximum.get(column, ()) if v is not None]
        unit = byte_unit(max(values) if values else None)
        frame, y_title, fmt = overlay_frame(series_by_run, column, unit.size), unit.name, unit.format
    else:
        frame, fmt = overlay_frame(series_by_run, column), ",.3~f"
    order = list(series_by_run)
    # A categorical scheme: the theme's default palette gives two runs two shades of one blue.
    color = alt.Color("run:N", sort=order, scale=alt.Scale(domain=order, scheme="tableau10"), legend=_LEGEND)
    tooltip = [
        alt.Tooltip("run:N"),
        alt.Tooltip("step:Q", format=","),
        alt.Tooltip("value:Q", title=y_title, format=fmt),
    ]
    y = alt.Y("value:Q", title=y_title, axis=alt.Axis(format=fmt))
    layers = [alt.Chart(frame).mark_line(point=len(frame) < 60).encode(x=_step_x(), y=y, color=color, tooltip=tooltip)]
    if died:
        rules = pd.DataFrame(
            [(label, step, f"{label} ran out of memory at step {step}") for label, step in died.items()],
            columns=["run", "step", "what"],
        )
        layers.append(
            alt.Chart(rules)
            .mark_rule(strokeDash=[4, 3], size=2)
            .encode(x=alt.X("step:Q"), color=color, tooltip=[alt.Tooltip("what:N", title="event")])
        )
    return _layered(layers, title, _HEIGHT)


def breakdown_chart(parts: Mapping[str, int], title: str) -> alt.Chart:
    """What held memory at one moment, a bar per part, on a MiB/GiB axis."""
    unit = byte_unit(max(parts.values(), default=None))
    order = list(parts)
    frame = pd.DataFrame({"part": order, "size": [value / unit.size for value in parts.values()]})
    return (
        alt.Chart(frame)
        .mark_bar()
        .encode(
            y=alt.Y("part:N", sort=order, title=None),
            x=alt.X("size:Q", title=unit.name, axis=alt.Axis(format=unit.format)),
            color=alt.Color("part:N", sort=order, legend=None),
            tooltip=[alt.Tooltip("part:N", title="what"), alt.Tooltip("size:Q", title=unit.name, format=unit.format)],
        )
        .properties(title=title, height=alt.Step(28))
    )
