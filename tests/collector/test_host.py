"""Host probe against the real process."""

from __future__ import annotations

import logging
import time

import psutil

from collector import host
from collector.host import HostProbe

MIB = 1024**2


def test_sample_reads_this_process():
    probe = HostProbe()
    before = time.time()
    reading = probe.sample()
    assert before <= reading.taken_at <= time.time()
    assert reading.rss_bytes is not None and reading.rss_bytes > 10 * MIB  # a Python with torch imported
    assert reading.peak_rss_bytes is not None
    # Peak comes from the kernel's high-water mark, RSS from /proc; both in bytes, peak not below.
    assert reading.peak_rss_bytes >= 0.9 * reading.rss_bytes
    assert reading.peak_rss_bytes < 100 * reading.rss_bytes  # catches a KiB/bytes mix-up
    assert reading.cpu_percent is not None and reading.cpu_percent >= 0.0


def test_peak_rss_follows_a_real_allocation():
    probe = HostProbe()
    first = probe.sample()
    block = bytearray(64 * MIB)  # zero-filled, so its pages are touched and resident
    second = probe.sample()
    del block
    assert second.rss_bytes >= first.rss_bytes + 50 * MIB
    assert second.peak_rss_bytes >= first.rss_bytes + 50 * MIB


def test_cpu_percent_reflects_work_since_previous_sample(monkeypatch):
    monkeypatch.setattr(host, "CPU_PERCENT_EVERY", 1)
    probe = HostProbe()
    probe.sample()
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:
        pass
    assert probe.sample().cpu_percent > 20.0


def test_failing_field_reads_none_and_is_logged_once(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="collector.host")
    probe = HostProbe()

    def refuse():
        raise psutil.AccessDenied(pid=1)

    probe.close()  # RSS from psutil from now on (not /proc/self/statm)
    monkeypatch.setattr(probe._process, "memory_info", refuse)
    readings = [probe.sample() for _ in range(4)]
    assert all(r.rss_bytes is None for r in readings)
    assert all(r.peak_rss_bytes is not None for r in readings)
    assert len([r for r in caplog.records if r.name == "collector.host"]) == 1


def test_cpu_percent_is_read_every_nth_sample_and_carried_between(monkeypatch):
    reads = []

    def cpu_percent(interval=None):
        reads.append(interval)
        return float(len(reads))

    probe = HostProbe()
    monkeypatch.setattr(probe._process, "cpu_percent", cpu_percent)
    values = [probe.sample().cpu_percent for _ in range(2 * host.CPU_PERCENT_EVERY + 1)]
    assert len(reads) == 3 and reads == [None, None, None]
    assert values == [1.0] * host.CPU_PERCENT_EVERY + [2.0] * host.CPU_PERCENT_EVERY + [3.0]


def test_rss_from_statm_agrees_with_psutil_and_close_falls_back_to_it():
    probe = HostProbe()
    process = psutil.Process()
    from_statm = probe.sample().rss_bytes
    assert abs(from_statm - process.memory_info().rss) < 8 * MIB
    probe.close()
    probe.close()  # idempotent
    assert abs(probe.sample().rss_bytes - process.memory_info().rss) < 8 * MIB
