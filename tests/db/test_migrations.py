from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text

from collector.readings import LayerReading
from db import open_engine
from db.migrate import alembic_config
from db.queries import device_samples, get_run, layer_profile, list_runs, step_samples
from db.schema import Base
from db.writes import create_run, write_records

TIB = 2**40


def _head() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def test_fresh_file_gets_every_table_at_head(engine):
    assert set(inspect(engine).get_table_names()) == {
        "alembic_version",
        "runs",
        "step_samples",
        "device_samples",
        "postmortems",
        "layer_profiles",
        "step_rollups",
        "device_rollups",
    }
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


# Raw SQL in the 0001 schema, not db.writes: the writes follow the models, which move on.
_ROWS_AT_0001 = (
    "INSERT INTO runs (id, name, status, config, created_at, device_total_bytes, samples_dropped)"
    " VALUES (7, 'before 0002', 'completed', '{\"lr\": 0.0001}', 1700000000.5, :big, 2)",
    "INSERT INTO step_samples (run_id, step, wall_time, tokens, seq_len, step_seconds, allocated_bytes,"
    " parameter_bytes, trainable_parameter_bytes, gradient_bytes, optimizer_state_bytes)"
    " VALUES (7, 1, 1700000001.25, 4096, 2048, 0.75, :big, :big, :big, :big, :big)",
    "INSERT INTO device_samples (run_id, taken_at, gpu_index, memory_used_bytes) VALUES (7, 1700000001.5, 0, :big)",
)


def test_upgrading_a_0001_database_keeps_its_data(db_url):
    old = create_engine(db_url)  # not open_engine, which would go straight to head
    config = alembic_config()
    with old.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0001")
        for statement in _ROWS_AT_0001:
            conn.execute(text(statement), {"big": 3 * TIB + 1})
    old.dispose()

    engine = open_engine(db_url)
    try:
        with engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() == _head() != "0001"
        run = get_run(engine, 7)
        assert (run.name, run.status, run.config, run.device_total_bytes) == (
            "before 0002",
            "completed",
            {"lr": 1e-4},
            3 * TIB + 1,
        )
        [step] = step_samples(engine, 7)
        assert (step.step, step.wall_time, step.allocated_bytes, step.optimizer_state_bytes) == (
            1,
            1700000001.25,
            3 * TIB + 1,
            3 * TIB + 1,
        )
        assert [device.memory_used_bytes for device in device_samples(engine, 7)] == [3 * TIB + 1]
        write_records(engine, 7, [LayerReading(step=1, module="model", activation_bytes=TIB)])
        assert [layer.module for layer in layer_profile(engine, 7)] == ["model"]
    finally:
        engine.dispose()
