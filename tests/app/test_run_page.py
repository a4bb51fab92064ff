"""The Run page rendered headless (AppTest) over real rows, and once over a real trainer's run."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from app import nav
from db.queries import get_run, list_runs
from db.writes import update_run
from tests.app.conftest import add_finished, add_run, open_page, texts
from tests.conftest import REPO, subprocess_env, trainer_command


def chart_specs(app) -> dict[str, dict]:
    return {spec.get("title"): spec for spec in (json.loads(c.proto.spec) for c in app.get("vega_lite_chart"))}


def marks(spec: dict) -> list[dict]:
    """Every leaf layer of a (possibly nested) layered spec."""
    if "layer" in spec:
        return [leaf for layer in spec["layer"] for leaf in marks(layer)]
    return [spec]


def y_titles(spec: dict) -> set[str]:
    return {leaf["encoding"]["y"].get("title") for leaf in marks(spec) if "y" in leaf.get("encoding", {})} - {None}


def labels(app, kind: str) -> list[str]:
    return [element.label for element in getattr(app, kind)]


def test_an_empty_database_points_to_the_runs_page(engine):
    app = open_page(nav.RUN, run=1)
    assert not app.exception
    assert "No runs recorded yet" in app.info[0].value


def test_a_completed_cpu_run_shows_rss_where_the_allocator_is_unavailable(engine):
    run_id = add_finished(engine, "completed", steps=5)

    app = open_page(nav.RUN, run=run_id)

    assert not app.exception
    shown = texts(app)
    assert "Steps: 5 / 20" in shown and "Device: CPU (2 cores)" in shown and "Duration:" in shown
    assert "Tokens/s: 1,024" in shown and "ETA" not in shown
    assert "Allocator timelines unavailable: this run is on the CPU" in shown
    specs = chart_specs(app)
    assert "Caching allocator" not in specs
    assert y_titles(specs["Trainer process memory (RSS)"]) == {"MiB"}
    assert "Stop run" not in labels(app, "button")
    assert [tab.label for tab in app.tabs] == ["Memory", "Tensors", "GPU", "Training", "Layers", "Config"]
    # Only the open tab is drawn; `?tab=` opens another.
    assert "NVML unavailable: NVML Shared Library Not Found" in texts(open_page(nav.RUN, run=run_id, tab="GPU"))
    tensors = chart_specs(open_page(nav.RUN, run=run_id, tab="Tensors"))
    assert y_titles(tensors["What the training step's tensors hold"]) == {"MiB"}
    assert set(chart_specs(open_page(nav.RUN, run=run_id, tab="Training"))) == {"Loss", "Step time"}
    config = open_page(nav.RUN, run=run_id, tab="Config")
    assert "name: tiny-llama" in config.code[0].value and config.json[0].value


def test_a_running_cuda_run_is_live_with_eta_stop_nvml_and_retry_markers(engine):
    run_id = add_run(engine, steps=7, cuda=True, retries_from=4)

    app = open_page(nav.RUN, run=run_id)

    assert not app.exception
    shown = texts(app)
    assert "Steps: 7 / 20" in shown and "ETA: 6 s" in shown  # 13 steps left at 0.5 s
    assert "Stop run" in labels(app, "button")
    specs = chart_specs(app)
    allocator = specs["Caching allocator"]
    assert y_titles(allocator) == {"GiB"}
    assert any(leaf["mark"].get("type") == "rule" for leaf in marks(allocator))  # the retry at step 4
    assert "retried a cudaMalloc" in shown
    nvml = chart_specs(open_page(nav.RUN, run=run_id, tab="GPU"))
    assert set(nvml) == {"GPU memory (NVML)", "Utilisation", "Temperature", "Power"}
    assert y_titles(nvml["GPU memory (NVML)"]) == {"GiB"}


def test_an_oom_run_names_where_it_died_and_marks_it(engine):
    run_id = add_finished(engine, "oom", steps=5)

    app = open_page(nav.RUN, run=run_id)

    assert not app.exception
    assert app.error[0].value == (
        "Out of memory at step 6, micro-batch 0 in forward of `model.layers.2.mlp`: a request for 512.0 MiB "
        "failed on cpu."
    )
    shown = texts(app)
    assert "this batch was 4,096 tokens, 16.0x the median" in shown
    assert "red rule: where the run ran out of memory" in shown.lower()
    assert "In red: `model.layers.2.mlp`" in texts(open_page(nav.RUN, run=run_id, tab="Layers"))


def test_a_killed_run_says_by_what(engine):
    run_id = add_finished(
        engine, "killed", signal_name="SIGKILL", exit_code=-9, error_text="the trainer process was killed by SIGKILL"
    )
    app = open_page(nav.RUN, run=run_id)
    assert not app.exception
    assert app.error[0].value == "the trainer process was killed by SIGKILL"
    assert ":violet-badge[:material/dangerous: killed]" in texts(app)


def test_a_lost_run_is_not_live(engine):
    run_id = add_run(engine, steps=3, heartbeat_age_s=600)
    app = open_page(nav.RUN, run=run_id)
    assert not app.exception
    assert app.warning[0].value.startswith("Lost: still marked running, but its process has not reported for 10 min")
    assert "Stop run" not in labels(app, "button")


def test_a_long_run_is_downsampled(engine):
    run_id = add_finished(engine, "completed", steps=1_200)
    app = open_page(nav.RUN, run=run_id)
    assert not app.exception
    assert "Downsampled: 401 buckets of 3 steps" in texts(app)
    rss = chart_specs(app)["Trainer process memory (RSS)"]
    assert {leaf["mark"]["type"] for leaf in marks(rss)} == {"area", "line"}  # band and maximum


def test_an_unknown_run_falls_back_to_the_newest(engine):
    older, newest = add_finished(engine, "completed"), add_finished(engine, "completed")
    app = open_page(nav.RUN, run=older + 100)
    assert f"There is no run {older + 100}" in app.warning[0].value
    assert app.title[0].value == f"Run {newest}"
    assert app.query_params["run"] == str(newest)
    assert open_page(nav.RUN, run="abc").title[0].value == f"Run {newest}"


def test_stop_sends_sigterm_to_the_runs_worker(engine):
    run_id = add_run(engine, steps=2)
    # A stand-in with the worker's command line (trainer.launcher.worker_command).
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "_worker", "--run-id", str(run_id)])
    try:
        update_run(engine, run_id, pid=worker.pid, host=socket.gethostname())
        app = open_page(nav.RUN, run=run_id)
        [stop] = [button for button in app.button if button.label == "Stop run"]
        stop.click().run()
        assert worker.wait(timeout=10) == -15
        assert f"Stop requested: run {run_id}" in texts(app)
    finally:
        worker.kill()


def test_stop_never_signals_a_process_that_is_not_the_runs_worker(engine):
    run_id = add_run(engine, steps=2)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "_worker", "--run-id", "999"])
    try:
        update_run(engine, run_id, pid=other.pid, host=socket.gethostname())
        app = open_page(nav.RUN, run=run_id)
        [stop] = [button for button in app.button if button.label == "Stop run"]
        stop.click().run()
        assert f"Process {other.pid} is no longer run {run_id}'s trainer" in app.error[0].value
        assert other.poll() is None
    finally:
        other.kill()


@pytest.mark.slow
def test_a_real_out_of_memory_run(engine, db_url, tmp_path: Path):
    result = subprocess.run(
        trainer_command("run", "--config", str(REPO / "examples" / "cpu-oom.yaml"), "--db", db_url),
        capture_output=True,
        text=True,
        timeout=240,
        env=subprocess_env(),
        cwd=tmp_path,
    )
    assert result.returncode == 3, result.stderr[-3000:]
    [run] = list_runs(engine)
    assert get_run(engine, run.id).status == "oom"

    app = open_page(nav.RUN, run=run.id)

    assert not app.exception
    shown = texts(app)
    assert "Out of memory at step 1, micro-batch 0 in forward of `model.layers.0.self_attn`" in shown
    assert "At the failure: parameters" in shown
    assert "No step was recorded: the run ended before its first optimizer step did." in shown
    app = open_page(nav.RUN, run=run.id, tab="Layers")
    assert "up to the failure. In red: `model.layers.0.self_attn`" in texts(app)
    layers = chart_specs(app)["Activation memory by module"]
    assert layers["encoding"]["x"]["title"] == "activations saved for backward (MiB)"
