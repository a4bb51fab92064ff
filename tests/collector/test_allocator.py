"""Allocator readings: the pure reduction everywhere, the real CUDA probe where there is a GPU."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from collector.allocator import (
    CudaAllocatorProbe,
    allocator_probe_for,
    device_name,
    device_total_bytes,
    flat_reading_stats,
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


RECORDED_STATS = sorted((Path(__file__).parents[1] / "fixtures" / "gpu").glob("*/memory_stats.json"))


def _nested(flat: dict[str, int]) -> dict:
    """memory_stats() flattens the nested dict by joining keys with dots; undo that."""
    nested: dict = {}
    for key, value in flat.items():
        *parents, last = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return nested


@pytest.mark.skipif(not RECORDED_STATS, reason="no CUDA run recorded yet (bench/gpu_record.py on a GPU)")
@pytest.mark.parametrize("path", RECORDED_STATS, ids=lambda p: p.parent.name)
def test_the_probe_reads_from_the_nested_stats_what_the_flat_ones_say(path):
    """The probe reads the nested dict (no Python flattening on the step's path): on stats a real
    GPU run recorded, the reading must be the one the flat dict gives."""
    for step in json.loads(path.read_text())["steps"]:
        flat = step["memory_stats"]
        assert reading_from_stats(flat_reading_stats(_nested(flat)), 1.0) == reading_from_stats(flat, 1.0)
        assert reading_from_stats(flat, 1.0).allocated_bytes > 0


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

    nested, flat = torch.cuda.memory_stats_as_nested_dict(device), torch.cuda.memory_stats(device)
    assert reading_from_stats(flat_reading_stats(nested), 0.0) == reading_from_stats(flat, 0.0)

    second = probe.sample_and_reset()  # peak reset: the transient block is gone from it
    assert second.peak_allocated_bytes < first.peak_allocated_bytes
    assert second.peak_allocated_bytes >= 64 * MIB
    del keep
