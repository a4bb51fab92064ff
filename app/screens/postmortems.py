"""Post-mortems: why a run ran out of memory, what held the memory, and ranked fixes one click from a re-run."""

import time

import streamlit as st

from app import data, launching, nav, postmortem_panels
from app.views.status import display_status
from db.queries import RunRecord

NO_OOM = """No run has run out of memory yet in `{db}`.

To see a post-mortem, make one: launch the **Scenario 1** setup (a long-context LoRA that runs out of
its CPU budget in its first step), or from a terminal in the repository:

```
.venv/bin/python -m trainer run --config examples/cpu-oom.yaml
```"""


def _requested_run() -> int | None:
    raw = st.query_params.get("run")
    if raw is None:
        return None
    if not raw.isdigit():
        st.warning(f"`?run={raw}` is not a run id; showing the newest post-mortem.")
        return None
    return int(raw)


def _choose(url: str, runs: list[RunRecord]) -> RunRecord:
    by_id = {run.id: run for run in runs}
    wanted = _requested_run()
    if wanted is not None and wanted not in by_id:
        other = data.run(url, wanted)
        reason = f"it ended as {other.status}" if other else "there is no such run"
        st.warning(f"Run {wanted} has no post-mortem ({reason}); showing the newest one.")
    ids = list(by_id)
    now = time.time()
    chosen = st.sidebar.selectbox(
        "Out-of-memory run",
        ids,
        index=ids.index(wanted) if wanted in by_id else 0,
        format_func=lambda run_id: (
            f"run {run_id} · {by_id[run_id].name or 'unnamed'} · {display_status(by_id[run_id], now)}"
        ),
    )
    if st.query_params.get("run") != str(chosen):
        st.query_params["run"] = str(chosen)
    return by_id[chosen]


def _relaunch(url: str, run: RunRecord, index: int) -> None:
    """Apply fix `index` to the run's config and start it, then open the new run's page."""
    diagnosis = data.diagnosis(url, run.id)
    fix = diagnosis.fixes[index]
    with st.spinner(f"Starting run {run.id} again with {fix.change}…"):
        started = launching.relaunch(run, fix.patch, fix.change, url)
    if started.run_id is None:
        st.error(started.message)
        return
    data.forget()
    st.switch_page(nav.RUN.path, query_params={"run": started.run_id})


url = data.open_database()
st.title("Post-mortems")
runs = data.oom_runs(url)
if not runs:
    st.info(NO_OOM.format(db=data.printable_url(url)))
    st.page_link(
        nav.LAUNCH.path,
        label="Launch scenario 1",
        icon=nav.LAUNCH.icon,
        query_params={"setup": "scenario-1"},
    )
    st.stop()
run = _choose(url, runs)
postmortem = data.postmortem(url, run.id)
if postmortem is None:
    st.error(
        f"Run {run.id} is marked out of memory but has no post-mortem to read. What it recorded is on its Run page."
    )
    st.page_link(nav.RUN.path, label=f"Run {run.id}", icon=nav.RUN.icon, query_params={"run": run.id})
    st.stop()
postmortem_panels.header(url, run, postmortem)
postmortem_panels.what_held_memory(url, run, postmortem)
applied = postmortem_panels.fixes(url, run)
if applied is not None:
    _relaunch(url, run, applied)
postmortem_panels.details(postmortem)
postmortem_panels.every_oom(url, runs)
