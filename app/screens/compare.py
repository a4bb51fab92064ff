"""Compare: runs side by side, typically a fix's re-run and the run it fixed (`?run=ID` with its parent)."""

import time

import streamlit as st

from app import charts, data, nav
from app.views.compare import RunFigures, config_diff, default_selection, figures_table, run_label
from app.views.status import display_status
from db.queries import RunRecord

_COLUMNS = (*charts.MEMORY_COLUMNS, *charts.LOSS, *charts.STEP_TIME)
_CHOSEN = "compare.runs"
_FOR = "compare.for"  # the selection the URL asked for when the choice was last reset


def _requested() -> tuple[int | None, list[int]]:
    """`?run=ID` (that run and its parent) or `?runs=1,2,3`; anything unreadable is ignored."""
    listed = [int(part) for part in (st.query_params.get("runs") or "").split(",") if part.strip().isdigit()]
    one = st.query_params.get("run")
    return (int(one) if one and one.isdigit() else None), listed


def _choose(runs: list[RunRecord]) -> list[RunRecord]:
    by_id = {run.id: run for run in runs}
    wanted, listed = _requested()
    default = [run_id for run_id in listed if run_id in by_id] or default_selection(runs, wanted)
    # A new `?run=` or `?runs=` (a link from another page) resets the choice; the user's own edits stay.
    if st.session_state.get(_FOR) != default or _CHOSEN not in st.session_state:
        st.session_state[_FOR] = default
        st.session_state[_CHOSEN] = default
    now = time.time()
    chosen = st.multiselect(
        'Runs (the first is the "before")',
        list(by_id),
        format_func=lambda run_id: f"{run_label(by_id[run_id])} · {display_status(by_id[run_id], now)}",
        key=_CHOSEN,
    )
    # The URL names the runs shown, so it can be shared or reloaded.
    st.query_params.pop("run", None)
    st.query_params["runs"] = ",".join(map(str, chosen))
    st.session_state[_FOR] = list(chosen)
    return [by_id[run_id] for run_id in chosen]


def _figures(url: str, run: RunRecord) -> RunFigures:
    return RunFigures(
        run=run,
        summary=data.summary(url, run.id),
        postmortem=data.postmortem(url, run.id),
        step_seconds=data.step_series(url, run.id, _COLUMNS),
    )


def _timelines(url: str, chosen: list[RunRecord]) -> None:
    series = {run_label(run): data.step_series(url, run.id, _COLUMNS) for run in chosen}
    died = {}
    for run in chosen:
        postmortem = data.postmortem(url, run.id)
        if postmortem is not None and postmortem.step is not None:
            died[run_label(run)] = postmortem.step
    on_allocator = all(charts.has_readings(one, ["peak_allocated_bytes"]) for one in series.values())
    memory = "peak_allocated_bytes" if on_allocator else "rss_bytes"
    title = "Peak allocated in each step" if on_allocator else "Trainer process memory (RSS)"
    st.altair_chart(charts.runs_over_steps(series, memory, title, died=died), width="stretch")
    if not on_allocator:
        st.caption("RSS, since at least one of these runs has no caching allocator reading (the CPU).")
    if died:
        st.caption("Dashed rules: where a run ran out of memory, in its colour.")
    loss, speed = st.columns(2)
    with loss:
        st.altair_chart(charts.runs_over_steps(series, "loss", "Loss", y_title="loss"), width="stretch")
    with speed:
        st.altair_chart(charts.runs_over_steps(series, "step_seconds", "Step time", y_title="seconds"), width="stretch")


def _config_changes(chosen: list[RunRecord]) -> None:
    st.subheader("What changed in the config")
    before = chosen[0]
    for after in chosen[1:]:
        changes = config_diff(before.config, after.config)
        if len(chosen) > 2:
            st.markdown(f"**{run_label(after)}** against {run_label(before)}:")
        if changes:
            st.markdown("\n".join(f"- `{change}`" for change in changes))
        else:
            st.caption(f"Run {after.id} has the same config as run {before.id}.")


url = data.open_database()
st.title("Compare")
runs = data.runs(url)
if len(runs) < 2:
    st.info(
        "Compare needs two runs. Re-run an out-of-memory run with a fix (Post-mortems → Apply & relaunch), or launch "
        "another run, then come back."
    )
    st.page_link(nav.POSTMORTEMS.path, label="Post-mortems", icon=nav.POSTMORTEMS.icon)
    st.page_link(nav.LAUNCH.path, label="Launch", icon=nav.LAUNCH.icon)
    st.stop()
chosen = _choose(runs)
if len(chosen) < 2:
    st.info("Pick at least two runs to compare.")
    st.stop()
_config_changes(chosen)
st.subheader("Memory and speed")
st.dataframe(figures_table([_figures(url, run) for run in chosen]), hide_index=True, width="stretch")
st.caption(
    "Peaks over every recorded step; a run that ran out of memory needed at least what it held at the failure plus "
    "the request that failed, so its saving is a floor. Median step time over all steps (over buckets' midpoints "
    "past 500 steps)."
)
_timelines(url, chosen)
