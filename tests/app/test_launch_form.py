"""The Launch form's view model without Streamlit: setups, form values to config and back, issues by field."""

from __future__ import annotations

import shlex

import pytest

from app.views import launch_form as form
from trainer.config import ConfigIssue, load_config, validate_config


@pytest.mark.parametrize("setup", form.SETUPS, ids=lambda setup: setup.slug)
def test_every_setup_survives_the_form_unchanged(setup):
    config = setup.config()
    values = form.form_values(config)
    assert set(values) == set(form.NAMES)
    assert form.config_from_form(values, config) == config
    validate_config(config)


def test_scenario_1_is_the_cpu_oom_example():
    assert form.SETUPS_BY_SLUG["scenario-1"].config() == load_config(form.EXAMPLES / "cpu-oom.yaml").to_dict()


def test_the_form_keeps_keys_it_has_no_widget_for():
    base = {"monitor": {"layer_profile_every": 7}, "debug": {"leak_mb_per_step": 16}}
    raw = form.config_from_form(form.form_values(base), base)
    assert raw["monitor"]["layer_profile_every"] == 7 and raw["debug"]["leak_mb_per_step"] == 16


def test_form_choices_become_config_values():
    values = form.form_values({})
    values.update(
        {
            "model_kind": form.PATH,
            "model_path": "  /models/llama  ",
            "lora_on": False,
            "data_kind": form.FILE,
            "data_path": "train.jsonl",
            "data.vary_length": False,
            "memory.alloc_conf": "  ",
        }
    )
    raw = form.config_from_form(values, {})
    assert raw["model"]["name"] == "/models/llama"
    assert raw["lora"] is None
    assert raw["data"]["source"] == "train.jsonl" and raw["data"]["min_seq_len"] is None
    assert raw["memory"]["alloc_conf"] is None
    values.update({"data.vary_length": True, "data.min_seq_len": 64})
    assert form.config_from_form(values, {})["data"]["min_seq_len"] == 64


def test_each_issue_goes_under_the_most_specific_field():
    issues = [
        ConfigIssue("data.seq_len", "too long"),
        ConfigIssue("lora.target_modules", "['x'] not in tiny-llama"),
        ConfigIssue("lora.target_modules.0", "not a string"),
        ConfigIssue("model.quantization", "needs a lora section"),
        ConfigIssue("(root)", "expected a mapping"),
    ]
    grouped = form.issues_by_field(issues)
    assert grouped["data.seq_len"] == ["too long"]
    assert grouped["lora.target_modules"] == ["['x'] not in tiny-llama", "not a string"]
    # No widget for these: shown once above the Launch button, with their key.
    assert grouped[""] == ["model.quantization: needs a lora section", "(root): expected a mapping"]


def test_the_command_sets_only_what_differs_from_the_defaults_and_is_quoted():
    config = form.SETUPS_BY_SLUG["full-fine-tune"].config()
    config["memory"]["alloc_conf"] = "expandable_segments:True"
    command = form.cli_command(config, name="it's mine")
    assert command.splitlines()[0] == ".venv/bin/python -m trainer run \\"
    words = shlex.split(command.replace("\\\n", " "))
    assert words[4:] == [
        "--set", "lora=null",
        "--set", "train.device=cpu",
        "--set", "memory.alloc_conf=expandable_segments:True",
        "--name", "it's mine",
    ]  # fmt: skip


def test_target_choices_follow_the_model():
    assert form.target_choices("tiny-gpt2") == ["c_attn", "c_proj", "c_fc"]
    assert form.default_targets(["c_attn", "c_proj", "c_fc"]) == ["c_attn"]
    assert form.default_targets(form.target_choices("tiny-llama")) == ["q_proj", "v_proj"]
    # A local model: the usual names, plus whatever the user typed.
    assert form.target_choices(None, ["Wqkv"])[-1] == "Wqkv"


def test_tiny_presets_come_first():
    choices = form.model_choices()
    tiny = [name for name in choices if name.startswith("tiny-")]
    assert choices[: len(tiny)] == tiny and len(choices) > len(tiny)
