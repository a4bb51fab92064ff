"""Launching from the dashboard, up to the point a process would start: commands, patches, refusals."""

from __future__ import annotations

import sys
from pathlib import Path

from app import launching
from db.engine import workspace_dir
from db.queries import RunRecord
from trainer.config import validate_config


def stored_run(config: dict) -> RunRecord:
    fields = dict.fromkeys(RunRecord.__dataclass_fields__)
    return RunRecord(**{**fields, "id": 7, "status": "oom", "config": config, "samples_dropped": 0})


def test_the_command_is_an_argument_list_never_a_shell_line():
    command = launching.trainer_command(Path("/w/a.yaml"), "sqlite:///x.db", name="fix: a b", parent_run_id=3)
    assert command == [
        sys.executable, "-m", "trainer", "run", "--config", "/w/a.yaml", "--db", "sqlite:///x.db",
        "--name", "fix: a b", "--parent", "3",
    ]  # fmt: skip


def test_a_patch_is_applied_as_yaml_overrides_and_validated():
    config = validate_config({"model": {"attn_implementation": "eager"}, "memory": {"limit_gb": 0.25}}).to_dict()
    patched = launching.patched_config(config, {"model.attn_implementation": "sdpa", "memory.limit_gb": None})
    assert patched.model.attn_implementation == "sdpa" and patched.memory.limit_gb is None
    assert patched.data == validate_config(config).data


def test_a_patch_that_makes_the_config_invalid_starts_nothing():
    started = launching.relaunch(stored_run({}), {"data.seq_len": 100_000}, "data.seq_len=100000", "sqlite:///x.db")
    assert started.run_id is None
    assert started.message == (
        "Run 7's config with `data.seq_len=100000` is not valid: "
        "data.seq_len: 100000 exceeds tiny-llama's 8192 positions."
    )
    assert not (workspace_dir() / "launches").exists()


def test_a_config_the_runner_cannot_train_here_starts_nothing():
    started = launching.start_run(
        validate_config({"train": {"optimizer": "adamw_8bit", "device": "cpu"}}), "sqlite:///x.db"
    )
    assert started.run_id is None
    assert started.message.startswith("The runner cannot train this config here: train.optimizer: the adamw_8bit")
    assert not (workspace_dir() / "launches").exists()


def fake_trainer(monkeypatch, code: str) -> None:
    """Stand in a short Python program for the trainer, to see what the dashboard makes of how it behaves."""
    monkeypatch.setattr(launching, "trainer_command", lambda *args, **kwargs: [sys.executable, "-c", code])


def test_a_trainer_that_refuses_the_config_shows_its_stderr(monkeypatch):
    message = "invalid run config (1 problem(s)):\\n  - train.device: 'cuda' requested but CUDA is not available"
    fake_trainer(monkeypatch, f"import sys; sys.stderr.write({message!r}); sys.exit(2)")

    started = launching.start_run(validate_config({}), "sqlite:///x.db")

    assert started.run_id is None
    assert started.message.startswith("The trainer refused the config:")
    assert "train.device: 'cuda' requested but CUDA is not available" in started.message
    # The attempt is kept: its config, and the log the message quotes.
    assert started.config_path.parent == workspace_dir() / "launches"
    assert "CUDA is not available" in started.log_path.read_text()


def test_a_trainer_silent_past_the_timeout_is_stopped_with_a_message(monkeypatch):
    fake_trainer(monkeypatch, "import time; time.sleep(60)")

    started = launching.start_run(validate_config({}), "sqlite:///x.db", timeout_s=0.5)

    assert started.run_id is None
    assert started.message.startswith("The trainer did not report a run id within 0.5 s and was stopped.")


def test_the_run_id_is_read_from_the_first_line_and_the_rest_goes_to_the_log(monkeypatch):
    fake_trainer(monkeypatch, "print(42, flush=True); print('later')")

    started = launching.start_run(validate_config({}), "sqlite:///x.db")

    assert started.run_id == 42
    assert started.config_path.read_text().startswith("# Launched from the oomlens dashboard on ")
