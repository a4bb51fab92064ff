from __future__ import annotations

import dataclasses
import threading
import time

import pytest
from sqlalchemy import delete, exc, func, select

from collector.readings import (
    AllocatorReading,
    DeviceReading,
    HostReading,
    LayerReading,
    PostMortem,
    StepSample,
    TensorBreakdown,
)
from db import open_engine
from db.engine import write_transaction
from db.queries import (
    count_step_samples,
    device_samples,
    get_postmortem,
    get_run,
    layer_profile,
    list_postmortems,
    step_samples,
)
from db.schema import LayerProfileRow, PostmortemRow, RunRow, StepSampleRow
from db.writes import (
    add_dropped,
    create_run,
    end_run,
    heartbeat,
    record_postmortem,
    update_run,
    write_records,
)

TIB = 2**40


def _step(step: int, *, allocator: AllocatorReading | None) -> StepSample:
    return StepSample(
        step=step,
        wall_time=1_700_000_000.25 + step,
        loss=2.5 - step / 10,
        tokens=4096,
        seq_len=2048,
        step_seconds=0.75,
        tokens_per_s=5461.33,
        allocator=allocator,
        tensors=TensorBreakdown(
            parameter_bytes=3 * TIB + 1,
            trainable_parameter_bytes=2**33 + 7,
            gradient_bytes=2**33 + 7,
            optimizer_state_bytes=2**34 + 14,
            activation_bytes=None if allocator is None else 5 * TIB,
        ),
        host=HostReading(taken_at=1_700_000_000.5, rss_bytes=2**35 + 3, peak_rss_bytes=2**36, cpu_percent=97.5),
    )


ALLOCATOR = AllocatorReading(
    taken_at=1_700_000_000.0,
    allocated_bytes=TIB + 1,
    reserved_bytes=TIB + 2**30,
    active_bytes=TIB + 3,
    inactive_split_bytes=2**31 + 5,
    peak_allocated_bytes=2 * TIB,
    peak_reserved_bytes=2 * TIB + 2**30,
    num_alloc_retries=3,
    num_ooms=1,
)

DEVICE = DeviceReading(
    taken_at=1_700_000_001.125,
    gpu_index=1,
    memory_used_bytes=TIB + 11,
    memory_total_bytes=2 * TIB,
    gpu_util_percent=99.0,
    memory_util_percent=45.5,
    temperature_c=71.0,
    power_w=612.25,
    process_used_bytes=TIB,
)

LAYER = LayerReading(
    step=7,
    module="model.layers.0.mlp",
    activation_bytes=TIB + 9,
    forward_alloc_delta_bytes=-(2**33),  # a forward can free more than it keeps
    forward_peak_bytes=2 * TIB + 1,
    backward_peak_bytes=3 * TIB + 2,
)

FULL_POSTMORTEM = PostMortem(
    step=412,
    micro_batch=3,
    phase="backward",
    module="model.layers.17.mlp.down_proj",
    module_stack=("model", "model.layers.17", "model.layers.17.mlp", "model.layers.17.mlp.down_proj"),
    batch_shape={"input_ids": [8, 4096], "attention_mask": [8, 4096]},
    requested_bytes=3 * TIB + 17,
    error_type="torch.OutOfMemoryError",
    error_text="CUDA out of memory. Tried to allocate 3.00 TiB. «Größe» 显存不足 🔥",
    traceback='Traceback (most recent call last):\n  File "träin.py", line 9\ntorch.OutOfMemoryError: 显存不足',
    device="cuda:0",
    device_total_bytes=4 * TIB,
    device_free_bytes=TIB + 5,
    allocator_stats={
        "allocated_bytes.all.current": 3 * TIB + 1,
        "num_alloc_retries": 4,
        "segments": [{"total_size": 2**41, "blocks": [{"state": "active_allocated", "size": 2**40 + 3}]}],
    },
    tensors={"parameter_bytes": 3 * TIB + 1, "activation_bytes": None},
    host={"rss_bytes": 2**35 + 3, "cpu_percent": 97.5},
    nvml={"gpus": [{"index": 0, "memory_used_bytes": 4 * TIB - 1, "processes": {"4242": 2**42}}]},
    recent_steps=(
        {"step": 410, "peak_allocated_bytes": 2 * TIB, "loss": 2.25},
        {"step": 411, "peak_allocated_bytes": 2 * TIB + 2**30, "loss": None},
    ),
    layer_profile=({"module": "model.layers.17.mlp", "activation_bytes": 2**41 + 1, "forward_peak_bytes": None},),
    snapshot_path="/home/jürgen/.oomlens/snapshots/run-7.pickle",
    snapshot_bytes=5 * TIB,
    snapshot_note="trimmed to the last 100000 events",
    finding="activations",
    finding_details={"share": 0.625, "top": ["model.layers.17.mlp"], "nested": {"deeper": {"bytes": 2**42 + 7}}},
)

