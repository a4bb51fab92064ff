"""Run: one run's memory step by step, refreshed live while it trains."""

import time

import streamlit as st

from app import actions, data, nav, run_panels
from app.views.facts import RunFacts, human_duration, model_name, run_facts, steps_label
from app.views.failure import tensors_at_failure
from app.views.status import badge_color, badge_icon, display_status, is_live, meaning
from db.queries import RunRecord
from diagnosis.units import human_bytes

# The live part redraws this often while the run trains (app.data.TTL_S is shorter).
REFRESH_S = 2.0
_STOPPING = "run.stop_outcome"


def _requested_run() -> int | None:
    raw = st.query_params.get("run")
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        st.warning(f"`?run={raw}` is not a run id; showing the newest run.")
        return None


def _choose_run(url: str) -> int | None:
    runs = data.runs(url)
    if not runs:
        st.info("No runs recorded yet: the Runs page says how to start one.")
        st.page_link(nav.RUNS.path, label="Runs", icon=nav.RUNS.icon)
        return None
    now = time.time()
    by_id = {run.id: run for run in runs}
    wanted = _requested_run()
    if wanted is not None and wanted not in by_id:
        st.warning(f"There is no run {wanted} in this database (deleted?); showing the newest run.")
    ids = list(by_id)
    chosen = st.sidebar.selectbox(
        "Run",
        ids,
        index=ids.index(wanted) if wanted in by_id else 0,
        format_func=lambda run_id: f"run {run_id} · {model_name(by_id[run_id])} · {display_status(by_id[run_id], now)}",
    )
    if st.query_params.get("run") != str(chosen):
        st.query_params["run"] = str(chosen)
    return chosen


def _header(run: RunRecord, facts: RunFacts) -> None:
    st.title(f"Run {run.id}" + (f" · {run.name}" if run.name else ""))
    status = facts.status
    st.badge(status, icon=badge_icon(status), color=badge_color(status), help=meaning(status))
    if run.parent_run_id is not None:
        parent, compare = st.columns(2)
        parent.page_link(
            nav.RUN.path, label=f"re-run of run {run.parent_run_id}", query_params={"run": run.parent_run_id}
        )
        compare.page_link(
            nav.COMPARE.path,
            label=f"Compare with run {run.parent_run_id}",
            icon=nav.COMPARE.icon,
            query_params={"run": run.id},
        )
    model, device, steps, speed, clock = st.columns([2, 3, 2, 2, 2])
    model.metric("Model", facts.model)
    device.metric("Device", facts.device)
    steps.metric("Steps", steps_label(facts.steps_done, facts.max_steps))
    speed.metric(
        "Tokens/s",
        f"{facts.tokens_per_s:,.0f}" if facts.tokens_per_s is not None else "n/a",
        help="median of the last 20 steps",
    )
    if status == "running":
        clock.metric("ETA", human_duration(facts.eta_s), help="steps left × the median of the last 20 step times")
    else:
        clock.metric("Duration", human_duration(facts.duration_s))


def _stop_button(run: RunRecord) -> None:
    if st.button(
        "Stop run",
        icon=":material/stop_circle:",
        help="SIGTERM to the trainer: it saves what it measured and ends as stopped",
    ):
        st.session_state[_STOPPING] = (run.id, actions.stop_run(run, time.time()))
    stopping = st.session_state.get(_STOPPING)
    if stopping is not None and stopping[0] == run.id:
        outcome = stopping[1]
        (st.info if outcome.done else st.error)(outcome.message)


def _alerts(url: str, run: RunRecord, facts: RunFacts) -> None:
    status = facts.status
    if status == "running":
        _stop_button(run)
        if facts.steps_done == 0:
            st.info("Waiting for the first optimizer step (the model is being built).")
    elif status == "lost":
        since = human_duration(time.time() - (run.heartbeat_at or run.created_at))
        st.warning(
            f"Lost: still marked running, but its process has not reported for {since} (killed hard, or its "
            "host went away). What it recorded until then is below."
        )
    elif status == "oom":
        _oom(url, run)
    elif status in ("failed", "killed"):
        st.error(_last_line(run.error_text) or f"The run ended as {status}.")
        if run.error_text:
            with st.expander("Error"):
                st.code(run.error_text, language=None)
    elif status == "stopped":
        st.info(f"Stopped on request ({_last_line(run.error_text) or 'SIGTERM'}).")
    if run.samples_dropped:
        st.warning(
            f"{run.samples_dropped:,} samples were dropped because the database could not keep up: the "
            "timelines have gaps there."
        )


def _oom(url: str, run: RunRecord) -> None:
    postmortem = data.postmortem(url, run.id)
    if postmortem is None:
        st.error(f"Out of memory; no post-mortem was saved. {_last_line(run.error_text)}")
        return
    where = f" in {postmortem.phase}" if postmortem.phase else ""
    module = f" of `{postmortem.module}`" if postmortem.module else ""
    st.error(
        f"Out of memory at step {postmortem.step}, micro-batch {postmortem.micro_batch}{where}{module}: "
        f"a request for {human_bytes(postmortem.requested_bytes)} failed on {postmortem.device}."
    )
    diagnosis = data.diagnosis(url, run.id)
    if diagnosis is not None and diagnosis.request:
        st.markdown(f"**What it asked for:** {diagnosis.request}")
    st.info(postmortem.finding)
    at_failure = tensors_at_failure(postmortem)
    if at_failure:
        st.markdown(at_failure)
    st.page_link(
        nav.POSTMORTEMS.path,
        label="Post-mortem: what held the memory, and the fixes ranked",
        icon=nav.POSTMORTEMS.icon,
        query_params={"run": run.id},
    )
    st.caption(f"The full post-mortem: `.venv/bin/python -m trainer postmortem {run.id}`")


def _last_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[-1] if lines else ""


def _live(url: str, run_id: int, was_live: bool) -> None:
    run = data.run(url, run_id)
    if run is None:
        st.warning(f"Run {run_id} no longer exists.")
        return
    now = time.time()
    if was_live and not is_live(run, now):
        st.rerun()  # it ended: draw the whole page once more, without the timer
    facts = run_facts(run, data.summary(url, run_id), data.recent_steps(url, run_id), now)
    _header(run, facts)
    _alerts(url, run, facts)
    run_panels.show(url, run)


url = data.open_database()
run_id = _choose_run(url)
if run_id is not None:
    chosen = data.run(url, run_id)
    live = chosen is not None and is_live(chosen, time.time())
    st.fragment(_live, run_every=REFRESH_S if live else None)(url, run_id, live)
