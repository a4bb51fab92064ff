"""The Post-mortems page's parts: the headline, what held the memory, the ranked fixes, the details."""

from __future__ import annotations

from datetime import datetime

import pandas as pd
import streamlit as st

from app import charts, data, nav, run_panels, suggestion_cards
from app.views import postmortem as view
from app.views.facts import model_name
from db.queries import PostmortemRecord, RunRecord
from diagnosis.units import human_bytes

# Shown in the list of every out-of-memory run; older ones stay reachable through the sidebar.
_LISTED = 50


def header(url: str, run: RunRecord, pm: PostmortemRecord) -> None:
    st.subheader(f"Run {run.id}" + (f" · {run.name}" if run.name else "") + f" · {model_name(run)}")
    links = st.columns(3)
    links[0].page_link(nav.RUN.path, label=f"Run {run.id}'s page", icon=nav.RUN.icon, query_params={"run": run.id})
    links[1].page_link(
        nav.LAUNCH.path, label="Edit its config and launch", icon=nav.LAUNCH.icon, query_params={"from": run.id}
    )
    children = [child for child in data.runs(url) if child.parent_run_id == run.id]
    if children:
        newest = children[0]
        links[2].page_link(
            nav.COMPARE.path,
            label=f"Compare with its re-run, run {newest.id} ({newest.status})",
            icon=nav.COMPARE.icon,
            query_params={"run": newest.id},
        )
    st.error(view.error_line(pm))
    diagnosis = data.diagnosis(url, run.id)
    figures = view.headline(
        pm,
        diagnosis.cached_bytes if diagnosis else None,
        diagnosis.shortfall_bytes if diagnosis else None,
    )
    for row in (figures[:3], figures[3:]):
        for column, figure in zip(st.columns(3), row, strict=False):
            column.metric(figure.label, figure.value, help=figure.help)
    st.markdown(view.where(pm))
    if diagnosis is not None and diagnosis.request:
        st.markdown(f"**What it asked for:** {diagnosis.request}")
    gpu = view.gpu_line(pm)
    if gpu:
        st.caption(gpu)
    st.info(pm.finding)


def what_held_memory(url: str, run: RunRecord, pm: PostmortemRecord) -> None:
    breakdown, layers = st.columns(2)
    with breakdown:
        parts = view.tensor_parts(pm)
        if pm.requested_bytes is not None:
            parts["the failed request"] = pm.requested_bytes
        if parts:
            st.altair_chart(charts.breakdown_chart(parts, "At the failure"), width="stretch")
            rss = (pm.host or {}).get("rss_bytes")
            st.caption(
                "Counted from the tensors when it failed; activations are those saved for backward so far. "
                + (f"The trainer process held {human_bytes(rss)} (RSS)." if rss is not None else "")
            )
        else:
            st.info("No tensor breakdown was saved with this post-mortem.")
    with layers:
        run_panels.layer_profile(url, run)
    st.markdown("**Memory up to the failure**")
    run_panels.memory_timeline(url, run)


def fixes(url: str, run: RunRecord) -> int | None:
    """The ranked fixes; returns the index of the one whose Apply & relaunch was clicked."""
    st.subheader("Fixes, best first")
    diagnosis = data.diagnosis(url, run.id)
    if diagnosis is None or not diagnosis.fixes:
        st.info(
            "No fix to suggest from what was recorded. The Diagnose CLI reads the raw message: "
            f"`.venv/bin/python -m diagnosis suggest --run {run.id}`."
        )
        return None
    clicked = None
    for index, fix in enumerate(diagnosis.fixes):
        with st.container(border=True):
            suggestion_cards.card(index + 1, fix)
            if fix.patch and st.button(
                "Apply & relaunch",
                key=f"postmortems.apply.{run.id}.{index}",
                icon=":material/replay:",
                help=f"run {run.id}'s config with {fix.change}, as a new run whose parent is run {run.id}",
            ):
                clicked = index
    return clicked


def details(pm: PostmortemRecord) -> None:
    with st.expander("Traceback"):
        st.code(pm.traceback or pm.error_text, language=None)
    st.caption(view.snapshot_text(pm))
    st.caption(f"Everything saved: `.venv/bin/python -m trainer postmortem {pm.run_id} --json`")


def every_oom(url: str, runs: list[RunRecord]) -> None:
    st.subheader("Every out-of-memory run")
    rows = []
    for run in runs[:_LISTED]:
        pm = data.postmortem(url, run.id)
        rows.append(
            {
                "Run": run.id,
                "Name": run.name or "",
                "Model": model_name(run),
                "Died": datetime.fromtimestamp(run.ended_at or run.created_at),
                "Step": pm.step if pm else None,
                "Phase": (pm.phase or "") if pm else "",
                "Layer": (pm.module or "") if pm else "",
                "Requested": human_bytes(pm.requested_bytes) if pm else "n/a",
                "Open": f"{nav.POSTMORTEMS.url_path}?run={run.id}",
            }
        )
    st.dataframe(
        pd.DataFrame(rows),
        hide_index=True,
        width="stretch",
        column_config={
            "Run": st.column_config.NumberColumn(format="%d", width="small"),
            "Died": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm:ss"),
            "Open": st.column_config.LinkColumn(display_text="open"),
        },
    )