MINIMAL_POSTMORTEM = PostMortem(
    step=None,
    micro_batch=None,
    phase=None,
    module=None,
    module_stack=(),
    batch_shape=None,
    requested_bytes=None,
    error_type="RuntimeError",
    error_text="DefaultCPUAllocator: not enough memory",
    traceback="",
    device="cpu",
    device_total_bytes=None,
    device_free_bytes=None,
    allocator_stats=None,
    tensors=None,
    host=None,
    nvml=None,
    recent_steps=(),
    layer_profile=(),
    snapshot_path=None,
    snapshot_bytes=None,
    snapshot_note=None,
    finding="unknown",
    finding_details={},
)


def _as_postmortem(record) -> PostMortem:
    return PostMortem(**{f.name: getattr(record, f.name) for f in dataclasses.fields(PostMortem)})


def _as_layer(record) -> LayerReading:
    return LayerReading(**{f.name: getattr(record, f.name) for f in dataclasses.fields(LayerReading)})


def test_create_run_starts_running_with_config(engine):
    before = time.time()
    run_id = create_run(engine, {"model": {"name": "tiny-llama"}, "lr": 2e-4}, name="first")
    run = get_run(engine, run_id)
    assert run.status == "running"
    assert run.name == "first"
    assert run.config == {"model": {"name": "tiny-llama"}, "lr": 2e-4}
    assert before <= run.created_at <= time.time()
    assert run.samples_dropped == 0
    assert run.ended_at is None and run.parent_run_id is None


def test_create_run_rejects_an_unknown_status(engine):
    with pytest.raises(ValueError, match="status must be one of running, completed"):
        create_run(engine, {}, status="exploded")


def test_update_run_sets_known_columns(engine):
    run_id = create_run(engine, {})
    update_run(
        engine,
        run_id,
        pid=4242,
        host="node-7",
        device="cuda:0",
        device_total_bytes=80 * 2**30 + TIB,
        environment={"torch": "2.5.1", "nvml": False},
        started_at=12.5,
    )
    run = get_run(engine, run_id)
    assert (run.pid, run.host, run.device, run.started_at) == (4242, "node-7", "cuda:0", 12.5)
    assert run.device_total_bytes == 80 * 2**30 + TIB
    assert run.environment == {"torch": "2.5.1", "nvml": False}


def test_update_run_rejects_unknown_fields_before_writing(engine):
    run_id = create_run(engine, {})
    with pytest.raises(ValueError, match=r"unknown runs column\(s\) \['colour'\]"):
        update_run(engine, run_id, pid=1, colour="blue")
    with pytest.raises(ValueError, match="unknown runs column"):
        update_run(engine, run_id, id=99)
    assert get_run(engine, run_id).pid is None


def test_heartbeat_records_the_given_time(engine):
    run_id = create_run(engine, {})
    heartbeat(engine, run_id, at=123.5)
    assert get_run(engine, run_id).heartbeat_at == 123.5


