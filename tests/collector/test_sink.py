"""Record sink: ordering, never blocking the caller, retries, drops, and draining on close."""

from __future__ import annotations

import itertools
import logging
import threading
import time

import pytest

from collector.sink import RecordSink


class Recorder:
    """write_batch that keeps what it was given, optionally blocking until released."""

    def __init__(self, *, blocked: bool = False):
        self.batches: list[list[object]] = []
        self.release = threading.Event()
        self.entered = threading.Event()
        if not blocked:
            self.release.set()

    def __call__(self, batch: list[object]) -> None:
        self.entered.set()
        self.release.wait(5.0)
        self.batches.append(batch)

    @property
    def records(self) -> list[object]:
        return [r for b in self.batches for r in b]


def test_all_records_written_in_order_after_close():
    recorder = Recorder()
    sink = RecordSink(recorder, max_batch=7, flush_interval_s=0.01)
    assert all(sink.put(i) for i in range(100))
    sink.close()
    assert recorder.records == list(range(100))
    assert max(len(b) for b in recorder.batches) <= 7
    assert sink.dropped == 0


def test_records_are_written_before_close_within_flush_interval():
    recorder = Recorder()
    with RecordSink(recorder, flush_interval_s=0.05) as sink:
        sink.put("a")
        deadline = time.monotonic() + 1.0
        while not recorder.records and time.monotonic() < deadline:
            time.sleep(0.01)
        assert recorder.records == ["a"]


def test_close_drains_many_puts():
    recorder = Recorder()
    sink = RecordSink(recorder, max_queue=50_000, max_batch=500, flush_interval_s=10.0)
    for i in range(20_000):
        assert sink.put(i)
    started = time.monotonic()
    sink.close()
    assert time.monotonic() - started < 2.0  # close does not wait out the flush interval
    assert recorder.records == list(range(20_000))


def test_put_never_blocks_when_full_and_counts_drops(caplog):
    caplog.set_level(logging.WARNING, logger="collector.sink")
    recorder = Recorder(blocked=True)
    drops: list[int] = []
    sink = RecordSink(recorder, max_queue=3, max_batch=1, flush_interval_s=0.01, on_drop=drops.append)
    assert sink.put(0)
    assert recorder.entered.wait(2.0)  # writer now holds record 0 and is stuck in the database
    assert all(sink.put(i) for i in (1, 2, 3))
    started = time.perf_counter()
    accepted = [sink.put(i) for i in (4, 5, 6)]
    elapsed = time.perf_counter() - started
    assert accepted == [False, False, False]
    assert elapsed < 0.05
    assert sink.dropped == 3
    assert len([r for r in caplog.records if "queue full" in r.getMessage()]) == 1
    recorder.release.set()
    sink.close()
    assert recorder.records == [0, 1, 2, 3]
    assert drops == [3]


def test_failing_writes_are_retried_then_dropped_without_raising(caplog):
    caplog.set_level(logging.WARNING, logger="collector.sink")
    attempts: list[list[object]] = []
    written: list[object] = []

    def write_batch(batch: list[object]) -> None:
        attempts.append(batch)
        if "bad" in batch:
            raise OSError("disk I/O error")
        written.extend(batch)

    drops: list[int] = []
    sink = RecordSink(write_batch, max_batch=1, flush_interval_s=0.01, on_drop=drops.append, max_attempts=3)
    for record in ["a", "bad", "b"]:
        sink.put(record)
    sink.close()
    assert written == ["a", "b"]
    assert attempts.count(["bad"]) == 3
    assert sink.dropped == 1 and drops == [1]
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "disk I/O error" in m]) == 1  # logged once per error type


def test_transient_write_failure_recovers_in_order():
    failures = [RuntimeError("database is locked")]
    written: list[object] = []

    def write_batch(batch: list[object]) -> None:
        if failures:
            raise failures.pop()
        written.extend(batch)

    with RecordSink(write_batch, flush_interval_s=0.01) as sink:
        for i in range(5):
            sink.put(i)
    assert written == list(range(5))
    assert sink.dropped == 0


def test_close_is_idempotent_and_put_after_close_is_refused():
    recorder = Recorder()
    drops: list[int] = []
    sink = RecordSink(recorder, flush_interval_s=0.01, on_drop=drops.append)
    sink.put(1)
    sink.close()
    sink.close()
    assert sink.put(2) is False
    sink.close()
    assert recorder.records == [1]
    assert drops == []  # nothing was lost at close time
    assert sink.dropped == 1
    assert "oomlens-sink" not in [t.name for t in threading.enumerate()]


def test_close_in_finally_after_exception_writes_everything():
    recorder = Recorder()
    sink = RecordSink(recorder, flush_interval_s=5.0)
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        try:
            sink.put("step 1")
            sink.put("oom")
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        finally:
            sink.close()
    assert recorder.records == ["step 1", "oom"]


def test_close_gives_up_after_timeout_on_a_hung_writer():
    recorder = Recorder(blocked=True)
    drops: list[int] = []
    sink = RecordSink(recorder, max_batch=1, flush_interval_s=0.01, on_drop=drops.append)
    for i in range(3):
        sink.put(i)
    assert recorder.entered.wait(2.0)
    started = time.monotonic()
    sink.close(timeout=0.1)
    assert time.monotonic() - started < 0.5
    assert drops == [3]  # the one stuck in the writer and the two still queued
    recorder.release.set()


def test_on_idle_is_called_while_idle_and_at_most_every_interval():
    calls: list[float] = []
    sink = RecordSink(
        Recorder(), flush_interval_s=0.01, on_idle=lambda: calls.append(time.monotonic()), idle_interval_s=0.05
    )
    time.sleep(0.32)
    sink.close()
    assert 3 <= len(calls) <= 7
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert min(gaps) >= 0.045


def test_on_idle_keeps_running_while_busy_and_survives_errors():
    calls: list[int] = []

    def heartbeat() -> None:
        calls.append(1)
        raise RuntimeError("heartbeat failed")

    sink = RecordSink(Recorder(), flush_interval_s=0.01, on_idle=heartbeat, idle_interval_s=0.03)
    deadline = time.monotonic() + 0.2
    i = 0
    while time.monotonic() < deadline:
        sink.put(i)
        i += 1
        time.sleep(0.001)
    sink.close()
    assert len(calls) >= 3


def test_invalid_settings_are_reported_together():
    with pytest.raises(ValueError, match=r"max_queue must be >= 1.*flush_interval_s must be > 0"):
        RecordSink(Recorder(), max_queue=0, flush_interval_s=0)
