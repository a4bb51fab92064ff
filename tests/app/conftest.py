"""Dashboard tests: real rows written through db.writes into a SQLite file the app opens by URL."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import streamlit as st
from sqlalchemy import Engine
from streamlit.testing.v1 import AppTest

from app import nav
from collector.readings import (
    AllocatorReading,
    DeviceReading,
    HostReading,
    LayerReading,
    PostMortem,
    StepSample,
    TensorBreakdown,
)
from db import open_engine
from db.queries import RunRecord, get_run
from db.writes import create_run, end_run, record_postmortem, update_run, write_records

MAIN = Path(__file__).resolve().parents[2] / "app" / "main.py"
MIB = 2**20
GIB = 2**30
CPU_ENVIRONMENT = {
    "versions": {"torch": "2.13.0"},
    "attn_implementation": "sdpa",
    "nvml": {"available": False, "reason": "NVML Shared Library Not Found"},
}
CUDA_ENVIRONMENT = {
    "versions": {"torch": "2.13.0"},
    "attn_implementation": "sdpa",
    "nvml": {"available": True, "sampled": True, "gpu_index": 0},
}


@pytest.fixture
def engine(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    monkeypatch.setenv("OOMLENS_DB_URL", db_url)
    engine = open_engine(db_url)
    yield engine
    engine.dispose()


def open_page(page: nav.PageSpec, **query: object) -> AppTest:
    """Render `page` as a browser would open it, with `?key=value` query parameters.

    Query results are cached by URL for a second across AppTest instances in one process: forgotten
    first, so a page shows the rows the test just wrote.
    """
    st.cache_data.clear()
    app = AppTest.from_file(str(MAIN), default_timeout=30)
    app.run()
    if page is not nav.PAGES[0]:
        app.switch_page(page.path)
    app.query_params.update({key: str(value) for key, value in query.items()})
    return app.run()


def texts(app: AppTest) -> str:
    """Everything a reader sees as text, to search in."""
    parts = [
        element.value
        for kind in ("markdown", "caption", "info", "warning", "error", "success", "title")
        for element in getattr(app, kind)
    ]
    parts += [f"{metric.label}: {metric.value}" for metric in app.metric]
    return "\n".join(str(part) for part in parts)


def step_sample(step: int, *, cuda: bool, t0: float, retries: int = 0, allocated: int = 2 * GIB) -> StepSample:
    allocator = None
    if cuda:
        allocator = AllocatorReading(
            taken_at=t0 + step,
            allocated_bytes=allocated,
            reserved_bytes=allocated + GIB,
            active_bytes=allocated,
            inactive_split_bytes=200 * MIB,
            peak_allocated_bytes=allocated + 3 * GIB,
            peak_reserved_bytes=allocated + 4 * GIB,
            num_alloc_retries=retries,
            num_ooms=0,
        )
    return StepSample(
        step=step,
        wall_time=t0 + step,
        loss=3.0 / step,
        tokens=512,
        seq_len=256,
        step_seconds=0.5,
        tokens_per_s=1024.0,
        allocator=allocator,
        tensors=TensorBreakdown(
            parameter_bytes=60 * MIB,
            trainable_parameter_bytes=MIB,
            gradient_bytes=MIB,
            optimizer_state_bytes=2 * MIB,
            activation_bytes=40 * MIB + step * MIB,
        ),
        host=HostReading(
            taken_at=t0 + step, rss_bytes=900 * MIB + step * MIB, peak_rss_bytes=950 * MIB, cpu_percent=99.0
        ),
    )


def add_run(
    engine: Engine,
    *,
    steps: int,
    cuda: bool = False,
    max_steps: int = 20,
    name: str | None = None,
    retries_from: int | None = None,
    heartbeat_age_s: float = 0.0,
) -> int:
    """A run as the worker leaves it mid-way: started, environment recorded, `steps` steps written."""
    run_id = create_run(
        engine, {"model": {"name": "tiny-llama"}, "train": {"max_steps": max_steps, "device": "auto"}}, name=name
    )
    now = time.time()
    t0 = now - steps - heartbeat_age_s
    update_run(
        engine,
        run_id,
        started_at=t0,
        pid=None,
        host="test-host",
        device="cuda:0" if cuda else "cpu",
        device_name="NVIDIA H100 80GB HBM3" if cuda else "CPU (2 cores)",
        device_total_bytes=80 * GIB if cuda else 8 * GIB,
        environment=CUDA_ENVIRONMENT if cuda else CPU_ENVIRONMENT,
    )
    records: list[object] = [
        step_sample(s, cuda=cuda, t0=t0, retries=(s - retries_from + 1 if retries_from and s >= retries_from else 0))
        for s in range(1, steps + 1)
    ]
    records += [
        LayerReading(step=1, module=f"model.layers.{i}.mlp", activation_bytes=(i + 1) * 4 * MIB) for i in range(3)
    ]
    if cuda:
        records += [
            DeviceReading(
                taken_at=t0 + s,
                gpu_index=0,
                memory_used_bytes=30 * GIB,
                memory_total_bytes=80 * GIB,
                gpu_util_percent=97.0,
                memory_util_percent=40.0,
                temperature_c=61.0,
                power_w=420.0,
                process_used_bytes=29 * GIB,
            )
            for s in range(steps)
        ]
    write_records(engine, run_id, records)
    update_run(engine, run_id, heartbeat_at=now - heartbeat_age_s)
    return run_id


def postmortem(step: int) -> PostMortem:
    return PostMortem(
        step=step,
        micro_batch=0,
        phase="forward",
        module="model.layers.2.mlp",
        module_stack=("model", "model.layers.2", "model.layers.2.mlp"),
        batch_shape={"batch_size": 2, "seq_len": 4096},
        requested_bytes=512 * MIB,
        error_type="RuntimeError",
        error_text="DefaultCPUAllocator: can't allocate memory: you tried to allocate 536870912 bytes.",
        traceback="Traceback (most recent call last):\nRuntimeError: DefaultCPUAllocator: can't allocate memory",
        device="cpu",
        device_total_bytes=None,
        device_free_bytes=None,
        allocator_stats=None,
        tensors={
            "parameter_bytes": 60 * MIB,
            "gradient_bytes": MIB,
            "optimizer_state_bytes": 2 * MIB,
            "activation_bytes": 300 * MIB,
        },
        host={"rss_bytes": 1200 * MIB},
        nvml=None,
        recent_steps=(),
        layer_profile=(),
        snapshot_path=None,
        snapshot_bytes=None,
        snapshot_note="no allocator history on the CPU",
        finding="this batch was 4,096 tokens, 16.0x the median",
        finding_details={},
    )


def add_finished(engine: Engine, status: str, *, steps: int = 5, cuda: bool = False, **end: object) -> int:
    run_id = add_run(engine, steps=steps, cuda=cuda)
    if status == "oom":
        record_postmortem(engine, run_id, postmortem(steps + 1))
    else:
        end_run(engine, run_id, status, **end)
    return run_id


def wait_for_end(engine: Engine, run_id: int, timeout_s: float = 180.0) -> RunRecord:
    """Poll until a trainer the page started has ended; on a timeout stop its worker, so no test leaves one behind."""
    deadline = time.monotonic() + timeout_s
    while True:
        run = get_run(engine, run_id)
        if run is not None and run.status != "running":
            return run
        if time.monotonic() > deadline:
            if run is not None and run.pid is not None:
                os.kill(run.pid, signal.SIGTERM)
            pytest.fail(f"run {run_id} still running after {timeout_s:.0f} s")
        time.sleep(0.25)
