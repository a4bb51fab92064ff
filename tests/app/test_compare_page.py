"""The Compare page rendered headless over real rows: a re-run against its parent, on CUDA readings."""

from __future__ import annotations

import json

from app import nav
from db.writes import update_run
from tests.app.conftest import add_finished, open_page


def test_fewer_than_two_runs_says_how_to_get_a_second(engine):
    add_finished(engine, "completed")
    app = open_page(nav.COMPARE)
    assert not app.exception
    assert app.info[0].value.startswith("Compare needs two runs")


def test_a_rerun_against_its_parent_shows_changes_peaks_and_overlaid_timelines(engine):
    parent = add_finished(engine, "oom", steps=4, cuda=True)
    child = add_finished(engine, "completed", steps=6, cuda=True)
    config = {"model": {"name": "tiny-llama", "gradient_checkpointing": True}, "train": {"max_steps": 20}}
    update_run(engine, child, parent_run_id=parent, name="fix: checkpointing", config=config)
    add_finished(engine, "completed")  # a bystander, not selected

    app = open_page(nav.COMPARE, run=child)

    assert not app.exception
    assert app.multiselect[0].value == [parent, child]
    assert "- `model.gradient_checkpointing: false → true`" in [element.value for element in app.markdown]
    table = app.dataframe[0].value.set_index("")
    after = f"run {child} · fix: checkpointing"
    # add_run's samples peak at 2 + 3 GiB allocated and 2 + 4 GiB reserved in every step.
    assert table.loc["Peak allocated", after] == "5.0 GiB"
    assert table.loc["Peak reserved", f"run {parent}"] == "6.0 GiB"
    assert table.loc["Peak allocated", f"run {child} vs run {parent}"] == "same"
    assert table.loc["Median step time", after] == "0.500 s"
    specs = {spec["title"]: spec for spec in (json.loads(chart.proto.spec) for chart in app.get("vega_lite_chart"))}
    assert set(specs) == {"Peak allocated in each step", "Loss", "Step time"}
    memory = specs["Peak allocated in each step"]
    line, died = memory["layer"]
    assert line["encoding"]["y"]["title"] == "GiB" and line["encoding"]["color"]["field"] == "run"
    assert died["mark"]["type"] == "rule"  # the parent's out-of-memory step, in its colour

    # `?runs=` picks any set, in the order given.
    app = open_page(nav.COMPARE, runs=f"{child},{parent}")
    assert app.multiselect[0].value == [child, parent]
    assert "- `model.gradient_checkpointing: true → false`" in [element.value for element in app.markdown]
