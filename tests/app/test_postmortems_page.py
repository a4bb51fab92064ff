"""Post-mortems over a real out-of-memory run (examples/cpu-oom.yaml), Apply & relaunch, and Compare of the two.

The trainer runs twice per module, not per test: once to run out of memory, once more with the top
fix applied from the page. Every test here reads those two runs.
"""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from app import nav
from db import open_engine
from db.queries import RunRecord, get_postmortem, get_run, list_runs
from diagnosis.suggest import Suggestion, evidence_for_run, suggest
from diagnosis.units import human_bytes
from tests.app.conftest import open_page, texts, wait_for_end
from tests.conftest import REPO, subprocess_env, trainer_command

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class OomDatabase:
    url: str
    workspace: Path
    run_id: int


@pytest.fixture(scope="module")
def oom(tmp_path_factory: pytest.TempPathFactory) -> OomDatabase:
    folder = tmp_path_factory.mktemp("oom")
    url, workspace = f"sqlite:///{folder / 'runs.db'}", folder / "workspace"
    env = {**subprocess_env(), "OOMLENS_WORKSPACE": str(workspace)}
    result = subprocess.run(
        trainer_command("run", "--config", str(REPO / "examples" / "cpu-oom.yaml"), "--db", url),
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=folder,
    )
    assert result.returncode == 3, result.stderr[-3000:]
    return OomDatabase(url, workspace, int(result.stdout.splitlines()[0]))


@pytest.fixture
def on_oom_database(oom: OomDatabase, monkeypatch: pytest.MonkeyPatch) -> OomDatabase:
    monkeypatch.setenv("OOMLENS_DB_URL", oom.url)
    monkeypatch.setenv("OOMLENS_WORKSPACE", str(oom.workspace))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return oom


def expected_fixes(oom: OomDatabase) -> list[Suggestion]:
    """What diagnosis.suggest makes of the recorded post-mortem: the page must show exactly this, in order."""
    engine = open_engine(oom.url)
    run, postmortem = get_run(engine, oom.run_id), get_postmortem(engine, oom.run_id)
    engine.dispose()
    return suggest(evidence_for_run(dataclasses.asdict(postmortem), run.config, run.environment))


@dataclass(frozen=True)
class Relaunch:
    run: RunRecord
    fix: Suggestion
    landed_on: str  # the title of the page the click led to


@pytest.fixture(scope="module")
def relaunched(oom: OomDatabase) -> Iterator[Relaunch]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OOMLENS_DB_URL", oom.url)
        patch.setenv("OOMLENS_WORKSPACE", str(oom.workspace))
        patch.setenv("OMP_NUM_THREADS", "1")
        fix = expected_fixes(oom)[0]
        app = open_page(nav.POSTMORTEMS, run=oom.run_id)
        app.button(key=f"postmortems.apply.{oom.run_id}.0").click().run()
        assert not app.exception
        engine = open_engine(oom.url)
        [child] = [run for run in list_runs(engine) if run.parent_run_id == oom.run_id]
        ended = wait_for_end(engine, child.id)
        engine.dispose()
        yield Relaunch(ended, fix, app.title[0].value)


def test_no_oom_run_yet_says_how_to_make_one(engine):
    app = open_page(nav.POSTMORTEMS)

    assert not app.exception
    message = app.info[0].value
    assert message.startswith("No run has run out of memory yet")
    assert "Scenario 1" in message and "examples/cpu-oom.yaml" in message


