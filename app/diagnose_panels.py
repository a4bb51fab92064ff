"""The Diagnose page's parts: the run's description, one OOM message read back, an uploaded snapshot summarised."""

from __future__ import annotations

import streamlit as st
import yaml

from app import diagnosis_charts, plan_fields
from app.views import oom_message
from app.views import plan as plan_view
from app.views import snapshot as snapshot_view
from diagnosis.oom_text import OomMessage
from diagnosis.safe_pickle import SnapshotError, SnapshotTooLargeError, UnsafePickleError
from diagnosis.snapshot import SnapshotSummary, read_snapshot
from diagnosis.units import MIB
from trainer.config import ConfigError, validate_config

KEY = "diagnose."
# Uploads are capped by Streamlit at this size (also server.maxUploadSize in .streamlit/config.toml);
# a compressed snapshot may unpickle to more, up to the decompressed cap.
MAX_UPLOAD_MIB = 256
MAX_SNAPSHOT_BYTES = 1024 * MIB
NONE, KNOBS, YAML = "none", "knobs", "yaml"
# What the user typed survives a trip to another page and back.
_PERSIST = {"persist_state": "session"}
_SNAPSHOT = KEY + "snapshot_summary"  # (upload's file_id, SnapshotSummary or the message saying why not)


def run_description() -> tuple[str | None, tuple[str, int] | None, str | None]:
    """The config (as YAML), the card (its name and capacity) and the torch version the user
    described, each optional."""
    kind = st.radio(
        "The run's config",
        (NONE, KNOBS, YAML),
        format_func={NONE: "not given", KNOBS: "a preset and its knobs", YAML: "paste its YAML"}.get,
        horizontal=True,
        key=KEY + "config_kind",
        **_PERSIST,
        help="with a config, each fix's saving is an estimate of the config with and without the change",
    )
    config_yaml = None
    if kind == KNOBS:
        name, shape = plan_fields.model_input(KEY)
        if name is not None:
            cfg, issues = plan_view.check(plan_view.config_from_knobs(plan_fields.knobs(KEY, shape), name), shape)
            _issues(issues)
            config_yaml = cfg.to_yaml() if cfg is not None else None
    elif kind == YAML:
        config_yaml = _pasted_config()
    gpu = plan_fields.gpu_input(KEY, optional=True)
    version = st.text_input(
        "PyTorch version (optional)",
        key=KEY + "torch_version",
        **_PERSIST,
        placeholder="2.3.1",
        help="decides the allocator setting: expandable_segments from 2.1, max_split_size_mb before",
    ).strip()
    return config_yaml, gpu, version or None


def _issues(issues) -> None:
    for issue in issues:
        st.error(f"`{issue.key}`: {issue.message}", icon=":material/error:")
    if issues:
        st.caption("Fixes are still ranked without a config, from the message and the snapshot alone.")


def _pasted_config() -> str | None:
    text = st.text_area(
        "Config YAML (the file given to `python -m trainer run --config`)",
        key=KEY + "config_yaml",
        **_PERSIST,
        height=160,
        placeholder="model: {name: llama-3-8b, dtype: bf16}\nlora: {r: 16}\ndata: {seq_len: 4096}",
    )
    if not text.strip():
        return None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        st.error(
            f"Not valid YAML: {error}. Paste the config file as it is, sections such as `model:` at the left edge."
        )
        return None
    if not isinstance(raw, dict):
        st.error("This YAML is not a mapping: a config has sections such as `model:` and `train:`.")
        return None
    try:
        return validate_config(raw).to_yaml()
    except ConfigError as error:
        _issues(error.issues)
        return None


