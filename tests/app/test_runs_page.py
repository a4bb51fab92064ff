"""The Runs page rendered headless (AppTest) over real rows."""

from __future__ import annotations

import pandas as pd
import pytest

from app import nav
from db.queries import get_postmortem, get_run, step_samples
from db.writes import create_run, end_run
from tests.app.conftest import add_finished, add_run, open_page


def test_an_empty_database_says_how_to_start_a_run(engine):
    app = open_page(nav.RUNS)
    assert not app.exception
    assert "No runs recorded yet" in app.info[0].value
    assert ".venv/bin/python -m trainer run --config examples/tiny-llama-lora.yaml" in app.info[0].value
    assert len(app.dataframe) == 0


def test_every_status_with_its_peaks_and_a_link_to_its_page(engine):
    completed = add_finished(engine, "completed", steps=5)
    running = add_run(engine, steps=7, cuda=True)
    oom = add_finished(engine, "oom", steps=3)
    killed = add_finished(engine, "killed", signal_name="SIGKILL", exit_code=-9)
    lost = add_run(engine, steps=2, heartbeat_age_s=600)
    failed = add_finished(engine, "failed", error_text="ValueError: boom")
    stopped = add_finished(engine, "stopped", error_text="stopped by SIGTERM")
    starting = create_run(engine, {"model": {"name": "tiny-qwen2"}, "train": {"max_steps": 3}})

    app = open_page(nav.RUNS)

    assert not app.exception
    table = app.dataframe[0].value.set_index("Run")
    statuses = table["Status"].str.split().str[-1].to_dict()
    assert statuses == {
        completed: "completed",
        running: "running",
        oom: "oom",
        killed: "killed",
        lost: "lost",
        failed: "failed",
        stopped: "stopped",
        starting: "running",
    }
    # CPU runs have no allocator: empty, never 0; the CUDA run shows its largest per-step peaks, in GiB as
    # numbers so that sorting the column sorts by size.
    assert table.loc[completed, ["Peak allocated", "Peak reserved"]].isna().all()
    assert table.loc[completed, "Peak RSS"] == pytest.approx(950 / 1024)
    assert table.loc[running, ["Peak allocated", "Peak reserved"]].tolist() == [5.0, 6.0]
    assert table.loc[starting, ["Steps", "Device"]].tolist() == ["0 / 3", "not started yet"]
    assert pd.isna(table.loc[starting, "Peak RSS"])
    assert table["Peak RSS"].dtype.kind == "f"
    assert table.loc[running, "Steps"] == "7 / 20" and table.loc[oom, "Steps"] == "3 / 20"
    assert table.loc[oom, "Open"] == f"run?run={oom}"
    assert table.loc[running, "Device"] == "NVIDIA H100 80GB HBM3 (cuda:0)"


def test_the_status_filter_keeps_the_chosen_statuses(engine):
    add_finished(engine, "completed")
    oom = add_finished(engine, "oom")
    lost = add_run(engine, steps=2, heartbeat_age_s=600)
    app = open_page(nav.RUNS)

    app.button_group[0].set_value(["oom", "lost"]).run()

    assert sorted(app.dataframe[0].value["Run"]) == sorted([oom, lost])


def test_delete_asks_first_then_removes_the_run_and_its_rows(engine):
    kept = add_finished(engine, "completed")
    doomed = add_finished(engine, "oom")
    app = open_page(nav.RUNS)
    app.selectbox[0].set_value(doomed).run()

    _button(app, f"Delete run {doomed}…").click().run()
    assert "cannot be undone" in app.warning[0].value
    assert get_run(engine, doomed) is not None  # nothing deleted before the confirmation

    _button(app, "Cancel").click().run()
    assert len(app.warning) == 0 and get_run(engine, doomed) is not None

    _button(app, f"Delete run {doomed}…").click().run()
    _button(app, f"Yes, delete run {doomed}").click().run()

    assert not app.exception
    assert app.success[0].value == f"Run {doomed} deleted."
    assert get_run(engine, doomed) is None and get_postmortem(engine, doomed) is None
    assert step_samples(engine, doomed) == []
    assert list(app.dataframe[0].value["Run"]) == [kept]


def test_a_running_run_is_not_deleted(engine):
    running = add_run(engine, steps=3)
    app = open_page(nav.RUNS)
    _button(app, f"Delete run {running}…").click().run()
    _button(app, f"Yes, delete run {running}").click().run()
    assert "still running: stop it first" in app.error[0].value
    assert get_run(engine, running) is not None


def test_a_run_ending_between_renders_shows_its_new_status(engine):
    run_id = add_run(engine, steps=3)
    assert "running" in open_page(nav.RUNS).dataframe[0].value["Status"][0]
    end_run(engine, run_id, "completed")
    assert "completed" in open_page(nav.RUNS).dataframe[0].value["Status"][0]


def _button(app, label: str):
    [button] = [button for button in app.button if button.label == label]
    return button
