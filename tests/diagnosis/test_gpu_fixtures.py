"""The CPU-side code against what real CUDA runs recorded (tests/fixtures/gpu/, see its README).

Each recording folder is a parameter; with none recorded yet the test is skipped and says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from collector.allocator import reading_from_stats
from diagnosis.analytic import estimate_analytic
from diagnosis.oom_text import parse_oom
from diagnosis.snapshot import read_snapshot
from trainer.config import validate_config

GPU_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "gpu"
RECORDINGS = sorted(manifest.parent for manifest in GPU_FIXTURES.glob("*/manifest.json"))
needs_recording = pytest.mark.skipif(not RECORDINGS, reason="no CUDA run recorded yet (bench/gpu_record.py on a GPU)")


def load(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text())


@needs_recording
@pytest.mark.parametrize("folder", RECORDINGS, ids=lambda p: p.name)
def test_the_manifest_names_what_recorded_it(folder):
    manifest = load(folder, "manifest.json")
    assert manifest["torch"] and manifest["gpu"] and manifest["gpu_total_bytes"] > 0
    assert manifest["nvml"]["available"] is False or manifest["nvml"]["memory_total_bytes"] > 0


@needs_recording
@pytest.mark.parametrize("folder", RECORDINGS, ids=lambda p: p.name)
def test_real_memory_stats_reduce_to_consistent_readings(folder):
    steps = load(folder, "memory_stats.json")["steps"]
    readings = [reading_from_stats(step["memory_stats"], 0.0) for step in steps]
    for reading in readings:
        assert 0 < reading.allocated_bytes <= reading.peak_allocated_bytes
        assert reading.allocated_bytes <= reading.reserved_bytes <= reading.peak_reserved_bytes
        assert reading.active_bytes >= reading.allocated_bytes
        assert reading.num_ooms == 0
    # Steady state: the second and third steps of the same batch shape peak alike.
    assert readings[1].peak_allocated_bytes == pytest.approx(readings[2].peak_allocated_bytes, rel=0.05)


@needs_recording
@pytest.mark.parametrize("folder", RECORDINGS, ids=lambda p: p.name)
def test_a_real_cuda_oom_message_parses_to_what_the_observer_read(folder):
    oom = load(folder, "oom.json")
    assert oom["error_type"] == "OutOfMemoryError", "the recording run did not run out of memory"
    message = parse_oom(oom["error_text"])
    capture = oom["capture"]
    assert message is not None and message.backend == "cuda" and message.device == 0
    assert message.requested_bytes == pytest.approx(capture["requested_bytes"], rel=0.01)
    assert message.total_bytes == pytest.approx(capture["device_total_bytes"], rel=0.01)
    stats = reading_from_stats(capture["allocator_stats"], 0.0)
    assert stats.num_ooms >= 1
    if message.allocated_bytes is not None:
        assert message.allocated_bytes == pytest.approx(stats.allocated_bytes, rel=0.01)


@needs_recording
@pytest.mark.parametrize("folder", RECORDINGS, ids=lambda p: p.name)
def test_the_observers_snapshot_reads_with_its_oom_event(folder):
    path = folder / "oom_snapshot.pickle.gz"
    if not path.is_file():
        pytest.skip(f"{folder.name} kept no snapshot: {load(folder, 'oom.json').get('snapshot_note')}")
    summary = read_snapshot(path)
    assert summary.ooms
    requested = load(folder, "oom.json")["capture"]["requested_bytes"]
    assert summary.ooms[-1].requested_bytes == pytest.approx(requested, abs=512)


@needs_recording
@pytest.mark.parametrize("folder", RECORDINGS, ids=lambda p: p.name)
def test_measured_steps_keep_reserved_at_or_above_allocated(folder):
    rows = [row for row in load(folder, "peaks.json") if "peak_allocated_bytes" in row["measured"]]
    assert rows
    for row in rows:
        measured = row["measured"]
        assert measured["peak_reserved_bytes"] >= measured["peak_allocated_bytes"] > 0


def measured_rows(folder: Path) -> list[dict]:
    return [row for row in load(folder, "peaks.json") if "peak_allocated_bytes" in row["measured"]]


@needs_recording
@pytest.mark.parametrize("folder", RECORDINGS, ids=lambda p: p.name)
def test_the_analytic_estimate_meets_every_measured_step(folder):
    """Issue #4's targets are 5% median and 10% p90; on our own runner's steps we hold it to 2%.
    The process had run other configs first, so a measured peak can hold 1 MiB of cuBLASLt
    workspace a biased model left behind: well inside the tolerance."""
    manifest = load(folder, "manifest.json")
    for row in measured_rows(folder):
        estimate = estimate_analytic(
            validate_config(row["config"]), device="cuda", torch=manifest["torch"], gpu=manifest["gpu"]
        )
        measured = row["measured"]["peak_allocated_bytes"]
        assert estimate.peak_allocated_bytes == pytest.approx(measured, rel=0.02), row["name"]


@needs_recording
@pytest.mark.parametrize("folder", RECORDINGS, ids=lambda p: p.name)
@pytest.mark.parametrize("name", ["tiny-llama-lora-sdpa", "tiny-gpt2-lora", "llama-3.2-1b-lora-bf16-2k"])
def test_the_traced_estimate_meets_measured_steps(folder, name):
    from diagnosis.traced import estimate_traced

    manifest = load(folder, "manifest.json")
    row = next((row for row in measured_rows(folder) if row["name"] == name), None)
    if row is None:
        pytest.skip(f"{folder.name} measured no {name}")
    estimate = estimate_traced(
        validate_config(row["config"]), device="cuda", torch=manifest["torch"], gpu=manifest["gpu"]
    )
    assert estimate.peak_allocated_bytes == pytest.approx(row["measured"]["peak_allocated_bytes"], rel=0.02)
