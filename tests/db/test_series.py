"""Downsampled series, events and summaries: the rollups kept by triggers must agree with the samples."""

from __future__ import annotations

import random

import pytest
from sqlalchemy import func, select

from collector.readings import AllocatorReading, DeviceReading, HostReading, StepSample, TensorBreakdown
from db import queries
from db.queries import device_series, recent_steps, run_summaries, step_events, step_series
from db.schema import step_rollups
from db.writes import create_run, write_records

GIB = 2**30


@pytest.fixture(params=["rollups", "samples"])
def path(request, monkeypatch) -> str:
    """Every query runs twice: from SQLite's rollups, and from the samples as other backends do."""
    if request.param == "samples":
        monkeypatch.setattr(queries, "_rollups_kept", lambda conn: False)
    return request.param


def sample(step: int, allocated: int | None, retries: int = 0, ooms: int = 0) -> StepSample:
    allocator = None
    if allocated is not None:
        allocator = AllocatorReading(
            taken_at=float(step),
            allocated_bytes=allocated,
            reserved_bytes=allocated + GIB // 2 + step,
            active_bytes=allocated,
            inactive_split_bytes=step,
            peak_allocated_bytes=allocated + GIB,
            peak_reserved_bytes=allocated + 2 * GIB,
            num_alloc_retries=retries,
            num_ooms=ooms,
        )
    return StepSample(
        step=step,
        wall_time=1_700_000_000.0 + step,
        loss=1.0 / step,
        tokens=512,
        seq_len=256,
        step_seconds=0.25,
        tokens_per_s=2048.0,
        allocator=allocator,
        tensors=TensorBreakdown(
            parameter_bytes=GIB,
            trainable_parameter_bytes=1,
            gradient_bytes=1,
            optimizer_state_bytes=2,
            activation_bytes=step,
        ),
        host=HostReading(taken_at=float(step), rss_bytes=GIB + step, peak_rss_bytes=2 * GIB, cpu_percent=None),
    )


def write_steps(engine, run_id: int, samples: list[StepSample], batch: int = 97) -> None:
    # Several batches, as the sink writes them, so triggers merge into rollup rows already there.
    for start in range(0, len(samples), batch):
        write_records(engine, run_id, samples[start : start + batch])


