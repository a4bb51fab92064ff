"""The OOM observer's own logic, on the CPU, with torch's CUDA entry points replaced by stand-ins.

What the allocator really hands the observer, and what a real snapshot holds, is tested on a GPU
(tests/gpu/test_cuda_paths.py) and against recordings of one (tests/diagnosis/test_gpu_fixtures.py).
Here: the observer keeps the first capture, survives every probe failing, and never raises, since
torch would turn an exception from it into the error the training step sees instead of the OOM.
"""

from __future__ import annotations

import pytest
import torch

import collector.cuda_oom as cuda_oom
from collector.cuda_oom import CudaOomObserver, save_snapshot
from diagnosis.safe_pickle import load_path

GIB = 1024**3


@pytest.fixture
def cuda_stand_ins(monkeypatch):
    """torch's CUDA entry points the observer calls, answering as a 40 GiB card would; returns
    the attached callbacks and the calls made, and lets a test make any of them fail."""
    state = {"observers": [], "history": [], "fail": set()}

    def answer(name, value):
        def call(*args, **kwargs):
            if name in state["fail"]:
                raise RuntimeError(f"{name} failed")
            if name == "history":
                state["history"].append(kwargs)
            return value

        return call

    monkeypatch.setattr(torch._C, "_cuda_attach_out_of_memory_observer", state["observers"].append, raising=False)
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", answer("history", None))
    monkeypatch.setattr(torch.cuda.memory, "_snapshot", answer("snapshot", {"segments": [], "device_traces": [[]]}))
    monkeypatch.setattr(cuda_oom, "mem_get_info", answer("mem_get_info", (1 * GIB, 40 * GIB)))
    monkeypatch.setattr(cuda_oom, "memory_stats_now", answer("stats", {"allocated_bytes.all.current": 38 * GIB}))
    return state


def test_the_first_oom_is_captured_with_everything_and_later_calls_keep_it(cuda_stand_ins):
    observer = CudaOomObserver(torch.device("cuda", 0), 100_000, nvml_now=lambda: {"memory_used_bytes": 39 * GIB})
    assert cuda_stand_ins["observers"] == [observer._observe]
    assert cuda_stand_ins["history"] == [
        {"enabled": "all", "context": "all", "stacks": "python", "max_entries": 100_000}
    ]  # Python stacks only: C++ stacks can make a snapshot take minutes

    observer._observe(0, 2 * GIB, 40 * GIB, 1 * GIB)
    observer._observe(0, 4 * GIB, 40 * GIB, 0)  # the allocator may call again for the same failure
    capture = observer.capture
    assert capture.requested_bytes == 2 * GIB
    assert (capture.device_free_bytes, capture.device_total_bytes) == (1 * GIB, 40 * GIB)
    assert capture.allocator_stats == {"allocated_bytes.all.current": 38 * GIB}
    assert capture.snapshot == {"segments": [], "device_traces": [[]]}
    assert capture.nvml == {"memory_used_bytes": 39 * GIB}


def test_every_probe_failing_still_leaves_the_request_and_the_observer_never_raises(cuda_stand_ins):
    cuda_stand_ins["fail"].update({"mem_get_info", "snapshot", "stats"})

    def nvml_gone():
        raise RuntimeError("NVML went away")

    observer = CudaOomObserver(torch.device("cuda", 0), 100_000, nvml_now=nvml_gone)
    observer._observe(0, 3 * GIB, 40 * GIB, 0)
    capture = observer.capture
    assert capture.requested_bytes == 3 * GIB
    assert capture.device_free_bytes is None and capture.snapshot is None and capture.nvml is None
    assert capture.allocator_stats == {}


def test_a_failure_outside_the_probes_is_logged_not_raised(cuda_stand_ins, monkeypatch, caplog):
    observer = CudaOomObserver(torch.device("cuda", 0), 0)

    def broken(requested_bytes):
        raise ValueError("a bug of ours")

    monkeypatch.setattr(observer, "_capture", broken)
    observer._observe(0, GIB, 40 * GIB, 0)  # must not raise into the allocator
    assert observer.capture is None
    assert "could not capture the allocator state at the OOM" in caplog.text


def test_no_history_means_no_snapshot_and_history_that_fails_to_start_is_not_fatal(cuda_stand_ins):
    off = CudaOomObserver(torch.device("cuda", 0), 0)
    assert cuda_stand_ins["history"] == [] and not off.history_enabled
    off._observe(0, GIB, 40 * GIB, 0)
    assert off.capture.snapshot is None

    cuda_stand_ins["fail"].add("history")
    refused = CudaOomObserver(torch.device("cuda", 0), 1_000)
    assert not refused.history_enabled
    refused._observe(0, GIB, 40 * GIB, 0)
    assert refused.capture.snapshot is None and refused.capture.requested_bytes == GIB


def test_a_snapshot_is_kept_compressed_under_its_cap_and_refused_over_it(tmp_path):
    snapshot = {"segments": [{"address": 0, "total_size": 2 * GIB, "blocks": []}], "device_traces": [[]]}
    written, note = save_snapshot(snapshot, tmp_path / "pm" / "oom.pickle.gz", 1 << 20)
    assert note is None and written == (tmp_path / "pm" / "oom.pickle.gz").stat().st_size
    assert load_path(tmp_path / "pm" / "oom.pickle.gz") == snapshot  # what the snapshot reader admits
    written, note = save_snapshot(snapshot, tmp_path / "big.pickle.gz", 10)
    assert written is None and "over the 10-byte cap" in note and not (tmp_path / "big.pickle.gz").exists()
