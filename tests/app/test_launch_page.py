"""The Launch page: the form checked as the CLI checks it, and a real trainer started from it."""

from __future__ import annotations

import pytest
import yaml

from app import nav
from db.engine import workspace_dir
from db.queries import list_runs
from db.writes import create_run
from tests.app.conftest import open_page, wait_for_end


def code_blocks(app) -> tuple[str, str]:
    """The live terminal command and YAML, in that order."""
    command, config = (block.value for block in app.code)
    return command, config


def test_the_default_setup_is_valid_and_shows_its_command_and_yaml(engine):
    app = open_page(nav.LAUNCH)

    assert not app.exception
    assert not app.error
    assert not app.button(key="launch.go").disabled
    command, config = code_blocks(app)
    assert command == ".venv/bin/python -m trainer run \\\n    --set train.device=cpu"
    assert yaml.safe_load(config)["lora"]["target_modules"] == ["q_proj", "v_proj"]


def test_invalid_input_is_shown_under_each_field_and_starts_nothing(engine, tmp_path):
    app = open_page(nav.LAUNCH)
    app.number_input(key="launch.data.seq_len").set_value(16_384)
    app.radio(key="launch.data_kind").set_value("file").run()
    app.text_input(key="launch.data_path").input(str(tmp_path / "train.csv")).run()

    assert not app.exception
    errors = [element.value for element in app.error]
    assert "`data.seq_len`: 16384 exceeds tiny-llama's 8192 positions" in errors
    csv = tmp_path / "train.csv"
    assert f"`data.source`: '{csv}': allowed: synthetic, or a path to a .txt or .jsonl file" in errors
    assert "Not launched: 2 problem(s) above, each under its field." in errors
    assert app.button(key="launch.go").disabled
    # The command stays live, so the user sees what they typed.
    assert "--set data.seq_len=16384" in code_blocks(app)[0]
    assert list_runs(engine) == []
    assert not (workspace_dir() / "launches").exists()


def test_a_config_the_runner_cannot_train_here_is_refused_with_its_reason(engine):
    app = open_page(nav.LAUNCH)
    app.selectbox(key="launch.train.optimizer").set_value("adamw_8bit").run()

    assert not app.exception
    warnings = [element.value for element in app.warning]
    assert any("the adamw_8bit optimizer runs on CUDA only (bitsandbytes)" in text for text in warnings)
    assert app.button(key="launch.go").disabled


def test_a_setup_from_the_url_loads_scenario_1(engine):
    app = open_page(nav.LAUNCH, setup="scenario-1")

    assert not app.exception
    assert app.selectbox(key="launch.setup").value == "scenario-1"
    assert app.selectbox(key="launch.model.attn_implementation").value == "eager"
    assert app.number_input(key="launch.memory.limit_gb").value == 0.25
    command, config = code_blocks(app)
    assert "--set model.attn_implementation=eager" in command and "--set memory.limit_gb=0.25" in command
    assert yaml.safe_load(config)["data"]["seq_len"] == 4096


def test_a_past_runs_config_can_be_edited(engine):
    config = {"model": {"name": "tiny-gpt2"}, "lora": None, "train": {"max_steps": 7, "device": "cuda:0"}}
    run_id = create_run(engine, config)

    app = open_page(nav.LAUNCH, **{"from": run_id})

    assert not app.exception
    assert f"Editing the config of run {run_id}." in [element.value for element in app.info]
    assert app.selectbox(key="launch.model.name").value == "tiny-gpt2"
    assert app.toggle(key="launch.lora_on").value is False
    assert app.number_input(key="launch.train.max_steps").value == 7
    assert app.selectbox(key="launch.train.device").value == "cuda:0"  # a typed device loads as it was
    # LoRA back on: the targets offered are GPT-2's own layers.
    app.toggle(key="launch.lora_on").set_value(True).run()
    assert app.multiselect(key="launch.lora.target_modules").value == ["c_attn"]
    assert not app.error


@pytest.mark.slow
def test_a_valid_tiny_config_starts_a_real_trainer_that_completes(engine, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    app = open_page(nav.LAUNCH)
    app.number_input(key="launch.train.max_steps").set_value(2)
    app.number_input(key="launch.data.seq_len").set_value(64)
    app.text_input(key="launch.name").input("from the form").run()

    app.button(key="launch.go").click().run()

    assert not app.exception
    [run] = list_runs(engine)
    assert app.title[0].value == f"Run {run.id} · from the form"  # the Run page, opened on the new run
    ended = wait_for_end(engine, run.id)
    assert ended.status == "completed", ended.error_text
    assert ended.config["train"]["max_steps"] == 2 and ended.config["data"]["seq_len"] == 64
    [saved] = (workspace_dir() / "launches").glob("*.yaml")
    assert yaml.safe_load(saved.read_text()) == ended.config
