"""NVML probe and sampler: the real library where this machine has one, a fake module for field failures.

The fake stands in for `pynvml` only to drive the error paths; its numbers are not readings.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from types import SimpleNamespace

import pytest

from collector.nvml import NvmlProbe, NvmlSampler, NvmlUnavailable, open_nvml
from collector.readings import DeviceReading

MIB = 1024**2


class FakeNvmlError(Exception):
    pass


class FakeLibraryNotFound(FakeNvmlError):
    pass


class FakeNotSupported(FakeNvmlError):
    pass


class FakeNvml:
    """Just enough of `pynvml` for the probe; `fail` names calls that raise."""

    NVML_TEMPERATURE_GPU = 0
    NVMLError_LibraryNotFound = FakeLibraryNotFound
    NVMLError_NotSupported = FakeNotSupported

    def __init__(self, *, fail: dict[str, Exception] | None = None, device_count: int = 1, processes=None):
        self.fail = fail or {}
        self.device_count = device_count
        self.processes = processes if processes is not None else []
        self.calls: dict[str, int] = {}

    def _call(self, name: str):
        self.calls[name] = self.calls.get(name, 0) + 1
        if name in self.fail:
            raise self.fail[name]

    def nvmlInit(self):
        self._call("nvmlInit")

    def nvmlShutdown(self):
        self._call("nvmlShutdown")

    def nvmlDeviceGetCount(self):
        self._call("nvmlDeviceGetCount")
        return self.device_count

    def nvmlDeviceGetHandleByIndex(self, index):
        self._call("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < self.device_count:
            raise FakeNvmlError("Invalid Argument")
        return ("handle", index)

    def nvmlDeviceGetMemoryInfo(self, handle):
        self._call("nvmlDeviceGetMemoryInfo")
        return SimpleNamespace(used=300 * MIB, total=1000 * MIB, free=700 * MIB)

    def nvmlDeviceGetUtilizationRates(self, handle):
        self._call("nvmlDeviceGetUtilizationRates")
        return SimpleNamespace(gpu=40, memory=15)

    def nvmlDeviceGetTemperature(self, handle, sensor):
        self._call("nvmlDeviceGetTemperature")
        assert sensor == self.NVML_TEMPERATURE_GPU
        return 55

    def nvmlDeviceGetPowerUsage(self, handle):
        self._call("nvmlDeviceGetPowerUsage")
        return 123_500  # milliwatts

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        self._call("nvmlDeviceGetComputeRunningProcesses")
        return self.processes


def nvml_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "collector.nvml"]


def test_open_nvml_without_driver_is_unavailable_with_one_info_line(caplog):
    caplog.set_level(logging.INFO, logger="collector.nvml")
    result = open_nvml(0)
    if isinstance(result, NvmlProbe):
        result.close()
        pytest.skip("NVML present: this test covers machines without an NVIDIA driver")
    assert isinstance(result, NvmlUnavailable)
    assert result.reason.strip()
    records = nvml_records(caplog)
    assert [r.levelno for r in records] == [logging.INFO]
    assert result.reason in records[0].getMessage()


def test_open_nvml_names_missing_library():
    nvml = FakeNvml(fail={"nvmlInit": FakeLibraryNotFound("NVML Shared Library Not Found")})
    result = open_nvml(0, nvml=nvml)
    assert result == NvmlUnavailable("NVML library not found (no NVIDIA driver)")


def test_open_nvml_bad_index_says_how_many_and_shuts_down():
    nvml = FakeNvml(device_count=1)
    result = open_nvml(3, nvml=nvml)
    assert isinstance(result, NvmlUnavailable)
    assert result.reason == "no GPU at NVML index 3 (NVML sees 1)"
    assert nvml.calls["nvmlShutdown"] == 1


def test_sample_converts_units_and_finds_this_process():
    others = SimpleNamespace(pid=os.getpid() + 1, usedGpuMemory=999 * MIB)
    mine = SimpleNamespace(pid=os.getpid(), usedGpuMemory=250 * MIB)
    probe = open_nvml(2, nvml=FakeNvml(device_count=4, processes=[others, mine]))
    assert isinstance(probe, NvmlProbe)
    before = time.time()
    reading = probe.sample()
    assert before <= reading.taken_at <= time.time()
    assert reading == DeviceReading(
        taken_at=reading.taken_at,
        gpu_index=2,
        memory_used_bytes=300 * MIB,
        memory_total_bytes=1000 * MIB,
        gpu_util_percent=40.0,
        memory_util_percent=15.0,
        temperature_c=55.0,
        power_w=123.5,
        process_used_bytes=250 * MIB,
    )


@pytest.mark.parametrize(
    "processes",
    [
        [SimpleNamespace(pid=-1, usedGpuMemory=MIB)],  # not listed (e.g. a container's pid namespace)
        [SimpleNamespace(pid=os.getpid(), usedGpuMemory=None)],  # driver cannot attribute memory
    ],
)
def test_process_memory_unknown_reads_none(processes):
    probe = NvmlProbe(FakeNvml(processes=processes), "h", 0)
    assert probe.sample().process_used_bytes is None


def test_failing_fields_read_none_and_are_logged_once(caplog):
    caplog.set_level(logging.INFO, logger="collector.nvml")
    nvml = FakeNvml(
        fail={
            "nvmlDeviceGetTemperature": FakeNotSupported("Not Supported"),
            "nvmlDeviceGetPowerUsage": FakeNvmlError("Unknown Error"),
        }
    )
    probe = NvmlProbe(nvml, "h", 0)
    readings = [probe.sample() for _ in range(5)]
    assert all(r.temperature_c is None and r.power_w is None for r in readings)
    assert all(r.memory_used_bytes == 300 * MIB and r.gpu_util_percent == 40.0 for r in readings)
    records = nvml_records(caplog)
    assert len(records) == 2
    by_field = {("temperature" in r.getMessage()): r.levelno for r in records}
    assert by_field == {True: logging.INFO, False: logging.WARNING}  # not supported is not a fault


def test_process_list_is_queried_at_most_every_interval():
    now = [100.0]
    nvml = FakeNvml(processes=[SimpleNamespace(pid=os.getpid(), usedGpuMemory=MIB)])
    probe = NvmlProbe(nvml, "h", 0, process_interval_s=10.0, clock=lambda: now[0])
    values = []
    for t in [100.0, 101.0, 109.9, 110.0, 115.0, 120.5]:
        now[0] = t
        if t == 110.0:
            nvml.processes = [SimpleNamespace(pid=os.getpid(), usedGpuMemory=2 * MIB)]
        values.append(probe.sample().process_used_bytes)
    assert nvml.calls["nvmlDeviceGetComputeRunningProcesses"] == 3  # at 100, 110, 120.5
    assert nvml.calls["nvmlDeviceGetMemoryInfo"] == 6
    assert values == [MIB, MIB, MIB, 2 * MIB, 2 * MIB, 2 * MIB]


def test_probe_close_is_idempotent():
    nvml = FakeNvml()
    probe = NvmlProbe(nvml, "h", 0)
    probe.close()
    probe.close()
    assert nvml.calls["nvmlShutdown"] == 1


def test_sampler_publishes_at_interval_and_stops_promptly():
    nvml = FakeNvml()
    published: list[DeviceReading] = []
    sampler = NvmlSampler(NvmlProbe(nvml, "h", 0), published.append, interval_s=0.05)
    sampler.start()
    assert [t.name for t in threading.enumerate()].count("oomlens-nvml") == 1
    time.sleep(0.3)
    started = time.monotonic()
    sampler.stop(timeout=2.0)
    assert time.monotonic() - started < 0.25
    count = len(published)
    assert 3 <= count <= 9  # ~6 at 20 Hz; wide bounds for a loaded machine
    gaps = [b.taken_at - a.taken_at for a, b in itertools.pairwise(published)]
    assert min(gaps) >= 0.04
    assert nvml.calls["nvmlShutdown"] == 1
    time.sleep(0.1)
    assert len(published) == count
    assert "oomlens-nvml" not in [t.name for t in threading.enumerate()]


def test_sampler_stop_does_not_wait_out_a_long_interval():
    sampler = NvmlSampler(NvmlProbe(FakeNvml(), "h", 0), lambda reading: None, interval_s=60.0)
    sampler.start()
    time.sleep(0.02)
    started = time.monotonic()
    sampler.stop()
    sampler.stop()  # idempotent
    assert time.monotonic() - started < 0.5


def test_sampler_survives_failing_publish_and_logs_once(caplog):
    caplog.set_level(logging.INFO, logger="collector.nvml")
    calls = []

    def publish(reading: DeviceReading) -> None:
        calls.append(reading)
        if len(calls) % 2:
            raise RuntimeError("database is locked")

    sampler = NvmlSampler(NvmlProbe(FakeNvml(), "h", 0), publish, interval_s=0.02)
    sampler.start()
    time.sleep(0.2)
    sampler.stop()
    assert len(calls) >= 4  # kept sampling after failures
    assert len(nvml_records(caplog)) == 1


def test_sampler_rejects_non_positive_interval():
    with pytest.raises(ValueError, match="interval_s must be > 0"):
        NvmlSampler(NvmlProbe(FakeNvml(), "h", 0), lambda reading: None, interval_s=0)


def test_sample_now_reads_off_schedule_and_nothing_after_stop():
    sampler = NvmlSampler(NvmlProbe(FakeNvml(), "h", 0), lambda reading: None, interval_s=60.0)
    reading = sampler.sample_now()  # the thread was never started: this is not a scheduled sample
    assert reading is not None and reading.gpu_index == 0
    sampler.stop()
    assert sampler.sample_now() is None


def test_sample_now_returns_none_when_the_probe_fails(caplog):
    probe = NvmlProbe(FakeNvml(), "h", 0)
    sampler = NvmlSampler(probe, lambda reading: None, interval_s=60.0)

    def broken():
        raise RuntimeError("driver gone")

    probe.sample = broken
    assert sampler.sample_now() is None
