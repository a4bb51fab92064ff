from __future__ import annotations

import time

import pytest
from sqlalchemy import delete, exc, select

from collector.readings import AllocatorReading, DeviceReading, HostReading, StepSample, TensorBreakdown
from db.queries import count_step_samples, device_samples, get_run, step_samples
from db.schema import RunRow, StepSampleRow
from db.writes import add_dropped, create_run, end_run, heartbeat, update_run, write_records

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
    with pytest.raises(TypeError, match="cannot store a dict; expected StepSample or DeviceReading"):
        write_records(engine, run_id, [_step(1, allocator=None), {"step": 2}])
    assert count_step_samples(engine, run_id) == 0


def test_write_records_is_one_transaction(engine):
    run_id = create_run(engine, {})
    write_records(engine, run_id, [_step(1, allocator=None)])
    with pytest.raises(exc.IntegrityError, match="UNIQUE constraint failed"):
        write_records(engine, run_id, [DEVICE, _step(2, allocator=None), _step(1, allocator=None)])
    assert [s.step for s in step_samples(engine, run_id)] == [1]
    assert device_samples(engine, run_id) == []


def test_add_dropped_accumulates(engine):
    run_id = create_run(engine, {})
    add_dropped(engine, run_id, 5)
    add_dropped(engine, run_id, 7)
    assert get_run(engine, run_id).samples_dropped == 12


def test_deleting_a_run_cascades_to_samples_and_detaches_children(engine):
    parent = create_run(engine, {})
    child = create_run(engine, {}, parent_run_id=parent)
    write_records(engine, parent, [_step(1, allocator=ALLOCATOR), DEVICE])
    with engine.begin() as conn:
        conn.execute(delete(RunRow).where(RunRow.id == parent))
        assert conn.execute(select(StepSampleRow)).all() == []
    assert device_samples(engine, parent) == []
    assert get_run(engine, child).parent_run_id is None


def test_samples_for_a_missing_run_are_refused(engine):
    with pytest.raises(exc.IntegrityError, match="FOREIGN KEY constraint failed"):
        write_records(engine, 999, [DEVICE])