def test_end_run_records_how_it_ended(engine):
    run_id = create_run(engine, {})
    assert end_run(engine, run_id, "oom", error_text="CUDA out of memory. Tried to allocate 2.00 GiB", exit_code=1)
    run = get_run(engine, run_id)
    assert (run.status, run.exit_code, run.signal_name) == ("oom", 1, None)
    assert run.error_text.startswith("CUDA out of memory")
    assert run.ended_at is not None


def test_end_run_only_if_running_keeps_the_workers_own_end(engine):
    run_id = create_run(engine, {})
    assert end_run(engine, run_id, "oom", error_text="worker's traceback")
    assert not end_run(engine, run_id, "killed", signal_name="SIGKILL", only_if_running=True)
    run = get_run(engine, run_id)
    assert (run.status, run.signal_name, run.error_text) == ("oom", None, "worker's traceback")


def test_end_run_only_if_running_marks_a_silent_worker_killed(engine):
    run_id = create_run(engine, {})
    assert end_run(engine, run_id, "killed", signal_name="SIGKILL", exit_code=-9, only_if_running=True)
    run = get_run(engine, run_id)
    assert (run.status, run.signal_name, run.exit_code) == ("killed", "SIGKILL", -9)


def test_end_run_on_a_missing_run_changes_nothing(engine):
    assert not end_run(engine, 12345, "completed")


def test_write_records_round_trips_exact_values(engine):
    run_id = create_run(engine, {})
    write_records(engine, run_id, [_step(1, allocator=None), DEVICE, _step(2, allocator=ALLOCATOR)])

    first, second = step_samples(engine, run_id)
    assert (first.step, first.wall_time, first.loss, first.tokens, first.seq_len) == (
        1,
        1_700_000_001.25,
        2.4,
        4096,
        2048,
    )
    assert (first.step_seconds, first.tokens_per_s) == (0.75, 5461.33)
    assert first.allocated_bytes is None and first.num_ooms is None and first.peak_reserved_bytes is None
    assert first.activation_bytes is None
    assert (first.parameter_bytes, first.optimizer_state_bytes) == (3 * TIB + 1, 2**34 + 14)
    assert (first.rss_bytes, first.peak_rss_bytes, first.cpu_percent) == (2**35 + 3, 2**36, 97.5)

    assert second.allocated_bytes == TIB + 1
    assert second.reserved_bytes == TIB + 2**30
    assert second.active_bytes == TIB + 3
    assert second.inactive_split_bytes == 2**31 + 5
    assert (second.peak_allocated_bytes, second.peak_reserved_bytes) == (2 * TIB, 2 * TIB + 2**30)
    assert (second.num_alloc_retries, second.num_ooms, second.activation_bytes) == (3, 1, 5 * TIB)

    [device] = device_samples(engine, run_id)
    assert (device.run_id, device.taken_at, device.gpu_index) == (run_id, 1_700_000_001.125, 1)
    assert (device.memory_used_bytes, device.memory_total_bytes, device.process_used_bytes) == (TIB + 11, 2 * TIB, TIB)
    assert (device.gpu_util_percent, device.memory_util_percent, device.temperature_c, device.power_w) == (
        99.0,
        45.5,
        71.0,
        612.25,
    )
    assert count_step_samples(engine, run_id) == 2


def test_write_records_refreshes_the_heartbeat(engine):
    run_id = create_run(engine, {})
    before = time.time()
    write_records(engine, run_id, [DEVICE])
    assert get_run(engine, run_id).heartbeat_at >= before


def test_write_records_rejects_unknown_records_and_writes_nothing(engine):
    run_id = create_run(engine, {})
    with pytest.raises(TypeError, match="cannot store a dict; expected StepSample, DeviceReading or LayerReading"):
        write_records(engine, run_id, [_step(1, allocator=None), {"step": 2}])
    assert count_step_samples(engine, run_id) == 0


