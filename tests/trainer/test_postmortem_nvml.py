"""What a post-mortem says about NVML: a reading at the failing allocation, one taken just after,
or why there is none. The CUDA observer's side runs on a GPU (tests/gpu); these are the choices."""

from __future__ import annotations

from collector.cuda_oom import CudaOomCapture
from trainer.postmortem import _nvml_at_failure

READING = {"gpu_index": 0, "memory_used_bytes": 70 * 2**30, "process_used_bytes": 60 * 2**30}


def capture(nvml):
    return CudaOomCapture(
        taken_at=0.0,
        requested_bytes=2**30,
        device_free_bytes=0,
        device_total_bytes=80 * 2**30,
        allocator_stats={},
        snapshot=None,
        nvml=nvml,
    )


def test_the_observers_reading_wins_and_says_when_it_was_taken():
    got = _nvml_at_failure(capture(READING), lambda: {"gpu_index": 0, "memory_used_bytes": 1}, None)
    assert got == {"available": True, "taken": "at the failing allocation", **READING}


def test_without_the_observers_reading_one_is_taken_now():
    got = _nvml_at_failure(capture(None), lambda: READING, None)
    assert got == {"available": True, "taken": "after the failure", **READING}
    assert _nvml_at_failure(None, lambda: READING, None)["taken"] == "after the failure"


def test_no_reading_says_why_never_zero():
    cpu_run = {"available": True, "sampled": False, "reason": "the run is on the CPU; no GPU to sample"}
    assert _nvml_at_failure(None, None, cpu_run) == {"available": False, "reason": cpu_run["reason"]}
    no_driver = {"available": False, "reason": "NVIDIA driver not found"}
    assert _nvml_at_failure(None, None, no_driver) == no_driver

    def failing():
        raise RuntimeError("NVML went away")

    got = _nvml_at_failure(None, failing, {"available": True, "sampled": True, "gpu_index": 0})
    assert got == {"available": False, "reason": "no NVML reading could be taken at the failure"}
