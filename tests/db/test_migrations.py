from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from db import open_engine
from db.migrate import alembic_config
from db.queries import list_runs
from db.schema import Base
from db.writes import create_run


def _head() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def test_fresh_file_gets_every_table_at_head(engine):
    assert set(inspect(engine).get_table_names()) == {"alembic_version", "runs", "step_samples", "device_samples"}
    with engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == _head()


def test_migrated_schema_matches_the_models(engine):
    # Catches a model column added without a revision, or a revision that drifted from the models.
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []


def test_reopening_keeps_data_and_revision(db_url, engine):
    run_id = create_run(engine, {"lr": 1e-4})
    engine.dispose()
    reopened = open_engine(db_url)
    try:
        assert [run.id for run in list_runs(reopened)] == [run_id]
        with reopened.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar_one() == 1
    finally:
        reopened.dispose()


def test_downgrade_to_base_and_back(engine):
    config = alembic_config()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "base")
        assert set(inspect(conn).get_table_names()) == {"alembic_version"}
        command.upgrade(config, "head")
        assert "runs" in inspect(conn).get_table_names()