def test_write_records_is_one_transaction(engine):
    run_id = create_run(engine, {})
    write_records(engine, run_id, [_step(1, allocator=None)])
    with pytest.raises(exc.IntegrityError, match="UNIQUE constraint failed"):
        write_records(engine, run_id, [DEVICE, LAYER, _step(2, allocator=None), _step(1, allocator=None)])
    assert [s.step for s in step_samples(engine, run_id)] == [1]
    assert device_samples(engine, run_id) == []
    assert layer_profile(engine, run_id) == []


def test_a_layer_profiled_twice_fails_the_whole_batch(engine):
    run_id = create_run(engine, {})
    with pytest.raises(exc.IntegrityError, match="UNIQUE constraint failed: layer_profiles"):
        write_records(engine, run_id, [_step(7, allocator=None), LAYER, LAYER])
    assert step_samples(engine, run_id) == []


def test_write_records_round_trips_layer_readings(engine):
    run_id = create_run(engine, {})
    cpu_layer = LayerReading(step=7, module="model.embed_tokens", activation_bytes=0)
    write_records(engine, run_id, [_step(7, allocator=None), LAYER, cpu_layer])
    stored = layer_profile(engine, run_id, step=7)
    assert [(r.run_id, _as_layer(r)) for r in stored] == [(run_id, LAYER), (run_id, cpu_layer)]


def test_add_dropped_accumulates(engine):
    run_id = create_run(engine, {})
    add_dropped(engine, run_id, 5)
    add_dropped(engine, run_id, 7)
    assert get_run(engine, run_id).samples_dropped == 12


def test_deleting_a_run_cascades_to_samples_and_detaches_children(engine):
    parent = create_run(engine, {})
    child = create_run(engine, {}, parent_run_id=parent)
    write_records(engine, parent, [_step(1, allocator=ALLOCATOR), DEVICE, LAYER])
    record_postmortem(engine, parent, FULL_POSTMORTEM)
    with engine.begin() as conn:
        conn.execute(delete(RunRow).where(RunRow.id == parent))
        assert conn.execute(select(StepSampleRow)).all() == []
        assert conn.execute(select(LayerProfileRow)).all() == []
        assert conn.execute(select(PostmortemRow)).all() == []
    assert device_samples(engine, parent) == []
    assert get_run(engine, child).parent_run_id is None


def test_samples_for_a_missing_run_are_refused(engine):
    with pytest.raises(exc.IntegrityError, match="FOREIGN KEY constraint failed"):
        write_records(engine, 999, [DEVICE])


def test_record_postmortem_round_trips_every_field_and_ends_the_run(engine):
    run_id = create_run(engine, {})
    before = time.time()
    record_postmortem(engine, run_id, FULL_POSTMORTEM)
    stored = get_postmortem(engine, run_id)
    assert _as_postmortem(stored) == FULL_POSTMORTEM
    assert stored.run_id == run_id and before <= stored.created_at <= time.time()
    assert isinstance(stored.module_stack, tuple) and isinstance(stored.recent_steps, tuple)
    run = get_run(engine, run_id)
    assert (run.status, run.exit_code, run.ended_at) == ("oom", 3, stored.created_at)
    assert run.error_text == FULL_POSTMORTEM.traceback


def test_record_postmortem_with_every_optional_field_none(engine):
    run_id = create_run(engine, {})
    record_postmortem(engine, run_id, MINIMAL_POSTMORTEM, exit_code=1)
    assert _as_postmortem(get_postmortem(engine, run_id)) == MINIMAL_POSTMORTEM
    run = get_run(engine, run_id)
    # No traceback: the run keeps the error message instead.
    assert (run.status, run.exit_code, run.error_text) == ("oom", 1, "DefaultCPUAllocator: not enough memory")
    with engine.connect() as conn:
        absent = conn.exec_driver_sql(
            "SELECT batch_shape IS NULL, allocator_stats IS NULL, tensors IS NULL, host IS NULL, nvml IS NULL"
            " FROM postmortems"
        ).one()
    assert all(absent)  # SQL NULL, not the JSON text 'null'


