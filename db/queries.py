"""The read side for the dashboard and the CLI: plain frozen records, never ORM objects.

Records outlive the connection they came from, so a Streamlit cache can hold them safely.
Field names are the column names (tests/db check that the two lists agree). JSON columns come
back as `json` decoded them (dicts and lists), except where a record says otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, func, select

from db.schema import RUN_STATUSES, DeviceSampleRow, LayerProfileRow, PostmortemRow, RunRow, StepSampleRow


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


@dataclass(frozen=True)
class PostmortemRecord:
    """A stored `collector.readings.PostMortem` with its id, run and time of recording.

    module_stack, recent_steps and layer_profile are tuples, as in PostMortem; the JSON inside
    them and inside the mappings is as decoded (lists, dicts with string keys).
    """

    id: int
    run_id: int
    created_at: float
    step: int | None
    micro_batch: int | None
    phase: str | None
    module: str | None
    module_stack: tuple[str, ...]
    batch_shape: dict[str, Any] | None
    requested_bytes: int | None
    error_type: str
    error_text: str
    traceback: str
    device: str
    device_total_bytes: int | None
    device_free_bytes: int | None
    allocator_stats: dict[str, Any] | None
    tensors: dict[str, Any] | None
    host: dict[str, Any] | None
    nvml: dict[str, Any] | None
    recent_steps: tuple[dict[str, Any], ...]
    layer_profile: tuple[dict[str, Any], ...]
    snapshot_path: str | None
    snapshot_bytes: int | None
    snapshot_note: str | None
    finding: str
    finding_details: dict[str, Any] | None


@dataclass(frozen=True)
class LayerRecord:
    run_id: int
    step: int
    module: str
    activation_bytes: int
    forward_alloc_delta_bytes: int | None
    forward_peak_bytes: int | None
    backward_peak_bytes: int | None


_RUNS = RunRow.__table__
_STEPS = StepSampleRow.__table__
_DEVICES = DeviceSampleRow.__table__
_POSTMORTEMS = PostmortemRow.__table__
_LAYERS = LayerProfileRow.__table__
_POSTMORTEM_TUPLES = ("module_stack", "recent_steps", "layer_profile")


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


def get_postmortem(engine: Engine, run_id: int) -> PostmortemRecord | None:
    """The post-mortem of a run, or None if it did not run out of memory (or saved nothing)."""
    statement = select(_POSTMORTEMS).where(_POSTMORTEMS.c.run_id == run_id)
    with engine.connect() as conn:
        row = conn.execute(statement).mappings().first()
    return None if row is None else _postmortem_record(row)


def list_postmortems(engine: Engine, *, limit: int | None = None) -> list[PostmortemRecord]:
    """Post-mortems newest first (id breaks ties between those recorded in the same clock tick)."""
    statement = select(_POSTMORTEMS).order_by(_POSTMORTEMS.c.created_at.desc(), _POSTMORTEMS.c.id.desc()).limit(limit)
    with engine.connect() as conn:
        return [_postmortem_record(row) for row in conn.execute(statement).mappings()]


def profiled_steps(engine: Engine, run_id: int) -> list[int]:
    """The steps of a run that have a layer profile, in order."""
    statement = select(_LAYERS.c.step).where(_LAYERS.c.run_id == run_id).distinct().order_by(_LAYERS.c.step)
    with engine.connect() as conn:
        return list(conn.execute(statement).scalars())


def layer_profile(engine: Engine, run_id: int, step: int | None = None) -> list[LayerRecord]:
    """Every module's memory on one profiled step (default: the run's latest), largest activations first."""
    return _layers(engine, run_id, step, limit=None)


def top_layers(engine: Engine, run_id: int, limit: int = 10) -> list[LayerRecord]:
    """The `limit` modules saving the most activation bytes on the run's latest profiled step."""
    if limit < 0:
        # SQLite reads a negative LIMIT as no limit at all.
        raise ValueError(f"limit must be 0 or more; got {limit}")
    return _layers(engine, run_id, None, limit=limit)


def is_lost(run: RunRecord, now: float, stale_after_s: float = 60.0) -> bool:
    """A run still marked running whose process stopped reporting: killed hard, or its host went away."""
    if run.status != "running":
        return False
    last_seen = run.heartbeat_at if run.heartbeat_at is not None else run.created_at
    return now - last_seen > stale_after_s


def _postmortem_record(row: Mapping[str, Any]) -> PostmortemRecord:
    return PostmortemRecord(**{**row, **{name: tuple(row[name]) for name in _POSTMORTEM_TUPLES}})


def _layers(engine: Engine, run_id: int, step: int | None, *, limit: int | None) -> list[LayerRecord]:
    # The latest step as a subquery rather than a second round trip, so a profile written in
    # between cannot make the step and its rows disagree.
    latest = select(func.max(_LAYERS.c.step)).where(_LAYERS.c.run_id == run_id).scalar_subquery()
    statement = (
        select(_LAYERS)
        .where(_LAYERS.c.run_id == run_id, _LAYERS.c.step == (latest if step is None else step))
        # module breaks ties so equal sizes list in the same order every time.
        .order_by(_LAYERS.c.activation_bytes.desc(), _LAYERS.c.module)
        .limit(limit)
    )
    with engine.connect() as conn:
        return [LayerRecord(**row) for row in conn.execute(statement).mappings()]
