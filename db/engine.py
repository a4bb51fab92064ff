"""Where the database lives and how to open it: a SQLite file in WAL mode unless a URL says otherwise.

Opening migrates to the newest schema, so every process (launcher, trainer, dashboard) can be
the first to touch a fresh workspace. Nothing here runs at import time.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, make_url
from sqlalchemy.engine import URL

from db import migrate

DB_URL_ENV = "OOMLENS_DB_URL"
WORKSPACE_ENV = "OOMLENS_WORKSPACE"
DEFAULT_WORKSPACE = "~/.oomlens"

_SQLITE_BUSY_TIMEOUT_S = 30
_SQLITE_PRAGMAS = (
    # In WAL mode this fsyncs at checkpoints only; a power cut may lose the last commits, not the file.
    "PRAGMA synchronous=NORMAL",
    # Off by default in SQLite, which would silently ignore ON DELETE CASCADE / SET NULL.
    "PRAGMA foreign_keys=ON",
    f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_S * 1000}",
)
# Alembic keeps the running migration in module globals, so one migration per process at a time.
# Taken before the database lock, never after, so two threads cannot wait on each other.
_MIGRATION_LOCK = threading.Lock()
# Execution option asking the SQLite begin hook for BEGIN IMMEDIATE.
_WRITE_OPTION = "oomlens_write"


def workspace_dir() -> Path:
    """$OOMLENS_WORKSPACE or ~/.oomlens, created; absolute, so a child process started in
    another directory finds the same files."""
    workspace = Path(os.environ.get(WORKSPACE_ENV) or DEFAULT_WORKSPACE).expanduser().resolve()
    workspace.mkdir(parents=True, exist_ok=True)
    return workspace


def default_db_url() -> str:
    """The URL every process agrees on without being told: $OOMLENS_DB_URL, else the workspace file."""
    url = os.environ.get(DB_URL_ENV)
    if url:
        return url
    return f"sqlite:///{workspace_dir() / 'oomlens.db'}"


def open_engine(url: str | None = None) -> Engine:
    """An engine on `url` (default: `default_db_url()`) whose schema is at the newest revision.

    Not cached: each call builds an engine and checks the schema (milliseconds), so callers keep
    the engine they get (the dashboard in st.cache_resource).
    """
    parsed = make_url(url or default_db_url())
    if parsed.get_backend_name() == "sqlite":
        engine = _sqlite_engine(parsed)
    else:
        engine = create_engine(parsed, pool_pre_ping=True)
    _upgrade(engine)
    return engine


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction that will write; on SQLite it takes the write lock at BEGIN.

    A deferred SQLite transaction that reads before writing can fail at once with "database is
    locked" (busy_timeout does not apply to upgrading a stale read); BEGIN IMMEDIATE waits instead.
    """
    with engine.connect() as conn:
        conn.execution_options(**{_WRITE_OPTION: True})
        with conn.begin():
            yield conn


def _sqlite_engine(url: URL) -> Engine:
    if url.database and url.database != ":memory:" and not url.query.get("uri"):
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": _SQLITE_BUSY_TIMEOUT_S})
    event.listen(engine, "connect", _on_sqlite_connect)
    event.listen(engine, "begin", _on_sqlite_begin)
    return engine


def _on_sqlite_connect(dbapi_connection, _connection_record) -> None:
    # The sqlite3 driver's own transaction handling emits no BEGIN before DDL or SELECT, so a
    # migration would not be atomic; SQLAlchemy's recipe: switch it off, BEGIN in _on_sqlite_begin.
    dbapi_connection.isolation_level = None
    _set_wal(dbapi_connection)
    for pragma in _SQLITE_PRAGMAS:
        dbapi_connection.execute(pragma)


def _set_wal(dbapi_connection) -> None:
    """WAL: readers (the dashboard) never block the writer (the trainer's sink), nor it them.

    The mode is stored in the file, so this only does work on a fresh file; there it needs an
    exclusive lock, and SQLite answers "locked" at once, without waiting for busy_timeout, while
    another connection converts the same file, hence the retry.
    """
    deadline = time.monotonic() + _SQLITE_BUSY_TIMEOUT_S
    while True:
        try:
            dbapi_connection.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _on_sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE_OPTION) else "BEGIN")


def _upgrade(engine: Engine) -> None:
    with _MIGRATION_LOCK:
        if engine.dialect.name == "sqlite":
            _upgrade_sqlite(engine)
        else:
            with engine.begin() as conn:
                migrate.upgrade(conn)


def _upgrade_sqlite(engine: Engine) -> None:
    with engine.connect() as conn:
        raw = conn.connection.driver_connection
        # A batch migration rebuilds a table by dropping it; with foreign keys on, dropping `runs`
        # would cascade-delete every sample. The pragma is ignored inside a transaction.
        raw.execute("PRAGMA foreign_keys=OFF")
        try:
            # IMMEDIATE: two processes opening a fresh file migrate one after the other.
            conn.execution_options(**{_WRITE_OPTION: True})
            with conn.begin():
                migrate.upgrade(conn)
                broken = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
                if broken:
                    raise RuntimeError(f"migration left rows with dangling foreign keys: {broken[:5]}")
        finally:
            raw.execute("PRAGMA foreign_keys=ON")
