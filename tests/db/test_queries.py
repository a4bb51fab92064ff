from __future__ import annotations

import dataclasses

import pytest
from sqlalchemy import select, update

from collector.readings import LayerReading, PostMortem
from db import open_engine
from db.engine import write_transaction
from db.queries import (
    DeviceRecord,
    LayerRecord,
    PostmortemRecord,
    RunRecord,
    StepRecord,
    get_run,
    is_lost,
    layer_profile,
    list_runs,
    profiled_steps,
    top_layers,
)
from db.schema import DeviceSampleRow, LayerProfileRow, PostmortemRow, RunRow, StepSampleRow
from db.writes import create_run, end_run, write_records

TIB = 2**40


@pytest.mark.parametrize(
    ("record", "row"),
    [
        (RunRecord, RunRow),
        (StepRecord, StepSampleRow),
        (DeviceRecord, DeviceSampleRow),
        (PostmortemRecord, PostmortemRow),
        (LayerRecord, LayerProfileRow),
    ],
)
def test_records_carry_every_column_in_table_order(record, row):
    assert [f.name for f in dataclasses.fields(record)] == list(row.__table__.columns.keys())


@pytest.mark.parametrize(
    ("record", "reading", "prefix"),
    [(PostmortemRecord, PostMortem, ["id", "run_id", "created_at"]), (LayerRecord, LayerReading, ["run_id"])],
)
def test_stored_readings_keep_every_field_in_order(record, reading, prefix):
    # A field added to a reading needs a column (and a migration) before it can be stored.
    assert [f.name for f in dataclasses.fields(record)] == prefix + [f.name for f in dataclasses.fields(reading)]


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


def _layer(step: int, module: str, activation_bytes: int) -> LayerReading:
    return LayerReading(step=step, module=module, activation_bytes=activation_bytes)


@pytest.fixture
def profiled_run(engine) -> int:
    """A run profiled at steps 10 and 20, beside a run profiled later (step 30) that must not leak in."""
    run_id = create_run(engine, {})
    step_10 = [_layer(10, "model.layers.0.mlp", 5 * TIB), _layer(10, "model.layers.1.mlp", 1)]
    # Twelve modules, two of them tied, given out of order.
    step_20 = [_layer(20, f"model.layers.{i:02}.attn", (i % 11) * TIB + 2**30) for i in range(12)]
    write_records(engine, run_id, step_10)
    write_records(engine, run_id, step_20[::-1])
    write_records(engine, create_run(engine, {}), [_layer(30, "model.lm_head", 9 * TIB)])
    return run_id


def test_profiled_steps_are_in_order(engine, profiled_run):
    assert profiled_steps(engine, profiled_run) == [10, 20]
    assert profiled_steps(engine, create_run(engine, {})) == []


def test_layer_profile_defaults_to_the_latest_step_largest_first(engine, profiled_run):
    layers = layer_profile(engine, profiled_run)
    assert {layer.step for layer in layers} == {20} and {layer.run_id for layer in layers} == {profiled_run}
    assert [layer.activation_bytes for layer in layers] == sorted(
        (layer.activation_bytes for layer in layers), reverse=True
    )
    assert [layer.module for layer in layers][:3] == [
        "model.layers.10.attn",
        "model.layers.09.attn",
        "model.layers.08.attn",
    ]
    # 00 and 11 both hold 0 * TIB + 2**30: the module name breaks the tie.
    assert [(layer.module, layer.activation_bytes) for layer in layers][-2:] == [
        ("model.layers.00.attn", 2**30),
        ("model.layers.11.attn", 2**30),
    ]


def test_layer_profile_of_a_given_step(engine, profiled_run):
    assert [(layer.module, layer.activation_bytes) for layer in layer_profile(engine, profiled_run, step=10)] == [
        ("model.layers.0.mlp", 5 * TIB),
        ("model.layers.1.mlp", 1),
    ]
    assert layer_profile(engine, profiled_run, step=15) == []
    assert layer_profile(engine, create_run(engine, {})) == []


def test_top_layers_takes_the_largest_of_the_latest_step(engine, profiled_run):
    everything = layer_profile(engine, profiled_run)
    assert top_layers(engine, profiled_run) == everything[:10]
    assert top_layers(engine, profiled_run, limit=3) == everything[:3]
    assert top_layers(engine, profiled_run, limit=50) == everything
    assert top_layers(engine, profiled_run, limit=0) == []
    with pytest.raises(ValueError, match="limit must be 0 or more; got -1"):
        top_layers(engine, profiled_run, limit=-1)