def message_panel(messages: list[OomMessage]) -> OomMessage:
    """Every message of a log in a table, then the chosen one in full; returns the chosen one."""
    chosen = messages[0]
    if len(messages) > 1:
        st.markdown(f"**{len(messages)} out-of-memory messages** in this text, in order:")
        st.dataframe(oom_message.messages_frame(messages), hide_index=True, width="stretch")
        index = st.selectbox(
            "Message to diagnose",
            range(len(messages)),
            format_func=lambda i: f"#{i + 1}: {messages[i].text[:90]}…",
            key=KEY + "message_index",
        )
        chosen = messages[index]
    figures = oom_message.figures(chosen)
    for row in range(0, len(figures), 4):
        for column, figure in zip(st.columns(4), figures[row : row + 4], strict=False):
            column.metric(figure.label, figure.value, help=figure.help)
    place = oom_message.where(chosen)
    device = f"{chosen.backend} device {chosen.device}" if chosen.device is not None else chosen.backend
    rank = f", rank {chosen.rank}" if chosen.rank is not None else ""
    st.caption(
        f"Read as a {device} message ({chosen.era} layout{rank})."
        + (f" It failed {place}." if place else " The traceback does not say where (paste the lines above it).")
        + (
            f" This layout does not print: {', '.join(oom_message.missing(chosen))}."
            if oom_message.missing(chosen)
            else ""
        )
    )
    processes = oom_message.processes_frame(chosen)
    if processes is not None:
        st.dataframe(processes, hide_index=True)
    arithmetic = oom_message.arithmetic(chosen)
    if arithmetic:
        st.markdown("\n".join(f"- {line}" for line in arithmetic))
    verdict = oom_message.verdict(chosen)
    if verdict:
        st.info(verdict)
    with st.expander("The message as read"):
        st.code(chosen.text, language=None)
    return chosen


def read_upload(upload) -> SnapshotSummary | str:
    """The upload's summary, read once per file through the restricted unpickler; a refusal is a message."""
    cached = st.session_state.get(_SNAPSHOT)
    if cached is not None and cached[0] == upload.file_id:
        return cached[1]
    upload.seek(0)
    try:
        result: SnapshotSummary | str = read_snapshot(upload, max_bytes=MAX_SNAPSHOT_BYTES)
    except UnsafePickleError as error:
        result = (
            f"Refused, nothing from it was run: {error}. A PyTorch memory snapshot holds only lists, dicts, "
            "numbers and strings; this file asks to run code. Only open it if you made it yourself."
        )
    except SnapshotTooLargeError as error:
        result = (
            f"Too large to read here: {error}. Read it on this machine with "
            "`.venv/bin/python -m diagnosis snapshot FILE --max-mb 4096`."
        )
    except SnapshotError as error:
        result = (
            f"Not a readable snapshot: {error}. Upload the file written by "
            "`torch.cuda.memory._dump_snapshot('snapshot.pickle')` (plain or gzip)."
        )
    st.session_state[_SNAPSHOT] = (upload.file_id, result)
    return result


def snapshot_panel(summary: SnapshotSummary) -> None:
    st.info(summary.headline)
    figures = snapshot_view.totals_figures(summary.totals)
    for row in range(0, len(figures), 3):  # six abreast cut values short ("954.0 …")
        for column, figure in zip(st.columns(3), figures[row : row + 3], strict=False):
            column.metric(figure.label, figure.value, help=figure.help)
    devices = f"{summary.device_count} device(s)" if summary.device_count else "no device"
    st.caption(f"Layout: {summary.layout}; {devices}.")
    if summary.totals.segments == 0:
        return
    # Full width, one under the other: both end in file paths that a half-width column cuts off.
    st.markdown("**Top allocation sites**")
    if summary.top_sites:
        st.dataframe(snapshot_view.sites_frame(summary), hide_index=True, width="stretch")
        st.caption(snapshot_view.sites_caption(summary))
    else:
        st.info(snapshot_view.NO_STACKS)
    st.markdown("**Largest blocks**")
    st.dataframe(snapshot_view.blocks_frame(summary), hide_index=True, width="stretch")
    timelines = [device.timeline for device in summary.devices if device.timeline is not None and device.timeline.x]
    for timeline in timelines:
        st.altair_chart(diagnosis_charts.timeline_chart(timeline), width="stretch")
    if not timelines:
        st.caption("No allocator events were traced (no `_record_memory_history` before the dump): no timeline.")
    if summary.ooms:
        st.markdown("**Out-of-memory events in the trace**")
        st.dataframe(snapshot_view.ooms_frame(summary), hide_index=True, width="stretch")
    else:
        st.caption("No out-of-memory event in the trace.")
