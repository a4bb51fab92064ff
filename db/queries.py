"""The read side for the dashboard and the CLI: plain frozen records, never ORM objects.

Records outlive the connection they came from, so a Streamlit cache can hold them safely.
Field names are the column names (tests/db check that the two lists agree).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, func, select

from db.schema import RUN_STATUSES, DeviceSampleRow, RunRow, StepSampleRow


@dataclass(frozen=True)
class RunRecord:
    id: int
    name: str | None
    status: str
    config: dict[str, Any]
    environment: dict[str, Any] | None
    parent_run_id: int | None
    created_at: float
    started_at: float | None
    ended_at: float | None
    heartbeat_at: float | None
    pid: int | None
    host: str | None
    device: str | None
    device_name: str | None
    device_total_bytes: int | None
    exit_code: int | None
    signal_name: str | None
    error_text: str | None
    samples_dropped: int


@dataclass(frozen=True)
class StepRecord:
    run_id: int
    step: int
    wall_time: float
    loss: float | None
    tokens: int
    seq_len: int
    step_seconds: float
    tokens_per_s: float | None
    allocated_bytes: int | None
    reserved_bytes: int | None
    active_bytes: int | None
    inactive_split_bytes: int | None
    peak_allocated_bytes: int | None
    peak_reserved_bytes: int | None
    num_alloc_retries: int | None
    num_ooms: int | None
    parameter_bytes: int
    trainable_parameter_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int
    activation_bytes: int | None
    rss_bytes: int | None
    peak_rss_bytes: int | None
    cpu_percent: float | None


@dataclass(frozen=True)
class DeviceRecord:
    id: int
    run_id: int
    taken_at: float
    gpu_index: int
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    gpu_util_percent: float | None
    memory_util_percent: float | None
    temperature_c: float | None
    power_w: float | None
    process_used_bytes: int | None


_RUNS = RunRow.__table__
_STEPS = StepSampleRow.__table__
_DEVICES = DeviceSampleRow.__table__


def get_run(engine: Engine, run_id: int) -> RunRecord | None:
    with engine.connect() as conn:
        row = conn.execute(select(_RUNS).where(_RUNS.c.id == run_id)).mappings().first()
    return None if row is None else RunRecord(**row)


def list_runs(engine: Engine, *, status: str | None = None, limit: int | None = None) -> list[RunRecord]:
    """Runs newest first (id breaks ties between runs created in the same clock tick)."""
    statement = select(_RUNS).order_by(_RUNS.c.created_at.desc(), _RUNS.c.id.desc()).limit(limit)
    if status is not None:
        if status not in RUN_STATUSES:
            raise ValueError(f"status must be one of {', '.join(RUN_STATUSES)}; got {status!r}")
        statement = statement.where(_RUNS.c.status == status)
    with engine.connect() as conn:
        return [RunRecord(**row) for row in conn.execute(statement).mappings()]


def step_samples(engine: Engine, run_id: int) -> list[StepRecord]:
    statement = select(_STEPS).where(_STEPS.c.run_id == run_id).order_by(_STEPS.c.step)
    with engine.connect() as conn:
        return [StepRecord(**row) for row in conn.execute(statement).mappings()]


def device_samples(engine: Engine, run_id: int) -> list[DeviceRecord]:
    statement = select(_DEVICES).where(_DEVICES.c.run_id == run_id).order_by(_DEVICES.c.taken_at, _DEVICES.c.id)
    with engine.connect() as conn:
        return [DeviceRecord(**row) for row in conn.execute(statement).mappings()]


def count_step_samples(engine: Engine, run_id: int) -> int:
    statement = select(func.count()).select_from(_STEPS).where(_STEPS.c.run_id == run_id)
    with engine.connect() as conn:
        return conn.execute(statement).scalar_one()


def is_lost(run: RunRecord, now: float, stale_after_s: float = 60.0) -> bool:
    """A run still marked running whose process stopped reporting: killed hard, or its host went away."""
    if run.status != "running":
        return False
    last_seen = run.heartbeat_at if run.heartbeat_at is not None else run.created_at
    return now - last_seen > stale_after_s
