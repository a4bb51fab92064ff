from __future__ import annotations

import dataclasses

import pytest
from sqlalchemy import select, update

from db import open_engine
from db.engine import write_transaction
from db.queries import DeviceRecord, RunRecord, StepRecord, get_run, is_lost, list_runs
from db.schema import DeviceSampleRow, RunRow, StepSampleRow
from db.writes import create_run, end_run


@pytest.mark.parametrize(
    ("record", "row"), [(RunRecord, RunRow), (StepRecord, StepSampleRow), (DeviceRecord, DeviceSampleRow)]
)
def test_records_carry_every_column_in_table_order(record, row):
    assert [f.name for f in dataclasses.fields(record)] == list(row.__table__.columns.keys())


def test_get_run_of_a_missing_id_is_none(engine):
    assert get_run(engine, 1) is None


def test_list_runs_is_newest_first_and_filters(engine):
    first, second, third = (create_run(engine, {"i": i}) for i in range(3))
    end_run(engine, second, "completed")
    assert [run.id for run in list_runs(engine)] == [third, second, first]
    assert [run.id for run in list_runs(engine, status="running")] == [third, first]
    assert [run.id for run in list_runs(engine, limit=2)] == [third, second]
    assert list_runs(engine, status="oom") == []


def test_list_runs_rejects_an_unknown_status(engine):
    with pytest.raises(ValueError, match=r"status must be one of .*; got 'done'"):
        list_runs(engine, status="done")


def _run(status: str, created_at: float, heartbeat_at: float | None) -> RunRecord:
    return RunRecord(
        id=1,
        name=None,
        status=status,
        config={},
        environment=None,
        parent_run_id=None,
        created_at=created_at,
        started_at=None,
        ended_at=None,
        heartbeat_at=heartbeat_at,
        pid=None,
        host=None,
        device=None,
        device_name=None,
        device_total_bytes=None,
        exit_code=None,
        signal_name=None,
        error_text=None,
        samples_dropped=0,
    )


@pytest.mark.parametrize(
    ("status", "created_at", "heartbeat_at", "lost"),
    [
        ("running", 0.0, 950.0, False),  # heartbeat 50 s ago
        ("running", 0.0, 900.0, True),  # heartbeat 100 s ago
        ("running", 950.0, None, False),  # never beat, but only just created
        ("running", 900.0, None, True),  # never beat, created long ago
        ("running", 0.0, 940.0, False),  # exactly at the limit is not yet lost
        ("completed", 0.0, 0.0, False),  # ended runs are never lost
        ("oom", 0.0, None, False),
    ],
)
def test_is_lost(status, created_at, heartbeat_at, lost):
    assert is_lost(_run(status, created_at, heartbeat_at), now=1000.0, stale_after_s=60.0) is lost


def test_is_lost_default_is_a_minute():
    assert not is_lost(_run("running", 0.0, 941.0), now=1000.0)
    assert is_lost(_run("running", 0.0, 939.0), now=1000.0)


def test_reader_sees_committed_rows_while_a_writer_holds_a_transaction(db_url, engine):
    committed = create_run(engine, {})
    reader = open_engine(db_url)  # the dashboard's engine, as in its own process
    try:
        with write_transaction(engine) as conn:
            conn.execute(update(RunRow).where(RunRow.id == committed).values(name="uncommitted"))
            conn.execute(RunRow.__table__.insert().values(status="running", config={}, created_at=2e9))
            # The reader neither waits for the writer's lock nor sees its uncommitted rows.
            assert [(run.id, run.name) for run in list_runs(reader)] == [(committed, None)]
        assert [run.name for run in list_runs(reader)] == [None, "uncommitted"]
    finally:
        reader.dispose()


def test_writer_commits_while_a_reader_holds_a_transaction(db_url, engine):
    # Specific to WAL: with a rollback journal the commit would wait for the reader to finish.
    first = create_run(engine, {})
    reader = open_engine(db_url)
    try:
        with reader.connect() as conn:
            conn.exec_driver_sql("PRAGMA busy_timeout=100")  # fail fast instead of waiting 30 s
            name_of_first = select(RunRow.name).where(RunRow.id == first)
            assert conn.execute(name_of_first).scalar_one() is None  # in the read transaction now
            with write_transaction(engine) as writer:
                writer.exec_driver_sql("PRAGMA busy_timeout=100")
                writer.execute(update(RunRow).where(RunRow.id == first).values(name="renamed"))
            assert conn.execute(name_of_first).scalar_one() is None  # a snapshot: reads are repeatable
        assert get_run(reader, first).name == "renamed"
    finally:
        reader.dispose()
