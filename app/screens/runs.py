"""Runs: every recorded run with its status and memory peaks; open one, or delete it."""

import time

import streamlit as st

from app import actions, data, nav
from app.views.runs_table import SIZE_COLUMNS, runs_frame, status_counts
from app.views.status import DISPLAY_STATUSES, cell_label, display_status, meaning

FIRST_RUN = """No runs recorded yet in `{db}`.

Start one from a terminal in the repository (a tiny Llama with LoRA; it trains on a CPU in seconds):

```
.venv/bin/python -m trainer run --config examples/tiny-llama-lora.yaml
```

or one that runs out of memory on purpose, to see a post-mortem: `--config examples/cpu-oom.yaml`.
Runs appear here as soon as they start."""

_CONFIRM = "runs.confirm_delete"
_FLASH = "runs.flash"


def _ask_delete(run_id: int) -> None:
    st.session_state[_CONFIRM] = run_id


def _cancel_delete() -> None:
    st.session_state.pop(_CONFIRM, None)


def _delete(url: str, run_id: int) -> None:
    st.session_state.pop(_CONFIRM, None)
    run = data.run(url, run_id)
    if run is None:
        st.session_state[_FLASH] = actions.Outcome(False, f"Run {run_id} was already deleted.")
        return
    st.session_state[_FLASH] = actions.delete_run(url, run, time.time())


def _flash() -> None:
    outcome = st.session_state.pop(_FLASH, None)
    if outcome is not None:
        (st.success if outcome.done else st.error)(outcome.message)


def _status_filter(counts: dict[str, int]) -> list[str]:
    present = [status for status in DISPLAY_STATUSES if counts.get(status)]
    meanings = "\n".join(f"- **{status}**: {meaning(status)}" for status in present)
    chosen = st.pills(
        "Status",
        present,
        selection_mode="multi",
        format_func=lambda status: f"{cell_label(status)} ({counts[status]})",
        help=f"Show only runs with these statuses (none selected: all).\n\n{meanings}",
    )
    return list(chosen or [])


def _table(frame) -> None:
    st.dataframe(
        frame,
        hide_index=True,
        width="stretch",
        column_config={
            "Run": st.column_config.NumberColumn(format="%d", width="small"),
            "Started": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm:ss"),
            "Open": st.column_config.LinkColumn(display_text="open", help="the run's page, in a new tab"),
            **{
                column: st.column_config.NumberColumn(
                    f"{column} (GiB)",
                    format="%.2f",
                    help="largest in any step; None where not measured (allocated and reserved need CUDA's allocator)",
                )
                for column in SIZE_COLUMNS
            },
        },
    )


def _manage(url: str, runs: list, now: float) -> None:
    by_id = {run.id: run for run in runs}
    st.subheader("Open or delete a run")
    chosen = st.selectbox(
        "Run",
        list(by_id),
        format_func=lambda run_id: (
            f"run {run_id} · {by_id[run_id].name or 'unnamed'} · {display_status(by_id[run_id], now)}"
        ),
    )
    open_column, delete_column = st.columns(2)
    open_column.page_link(
        nav.RUN.path, label=f"Open run {chosen}", icon=":material/monitoring:", query_params={"run": chosen}
    )
    delete_column.button(f"Delete run {chosen}…", icon=":material/delete:", on_click=_ask_delete, args=(chosen,))
    pending = st.session_state.get(_CONFIRM)
    if pending in by_id:
        run = by_id[pending]
        st.warning(
            f"Delete run {run.id} ({display_status(run, now)})? Its step and GPU samples, post-mortem, layer "
            "profiles and allocator snapshot are deleted with it. This cannot be undone."
        )
        yes, no = st.columns(2)
        yes.button(f"Yes, delete run {run.id}", type="primary", on_click=_delete, args=(url, run.id))
        no.button("Cancel", on_click=_cancel_delete)


url = data.open_database()
st.title("Runs")
_flash()
runs = data.runs(url)
if not runs:
    st.info(FIRST_RUN.format(db=data.printable_url(url)))
    st.stop()
now = time.time()
statuses = _status_filter(status_counts(runs, now))
frame = runs_frame(runs, data.summaries(url), now, statuses)
if frame.empty:
    st.info("No run has the selected status.")
else:
    _table(frame)
_manage(url, runs, now)
