"""The Run page's tabs: memory timelines, tensor breakdown, NVML, loss and speed, layers, config."""

from __future__ import annotations

import time

import altair as alt
import streamlit as st
import yaml

from app import charts, data
from app.views.failure import layers_at_failure
from app.views.status import is_live
from db.queries import RunRecord, StepSeries

# Tab labels double as the `?tab=` value in the page's URL.
TABS = ("Memory", "Tensors", "GPU", "Training", "Layers", "Config")


def show(url: str, run: RunRecord) -> None:
    """The tabs, drawing only the open one: Altair costs ~50 ms a chart, and the page has ten."""
    draw = (_memory, _tensors, _gpu, _training, _layers, _config)
    for tab, draw_tab in zip(st.tabs(TABS, key="tab", bind="query-params"), draw, strict=True):
        if tab.open:
            with tab:
                draw_tab(url, run)


def memory_timeline(url: str, run: RunRecord) -> None:
    """The Memory tab alone, for pages about one moment of a run (a post-mortem) that want its history."""
    _memory(url, run)


def layer_profile(url: str, run: RunRecord) -> None:
    """The Layers tab alone: the failing module in red when the run has a post-mortem."""
    _layers(url, run)


def _has_steps(run: RunRecord, series: StepSeries) -> bool:
    if len(series):
        return True
    if is_live(run, time.time()):
        st.info("No step recorded yet: the first appears when the first optimizer step ends.")
    else:
        st.info("No step was recorded: the run ended before its first optimizer step did.")
    return False


def _chart(chart: alt.TopLevelMixin) -> None:
    st.altair_chart(chart, width="stretch")


def _bucket_note(series: StepSeries) -> str:
    if series.bucket_steps == 1:
        return ""
    return (
        f" Downsampled: {len(series):,} buckets of {series.bucket_steps:,} steps; the line is each bucket's "
        "largest value, the band its range."
    )


def _memory(url: str, run: RunRecord) -> None:
    series = data.step_series(url, run.id, charts.MEMORY_COLUMNS)
    if not _has_steps(run, series):
        return
    markers = charts.markers_frame(data.step_events(url, run.id), data.postmortem(url, run.id))
    if charts.has_readings(series, list(charts.ALLOCATOR)):
        _chart(charts.bytes_over_steps(series, charts.ALLOCATOR, "Caching allocator", markers))
        _chart(
            charts.bytes_over_steps(
                series, charts.FRAGMENTATION, "Fragmentation: reserved but not allocated, and inactive split", markers
            )
        )
    else:
        reason = (
            "this run is on the CPU, which has no caching allocator"
            if not (run.device or "").startswith("cuda")
            else "no allocator reading was recorded"
        )
        st.info(f"Allocator timelines unavailable: {reason}. Showing the trainer process's memory (RSS) instead.")
        _chart(charts.bytes_over_steps(series, charts.HOST, "Trainer process memory (RSS)", markers))
    notes = []
    if (markers["kind"] == "alloc_retry").any():
        notes.append("orange rules: steps where the allocator freed its cache and retried a cudaMalloc")
    if (markers["kind"] == "oom").any():
        notes.append("dashed red rules: steps where the allocator counted an out-of-memory error")
    if (markers["kind"] == "died").any():
        notes.append("red rule: where the run ran out of memory")
    text = "; ".join(notes)
    st.caption((text[:1].upper() + text[1:] + "." if text else "") + _bucket_note(series))


def _tensors(url: str, run: RunRecord) -> None:
    series = data.step_series(url, run.id, tuple(charts.TENSORS))
    if not _has_steps(run, series):
        return
    _chart(charts.stacked_bytes(series, charts.TENSORS, "What the training step's tensors hold"))
    st.caption(
        "Counted from the tensors themselves, on any device. Activations: the most saved for backward by one "
        "micro-batch." + _bucket_note(series)
    )


def _training(url: str, run: RunRecord) -> None:
    series = data.step_series(url, run.id, (*charts.LOSS, *charts.STEP_TIME))
    if not _has_steps(run, series):
        return
    left, right = st.columns(2)
    with left:
        _chart(charts.values_over_steps(series, charts.LOSS, "Loss", "loss"))
    with right:
        _chart(charts.values_over_steps(series, charts.STEP_TIME, "Step time", "seconds"))


def _gpu(url: str, run: RunRecord) -> None:
    nvml = (run.environment or {}).get("nvml") or {}
    if not nvml.get("sampled"):
        reason = nvml.get("reason") or ("not recorded" if run.environment else "the run has not started yet")
        st.info(f"NVML unavailable: {reason}")
        return
    series = data.device_series(url, run.id, charts.DEVICE_COLUMNS)
    if not len(series):
        st.info("No NVML sample recorded yet.")
        return
    panels = (
        (charts.NVML_MEMORY, lambda labels: charts.bytes_over_time(series, labels, "GPU memory (NVML)")),
        (charts.NVML_UTILISATION, lambda labels: charts.values_over_time(series, labels, "Utilisation", "%")),
        (charts.NVML_TEMPERATURE, lambda labels: charts.values_over_time(series, labels, "Temperature", "°C")),
        (charts.NVML_POWER, lambda labels: charts.values_over_time(series, labels, "Power", "W")),
    )
    unreadable = []
    for labels, draw in panels:
        readable = {column: label for column, label in labels.items() if charts.has_readings(series, [column])}
        unreadable += [label for column, label in labels.items() if column not in readable]
        if readable:
            _chart(draw(readable))
    if unreadable:
        st.caption(f"Not readable through NVML on this GPU: {', '.join(unreadable)}.")


def _layers(url: str, run: RunRecord) -> None:
    postmortem = data.postmortem(url, run.id)
    layers = data.top_layers(url, run.id)
    when = "the latest profiled"
    if not layers and postmortem is not None:
        layers, when = layers_at_failure(postmortem), "up to the failure"
    if not layers:
        st.info(
            "No layer profile recorded: layers are profiled on the first `monitor.layer_profile_steps` steps "
            "and every `monitor.layer_profile_every`."
        )
        return
    failed = postmortem.module if postmortem is not None else None
    _chart(charts.layers_chart(layers, failed))
    step = f" on step {layers[0].step}" if layers[0].step is not None else ""
    note = f"The {len(layers)} modules saving the most activation memory{step}, {when}."
    if failed and any(layer.module == failed for layer in layers):
        note += f" In red: `{failed}`, where the run ran out of memory."
    st.caption(note)


def _config(_url: str, run: RunRecord) -> None:
    left, right = st.columns(2)
    with left:
        st.subheader("Config")
        st.code(yaml.safe_dump(run.config, sort_keys=False), language="yaml")
    with right:
        st.subheader("Environment")
        if run.environment:
            st.json(run.environment, expanded=1)
        else:
            st.caption("Not recorded yet: the trainer writes it when it starts.")
