from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import inspect

from db import default_db_url, open_engine
from db.engine import write_transaction

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_default_url_prefers_env_url(monkeypatch, tmp_path):
    monkeypatch.setenv("OOMLENS_DB_URL", "postgresql://db.example/oomlens")
    monkeypatch.setenv("OOMLENS_WORKSPACE", str(tmp_path / "unused"))
    assert default_db_url() == "postgresql://db.example/oomlens"
    assert not (tmp_path / "unused").exists()


def test_default_url_is_an_absolute_file_in_the_workspace(monkeypatch, tmp_path):
    monkeypatch.delenv("OOMLENS_DB_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OOMLENS_WORKSPACE", "relative/ws")
    assert default_db_url() == f"sqlite:///{tmp_path.resolve() / 'relative/ws/oomlens.db'}"
    assert (tmp_path / "relative/ws").is_dir()


def test_open_engine_without_url_uses_the_workspace(monkeypatch, tmp_path):
    monkeypatch.delenv("OOMLENS_DB_URL", raising=False)
    monkeypatch.chdir(tmp_path)  # migrations are found from the package, not the cwd
    monkeypatch.setenv("OOMLENS_WORKSPACE", str(tmp_path / "ws"))
    engine = open_engine()
    engine.dispose()
    assert (tmp_path / "ws" / "oomlens.db").is_file()


def test_open_engine_creates_missing_parent_directories(tmp_path):
    engine = open_engine(f"sqlite:///{tmp_path / 'a' / 'b' / 'oomlens.db'}")
    engine.dispose()
    assert (tmp_path / "a" / "b" / "oomlens.db").is_file()


def test_sqlite_connections_use_wal_and_enforce_foreign_keys(engine):
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000


def test_in_memory_database_is_migrated():
    engine = open_engine("sqlite://")
    assert {"runs", "step_samples", "device_samples"} <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_threads_opening_a_fresh_file_together_all_succeed(db_url):
    # Alembic's migration context is process-global; open_engine must serialise its use.
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def open_once() -> None:
        start.wait()
        try:
            open_engine(db_url).dispose()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=open_once) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


_OPEN_ON_SIGNAL = """
import pathlib, sys, time
from db import open_engine
pathlib.Path(sys.argv[3]).touch()
while not pathlib.Path(sys.argv[2]).exists():
    time.sleep(0.001)
open_engine(sys.argv[1]).dispose()
"""


def test_processes_opening_a_fresh_file_together_all_succeed(db_url, tmp_path):
    # Launcher, trainer and dashboard may all be first on a new workspace: without BEGIN IMMEDIATE
    # around the migration, all but one fail with "database is locked" or "table already exists".
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    go, ready = tmp_path / "go", [tmp_path / f"ready{i}" for i in range(4)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _OPEN_ON_SIGNAL, db_url, str(go), str(r)], env=env, stderr=subprocess.PIPE
        )
        for r in ready
    ]
    deadline = time.monotonic() + 30
    while not all(r.exists() for r in ready) and time.monotonic() < deadline:
        time.sleep(0.005)
    go.touch()
    results = [(proc.communicate(timeout=60)[1].decode(), proc.returncode) for proc in procs]
    assert [stderr for stderr, returncode in results if returncode != 0] == []


def test_write_transaction_rolls_back_on_error(engine):
    from db.queries import list_runs
    from db.schema import RunRow

    with pytest.raises(RuntimeError, match="abandon"), write_transaction(engine) as conn:
        conn.execute(RunRow.__table__.insert().values(status="running", config={}, created_at=1.0))
        raise RuntimeError("abandon")
    assert list_runs(engine) == []


def test_importing_db_touches_no_database_and_no_torch(tmp_path):
    code = "import sys, db, db.writes, db.queries; print('torch' in sys.modules)"
    env = {**os.environ, "OOMLENS_WORKSPACE": str(tmp_path / "ws"), "PYTHONPATH": str(REPO_ROOT)}
    env.pop("OOMLENS_DB_URL", None)
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
    assert not (tmp_path / "ws").exists()
