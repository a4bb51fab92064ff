"""Allocator readings: the pure reduction everywhere, the real CUDA probe where there is a GPU."""

from __future__ import annotations

import time

import pytest
import torch

from collector.allocator import (
    CudaAllocatorProbe,
    allocator_probe_for,
    device_name,
    device_total_bytes,
    reading_from_stats,
)
from collector.readings import AllocatorReading

MIB = 1024**2


def test_reading_from_stats_uses_documented_keys():
    stats = {
        "allocated_bytes.all.current": 100 * MIB,
        "allocated_bytes.all.peak": 180 * MIB,
        "allocated_bytes.large_pool.current": 99 * MIB,  # pools are ignored: "all" is their sum
        "reserved_bytes.all.current": 160 * MIB,
        "reserved_bytes.all.peak": 200 * MIB,
        "active_bytes.all.current": 110 * MIB,
        "inactive_split_bytes.all.current": 12 * MIB,
        "num_alloc_retries": 2,
        "num_ooms": 1,
    }
    assert reading_from_stats(stats, taken_at=5.0) == AllocatorReading(
        taken_at=5.0,
        allocated_bytes=100 * MIB,
        reserved_bytes=160 * MIB,
        active_bytes=110 * MIB,
        inactive_split_bytes=12 * MIB,
        peak_allocated_bytes=180 * MIB,
        peak_reserved_bytes=200 * MIB,
        num_alloc_retries=2,
        num_ooms=1,
    )


def test_reading_from_empty_stats_is_zero():
    # memory_stats() returns {} before the first CUDA allocation.
    reading = reading_from_stats({}, taken_at=1.0)
    assert reading == AllocatorReading(1.0, 0, 0, 0, 0, 0, 0, 0, 0)


def test_reading_from_stats_with_untouched_counters_missing():
    reading = reading_from_stats({"allocated_bytes.all.current": 512}, taken_at=1.0)
    assert reading.allocated_bytes == 512
    assert reading.inactive_split_bytes == 0 and reading.num_alloc_retries == 0


def test_no_probe_on_cpu():
    cpu = torch.device("cpu")
    assert allocator_probe_for(cpu) is None
    assert device_total_bytes(cpu) is None
    assert device_name(cpu) is None


@pytest.mark.gpu
def test_cuda_probe_reads_real_allocations_and_resets_peaks():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    device = torch.device("cuda", torch.cuda.current_device())
    probe = allocator_probe_for(torch.device("cuda"))
    assert isinstance(probe, CudaAllocatorProbe) and probe.device == device
    total = device_total_bytes(device)
    assert total is not None and total > 0
    assert device_name(device)

    keep = torch.empty(64 * MIB, dtype=torch.uint8, device=device)
    transient = torch.empty(128 * MIB, dtype=torch.uint8, device=device)
    del transient
    before = time.time()
    first = probe.sample_and_reset()
    assert first.taken_at >= before
    assert first.allocated_bytes >= 64 * MIB
    assert first.peak_allocated_bytes >= first.allocated_bytes + 128 * MIB
    assert first.reserved_bytes >= first.allocated_bytes

    second = probe.sample_and_reset()  # peak reset: the transient block is gone from it
    assert second.peak_allocated_bytes < first.peak_allocated_bytes
    assert second.peak_allocated_bytes >= 64 * MIB
    del keep
