"""The allocator reserve comes from real snapshots: the figures in diagnosis/reserve.py are what
the snapshot reader finds in the files, and the estimators apply the median on CUDA only."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from diagnosis.analytic import estimate_analytic
from diagnosis.reserve import RESERVE_FRACTION, RESERVE_FRACTION_RANGE, RESERVE_MEASUREMENTS, reserve_term
from diagnosis.snapshot import read_snapshot
from trainer.config import validate_config

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
LOCAL = FIXTURES / "snapshots"
SNAPSHOTS = [m for m in RESERVE_MEASUREMENTS if m.row is None]
RECORDED = [m for m in RESERVE_MEASUREMENTS if m.row is not None]


@pytest.mark.parametrize("measurement", SNAPSHOTS, ids=lambda m: m.fixture.split("__")[0])
def test_each_measurement_is_what_the_snapshot_reader_finds_in_its_file(measurement):
    summary = read_snapshot(LOCAL / measurement.fixture)
    (device,) = [d for d in summary.devices if d.timeline and d.timeline.events]
    assert max(device.timeline.allocated_bytes) == measurement.peak_allocated_bytes
    assert max(device.timeline.reserved_bytes) == measurement.peak_reserved_bytes
    assert measurement.peak_allocated_bytes >= 1024**3  # the selection rule in the module's docstring


@pytest.mark.parametrize("measurement", RECORDED, ids=lambda m: m.row)
def test_each_recorded_measurement_is_the_recordings_own_steady_state_step(measurement):
    rows = {row["name"]: row for row in json.loads((FIXTURES / "gpu" / measurement.fixture).read_text())}
    measured = rows[measurement.row]["measured"]
    assert measured["peak_allocated_bytes"] == measurement.peak_allocated_bytes
    assert measured["peak_reserved_bytes"] == measurement.peak_reserved_bytes
    assert measurement.peak_allocated_bytes >= 1024**3  # the same selection rule
    small = [row for row in rows.values() if row["measured"]["peak_allocated_bytes"] < 1024**3]
    assert small and not any(m.row in {row["name"] for row in small} for m in RECORDED)  # the tiny models stay out


def test_the_fraction_is_the_median_and_its_range_spans_the_measurements():
    ratios = sorted(m.ratio - 1 for m in RESERVE_MEASUREMENTS)
    assert len(SNAPSHOTS) == 4 and len(RECORDED) == 4
    assert RESERVE_FRACTION == pytest.approx(statistics.median(ratios))
    assert RESERVE_FRACTION_RANGE == (ratios[0], ratios[-1])
    assert 0 < RESERVE_FRACTION < 0.2
    assert "measured" in reserve_term(10**9).formula


def test_the_reserve_is_added_on_cuda_and_not_on_the_cpu():
    cfg = validate_config({"model": {"name": "llama-2-7b", "dtype": "bf16"}, "data": {"seq_len": 2048}})
    cuda, cpu = estimate_analytic(cfg, device="cuda"), estimate_analytic(cfg, device="cpu")
    tensors = cuda.peak_allocated_bytes - cuda.breakdown["workspaces"]  # whole segments of their own
    assert cuda.peak_reserved_bytes - cuda.peak_allocated_bytes == round(tensors * RESERVE_FRACTION)
    assert cpu.peak_reserved_bytes == cpu.peak_allocated_bytes
    assert any(term.name == "caching allocator reserve at the peak" for term in cuda.terms)