def spiky(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [GIB + rng.randrange(0, 64 * 2**20) + (5 * GIB if rng.random() < 0.01 else 0) for _ in range(n)]


@pytest.mark.parametrize(("steps", "max_points"), [(2_000, 10), (2_000, 150), (300, 7)])
def test_each_bucket_keeps_the_min_and_max_of_its_steps(engine, path, steps, max_points):
    run_id = create_run(engine, {})
    allocated = spiky(steps)
    write_steps(engine, run_id, [sample(s, allocated[s - 1]) for s in range(1, steps + 1)])

    series = step_series(
        engine, run_id, ["allocated_bytes", "reserved_unallocated_bytes", "loss"], max_points=max_points
    )

    assert len(series) <= max_points + 1
    assert series.first_step[0] == 1 and series.last_step[-1] == steps and sum(series.steps) == steps
    if path == "rollups" and series.bucket_steps >= 64:
        assert series.bucket_steps % 64 == 0
    for i in range(len(series)):
        lo, hi = series.first_step[i], series.last_step[i]
        assert hi - lo + 1 == series.steps[i] <= series.bucket_steps
        assert lo // series.bucket_steps == hi // series.bucket_steps  # one bucket, aligned on the width
        inside = allocated[lo - 1 : hi]
        assert series.minimum["allocated_bytes"][i] == min(inside)
        assert series.maximum["allocated_bytes"][i] == max(inside)
        # reserved - allocated = GIB // 2 + step in these samples.
        assert series.minimum["reserved_unallocated_bytes"][i] == GIB // 2 + lo
        assert series.maximum["reserved_unallocated_bytes"][i] == GIB // 2 + hi
        assert series.minimum["loss"][i] == pytest.approx(1.0 / hi)
        assert series.maximum["loss"][i] == pytest.approx(1.0 / lo)
    # The spikes survive: the largest bucket maximum is the largest sample.
    assert max(series.maximum["allocated_bytes"]) == max(allocated)


def test_a_short_run_is_every_step(engine, path):
    run_id = create_run(engine, {})
    write_steps(engine, run_id, [sample(s, s * GIB) for s in range(1, 6)])
    series = step_series(engine, run_id, ["allocated_bytes"])
    assert series.bucket_steps == 1 and series.first_step == series.last_step == (1, 2, 3, 4, 5)
    assert series.minimum == series.maximum == {"allocated_bytes": tuple(s * GIB for s in range(1, 6))}


def test_missing_readings_stay_none_and_a_later_reading_still_counts(engine, path):
    run_id = create_run(engine, {})
    # No allocator stats for the first 300 steps, then stats: rollup row 256..319 holds both.
    write_steps(engine, run_id, [sample(s, None if s <= 300 else 7 * GIB) for s in range(1, 1_001)])
    series = step_series(engine, run_id, ["allocated_bytes", "rss_bytes"], max_points=10)
    for i in range(len(series)):
        expected = 7 * GIB if series.last_step[i] > 300 else None
        assert series.minimum["allocated_bytes"][i] == expected == series.maximum["allocated_bytes"][i]
    assert series.maximum["allocated_bytes"][0] is None
    assert None not in series.maximum["rss_bytes"]


def test_an_unknown_run_or_column(engine, path):
    assert len(step_series(engine, 42, ["loss"])) == 0
    assert (
        step_events(engine, 42) == []
        and run_summaries(engine) == {}
        and len(device_series(engine, 42, ["power_w"])) == 0
    )
    with pytest.raises(ValueError, match=r"unknown series column\(s\) \['bogus'\]"):
        step_series(engine, 42, ["loss", "bogus"])
    with pytest.raises(ValueError, match="max_points must be 1 or more"):
        step_series(engine, 42, ["loss"], max_points=0)
    with pytest.raises(TypeError, match="not one string"):
        step_series(engine, 42, "loss")


def test_events_are_the_exact_steps_where_a_counter_rose(engine, path):
    run_id = create_run(engine, {})
    retries = {s: 0 for s in range(1, 3_001)}
    for rise_at, total in ((70, 1), (71, 3), (1_500, 4)):
        for s in range(rise_at, 3_001):
            retries[s] = total
    write_steps(engine, run_id, [sample(s, GIB, retries[s], ooms=1 if s >= 2_999 else 0) for s in range(1, 3_001)])

    events = step_events(engine, run_id)

    assert [(e.kind, e.record.step, e.count) for e in events] == [
        ("alloc_retry", 70, 1),
        ("alloc_retry", 71, 2),
        ("alloc_retry", 1_500, 1),
        ("oom", 2_999, 1),
    ]
    assert events[0].record.allocated_bytes == GIB and events[0].record.num_alloc_retries == 1
    assert [e.record.step for e in step_events(engine, run_id, limit=2)] == [70, 71]


def test_retries_counted_before_the_first_step_mark_it(engine, path):
    run_id = create_run(engine, {})
    write_steps(engine, run_id, [sample(s, GIB, retries=2) for s in range(1, 4)])
    assert [(e.record.step, e.count) for e in step_events(engine, run_id)] == [(1, 2)]


def test_summaries_peaks_and_none_on_the_cpu(engine, path):
    cuda, cpu, empty = create_run(engine, {}), create_run(engine, {}), create_run(engine, {})
    allocated = spiky(700, seed=3)
    write_steps(engine, cuda, [sample(s, allocated[s - 1]) for s in range(1, 701)])
    write_steps(engine, cpu, [sample(s, None) for s in range(1, 11)])

    summaries = run_summaries(engine)

    assert set(summaries) == {cuda, cpu}
    assert (summaries[cuda].steps, summaries[cuda].last_step) == (700, 700)
    assert summaries[cuda].peak_allocated_bytes == max(allocated) + GIB
    assert summaries[cuda].peak_reserved_bytes == max(allocated) + 2 * GIB
    assert summaries[cpu].peak_allocated_bytes is None and summaries[cpu].peak_reserved_bytes is None
    assert summaries[cpu].peak_rss_bytes == 2 * GIB and summaries[cpu].last_wall_time == 1_700_000_010.0
    assert set(run_summaries(engine, [cpu, empty])) == {cpu}
    assert [s.step for s in recent_steps(engine, cuda, 3)] == [698, 699, 700]


def test_device_series_buckets_time_per_gpu(engine, path):
    run_id = create_run(engine, {})
    t0 = 1_700_000_000.0
    readings = [
        DeviceReading(
            taken_at=t0 + t,
            gpu_index=gpu,
            memory_used_bytes=(gpu + 1) * GIB + t,
            memory_total_bytes=80 * GIB,
            gpu_util_percent=float(t % 100),
            memory_util_percent=None,
            temperature_c=60.0,
            power_w=None,
            process_used_bytes=None,
        )
        for t in range(0, 7_200)
        for gpu in (0, 1)
    ]
    for start in range(0, len(readings), 500):
        write_records(engine, run_id, readings[start : start + 500])

    series = device_series(engine, run_id, ["memory_used_bytes", "gpu_util_percent", "power_w"], max_points=20)

    assert series.bucket_seconds >= 7_199 / 20
    assert set(series.gpu_index) == {0, 1} and sum(series.samples) == 14_400
    for i in range(len(series)):
        gpu, lo, hi = series.gpu_index[i], series.first_taken_at[i] - t0, series.last_taken_at[i] - t0
        assert series.minimum["memory_used_bytes"][i] == (gpu + 1) * GIB + lo
        assert series.maximum["memory_used_bytes"][i] == (gpu + 1) * GIB + hi
        assert series.maximum["power_w"][i] is None
    assert max(series.maximum["gpu_util_percent"]) == 99.0


def test_rollups_agree_with_the_samples_they_summarise(engine):
    run_id = create_run(engine, {})
    write_steps(engine, run_id, [sample(s, spiky(1, seed=s)[0]) for s in range(1, 500)], batch=13)
    with engine.connect() as conn:
        rows = conn.execute(
            select(func.count(), func.sum(step_rollups.c.steps)).where(step_rollups.c.run_id == run_id)
        ).one()
    assert tuple(rows) == (len(range(0, 500, 64)), 499)