def _reset_run(engine, run_id: int) -> None:
    update_run(engine, run_id, status="running", ended_at=None, exit_code=None, error_text=None)


def test_a_second_postmortem_is_refused_and_leaves_the_run_alone(engine):
    run_id = create_run(engine, {})
    record_postmortem(engine, run_id, FULL_POSTMORTEM)
    _reset_run(engine, run_id)  # so a run update by the failing call would show
    with pytest.raises(exc.IntegrityError, match="UNIQUE constraint failed: postmortems.run_id"):
        record_postmortem(engine, run_id, MINIMAL_POSTMORTEM, exit_code=1)
    run = get_run(engine, run_id)
    assert (run.status, run.ended_at, run.exit_code, run.error_text) == ("running", None, None, None)
    assert _as_postmortem(get_postmortem(engine, run_id)) == FULL_POSTMORTEM


def test_a_failed_run_update_takes_the_postmortem_with_it(engine):
    run_id = create_run(engine, {})
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TRIGGER refuse_end BEFORE UPDATE OF status ON runs BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
    with pytest.raises(exc.IntegrityError, match="refused"):
        record_postmortem(engine, run_id, FULL_POSTMORTEM)
    assert get_postmortem(engine, run_id) is None
    assert get_run(engine, run_id).status == "running"


def test_a_postmortem_for_a_missing_run_is_refused(engine):
    with pytest.raises(exc.IntegrityError, match="FOREIGN KEY constraint failed"):
        record_postmortem(engine, 999, MINIMAL_POSTMORTEM)
    assert list_postmortems(engine) == []


def test_readers_see_the_postmortem_and_the_oom_status_together(db_url, engine):
    run_id = create_run(engine, {})
    reader = open_engine(db_url)  # the dashboard's, with the file open in its own connection
    try:
        with reader.connect() as conn:
            conn.exec_driver_sql("PRAGMA busy_timeout=100")
            status = select(RunRow.status).where(RunRow.id == run_id)
            count = select(func.count()).select_from(PostmortemRow)
            assert conn.execute(status).scalar_one() == "running"  # holding a read transaction now
            record_postmortem(engine, run_id, MINIMAL_POSTMORTEM)  # WAL: does not wait for the reader
            assert (conn.execute(status).scalar_one(), conn.execute(count).scalar_one()) == ("running", 0)
        assert get_run(reader, run_id).status == "oom"
        assert get_postmortem(reader, run_id) is not None
    finally:
        reader.dispose()


def test_record_postmortem_waits_for_the_write_lock(db_url, engine):
    run_id = create_run(engine, {})
    other = open_engine(db_url)  # another process's sink, mid-batch
    errors: list[BaseException] = []

    def record() -> None:
        try:
            record_postmortem(engine, run_id, MINIMAL_POSTMORTEM)
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    recorder = threading.Thread(target=record)
    try:
        with write_transaction(other) as conn:
            conn.execute(RunRow.__table__.insert().values(status="running", config={}, created_at=1.0))
            recorder.start()
            recorder.join(timeout=0.3)
            assert recorder.is_alive()  # waiting on busy_timeout, not failed with "database is locked"
        recorder.join(timeout=10)
    finally:
        other.dispose()
    assert errors == []
    assert get_run(engine, run_id).status == "oom"


def test_list_postmortems_is_newest_first(engine):
    runs = [create_run(engine, {}) for _ in range(3)]
    for run_id in runs:
        record_postmortem(engine, run_id, MINIMAL_POSTMORTEM)
    assert [p.run_id for p in list_postmortems(engine)] == runs[::-1]
    assert [p.run_id for p in list_postmortems(engine, limit=2)] == runs[:0:-1]
    assert get_postmortem(engine, create_run(engine, {})) is None
