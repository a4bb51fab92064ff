"""Shared fixtures: every test gets its own workspace and SQLite file, never the user's ~/.oomlens."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OOMLENS_WORKSPACE", str(tmp_path / "workspace"))
    monkeypatch.delenv("OOMLENS_DB_URL", raising=False)


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'runs.db'}"


def trainer_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "trainer", *args]


def postmortem_json(db_url: str, run: str | int = "latest") -> dict:
    """`python -m trainer postmortem RUN --json` as a user runs it, parsed."""
    import json
    import subprocess

    shown = subprocess.run(
        trainer_command("postmortem", str(run), "--db", db_url, "--json"),
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_env(),
        check=True,
    )
    return json.loads(shown.stdout)


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    # Two cores: keep one for the test runner and the writer thread.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env