def test_an_oom_run_shows_where_it_died_and_the_ranked_fixes(on_oom_database):
    oom = on_oom_database
    fixes = expected_fixes(oom)

    app = open_page(nav.POSTMORTEMS, run=oom.run_id)

    assert not app.exception
    figures = {metric.label: metric.value for metric in app.metric}
    assert figures["Step"] == "1" and figures["Phase"] == "forward"
    assert (
        "**Layer:** `model.layers.0.self_attn`, inside `model` › `model.layers.0`, on a batch of 2 × 4,096 tokens."
        in [element.value for element in app.markdown]
    )
    assert figures["Requested"] == "512.0 MiB"
    assert figures["Device free"] == "n/a"  # the CPU has no device reading, never a made-up zero
    shown = texts(app)
    assert "DefaultCPUAllocator: can't allocate memory" in shown
    assert "In red: `model.layers.0.self_attn`" in shown
    # Every fix diagnosis.suggest ranks, in its order, with its exact change and its saving.
    titles = [element.value for element in app.markdown if element.value.startswith("**") and ". " in element.value]
    assert len(titles) == len(fixes)
    for rank, (title, fix) in enumerate(zip(titles, fixes, strict=True), start=1):
        assert title.startswith(f"**{rank}. {fix.category.replace('_', ' ')}**")
        saving = human_bytes(fix.saves_bytes) if fix.saves_bytes is not None else "?"
        assert f"saves {saving}" in title
    assert [block.value for block in app.code][: len(fixes)] == [fix.change for fix in fixes]
    # Scenario 1: sdpa is the top fix, and it is enough on its own.
    assert fixes[0].category == "efficient_attention" and fixes[0].patch == {"model.attn_implementation": "sdpa"}
    assert "fits alone" in shown
    applicable = [fix for fix in fixes if fix.patch]
    assert [button.label for button in app.button].count("Apply & relaunch") == len(applicable)
    [traceback] = app.expander
    assert traceback.label == "Traceback"


def test_the_run_page_of_an_oom_run_links_to_its_post_mortem(on_oom_database):
    app = open_page(nav.RUN, run=on_oom_database.run_id)
    assert not app.exception
    assert "Post-mortem: what held the memory, and the fixes ranked" in [link.label for link in app.get("page_link")]


def test_apply_and_relaunch_runs_the_fix_as_a_child_that_completes(on_oom_database, relaunched):
    child = relaunched.run

    assert relaunched.landed_on == f"Run {child.id} · fix: {relaunched.fix.change}"  # on its Run page
    assert child.status == "completed", child.error_text
    assert child.parent_run_id == on_oom_database.run_id
    assert child.config["model"]["attn_implementation"] == "sdpa"
    parent = get_run(open_engine(on_oom_database.url), on_oom_database.run_id)
    unchanged = {**child.config, "model": {**child.config["model"], "attn_implementation": "eager"}}
    assert unchanged == parent.config
    # The post-mortem now leads to the comparison, and the re-run's page to its parent.
    links = [link.label for link in open_page(nav.POSTMORTEMS, run=on_oom_database.run_id).get("page_link")]
    assert f"Compare with its re-run, run {child.id} (completed)" in links
    links = [link.label for link in open_page(nav.RUN, run=child.id).get("page_link")]
    assert f"Compare with run {on_oom_database.run_id}" in links


def test_compare_shows_the_config_change_and_both_peaks(on_oom_database, relaunched):
    oom_id, child = on_oom_database.run_id, relaunched.run

    app = open_page(nav.COMPARE, run=child.id)

    assert not app.exception
    assert app.multiselect[0].value == [oom_id, child.id]  # the re-run and the run it fixed, before first
    assert "- `model.attn_implementation: eager → sdpa`" in [element.value for element in app.markdown]
    table = app.dataframe[0].value.set_index("")
    before, after = f"run {oom_id}", f"run {child.id} · {child.name}"
    peak = table.loc["Peak RSS"]
    # The OOM run needed at least what it held plus the 512 MiB it failed to get; sdpa needs less.
    assert peak[before].startswith("≥ ") and peak[before].endswith("held at the failure + the failed request)")
    assert peak[before].split()[2] in ("MiB", "GiB") and peak[after].split()[1] in ("MiB", "GiB")
    change = peak[f"run {child.id} vs run {oom_id}"]
    assert change.startswith("−") and change.endswith(" or more") and change.split()[1] in ("MiB", "GiB")
    assert table.loc["Failed request", before] == "512.0 MiB"
    assert table.loc["Status", after] == "completed"
    charts = {chart.proto.spec for chart in app.get("vega_lite_chart")}
    assert len(charts) == 3
