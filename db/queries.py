"""The read side for the dashboard and the CLI: plain frozen records, never ORM objects.

Records outlive the connection they came from, so a Streamlit cache can hold them safely.
Field names are the column names (tests/db check that the two lists agree). JSON columns come
back as `json` decoded them (dicts and lists), except where a record says otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, Integer, cast, func, or_, select

from db.schema import (
    DEVICE_ROLLUP_COLUMNS,
    DEVICE_ROLLUP_SECONDS,
    RUN_STATUSES,
    STEP_ROLLUP_COLUMNS,
    STEP_ROLLUP_STEPS,
    DeviceSampleRow,
    LayerProfileRow,
    PostmortemRow,
    RunRow,
    StepSampleRow,
    device_rollups,
    step_rollups,
)


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


# --- Summaries and downsampled series for the dashboard ------------------------------------------
#
# A chart needs a few hundred points, and st.altair_chart sends every row to the browser, so long
# runs are grouped in SQL into buckets of consecutive steps (or seconds) keeping each column's
# minimum and maximum: a spike survives downsampling. On SQLite the groups are read from the rollup
# tables its triggers keep (db.schema.step_rollups), since grouping a million samples there takes
# seconds; other backends group the samples themselves.

STEP_SERIES_COLUMNS = tuple(name for name, _ in STEP_ROLLUP_COLUMNS)
DEVICE_SERIES_COLUMNS = tuple(name for name, _ in DEVICE_ROLLUP_COLUMNS)
# The allocator's cumulative counters; a rise between two steps is an event worth marking.
STEP_EVENT_COUNTERS = {"alloc_retry": "num_alloc_retries", "oom": "num_ooms"}


@dataclass(frozen=True)
class RunSummary:
    """A run's steps in a few numbers, for the runs list: one grouped query for every run.

    Peaks are None when no step had the reading (the CPU has no allocator), never 0.
    """

    run_id: int
    steps: int
    last_step: int
    last_wall_time: float
    peak_allocated_bytes: int | None
    peak_reserved_bytes: int | None
    peak_rss_bytes: int | None


@dataclass(frozen=True)
class StepSeries:
    """Step columns per bucket of consecutive steps, oldest bucket first.

    bucket_steps is 1 when the run has at most max_points steps: each step is its own bucket and
    minimum equals maximum. A bucket's value is None when no step in it had that reading.
    """

    run_id: int
    bucket_steps: int
    first_step: tuple[int, ...]
    last_step: tuple[int, ...]
    steps: tuple[int, ...]
    minimum: dict[str, tuple[Any, ...]]
    maximum: dict[str, tuple[Any, ...]]

    def __len__(self) -> int:
        return len(self.first_step)


@dataclass(frozen=True)
class DeviceSeries:
    """NVML columns per GPU and bucket of time, oldest first (then by GPU).

    bucket_seconds is the width the samples were grouped by; at 1 Hz sampling and a short run it is
    under a second and each sample is its own bucket.
    """

    run_id: int
    bucket_seconds: float
    gpu_index: tuple[int, ...]
    first_taken_at: tuple[float, ...]
    last_taken_at: tuple[float, ...]
    samples: tuple[int, ...]
    minimum: dict[str, tuple[Any, ...]]
    maximum: dict[str, tuple[Any, ...]]

    def __len__(self) -> int:
        return len(self.first_taken_at)


@dataclass(frozen=True)
class StepEvent:
    """A step at which one of the allocator's cumulative counters rose.

    alloc_retry: a cudaMalloc failed, the allocator freed its cached blocks and tried again (slow,
    and a sign of fragmentation or memory pressure); oom: it gave up. count is the rise at this step.
    """

    kind: str
    count: int
    record: StepRecord


_STEP_ROLLUPS = step_rollups
_DEVICE_ROLLUPS = device_rollups


def run_summaries(engine: Engine, run_ids: Iterable[int] | None = None) -> dict[int, RunSummary]:
    """Summaries by run id (default: every run); a run without a recorded step has none."""
    with engine.connect() as conn:
        if _rollups_kept(conn):
            r = _STEP_ROLLUPS
            columns = (
                r.c.run_id,
                func.sum(r.c.steps),
                func.max(r.c.last_step),
                func.max(r.c.max_wall_time),
                func.max(r.c.max_peak_allocated_bytes),
                func.max(r.c.max_peak_reserved_bytes),
                func.max(r.c.max_peak_rss_bytes),
            )
            table = r
        else:
            s = _STEPS
            columns = (
                s.c.run_id,
                func.count(),
                func.max(s.c.step),
                func.max(s.c.wall_time),
                func.max(s.c.peak_allocated_bytes),
                func.max(s.c.peak_reserved_bytes),
                func.max(s.c.peak_rss_bytes),
            )
            table = s
        statement = select(*columns).group_by(table.c.run_id)
        if run_ids is not None:
            statement = statement.where(table.c.run_id.in_(list(run_ids)))
        return {row[0]: RunSummary(*row) for row in conn.execute(statement)}


def recent_steps(engine: Engine, run_id: int, limit: int = 20) -> list[StepRecord]:
    """The run's last `limit` steps, oldest first: what "now" looks like for rates and ETAs."""
    statement = select(_STEPS).where(_STEPS.c.run_id == run_id).order_by(_STEPS.c.step.desc()).limit(limit)
    with engine.connect() as conn:
        return [StepRecord(**row) for row in reversed(conn.execute(statement).mappings().all())]


def step_series(engine: Engine, run_id: int, columns: Sequence[str], *, max_points: int = 1000) -> StepSeries:
    """The run's `columns` (names from STEP_SERIES_COLUMNS) in at most ~max_points buckets of whole steps."""
    names = _series_columns(columns, STEP_SERIES_COLUMNS)
    _check_max_points(max_points)
    s = _STEPS
    with engine.connect() as conn:
        first, last = conn.execute(select(*_min_max(s.c.step, s.c.run_id == run_id))).one()
        if first is None:
            return StepSeries(run_id, 1, (), (), (), {n: () for n in names}, {n: () for n in names})
        width = max(1, -(-(last - first + 1) // max_points))
        if width >= STEP_ROLLUP_STEPS and _rollups_kept(conn):
            per_row = -(-width // STEP_ROLLUP_STEPS)
            width = per_row * STEP_ROLLUP_STEPS
            r = _STEP_ROLLUPS
            bucket = r.c.bucket // per_row
            head = (func.min(r.c.first_step), func.max(r.c.last_step), func.sum(r.c.steps))
            values = [agg(r.c[f"{end}_{name}"]) for name in names for end, agg in _ENDS]
            where = r.c.run_id == run_id
        else:
            bucket = s.c.step // width
            head = (func.min(s.c.step), func.max(s.c.step), func.count())
            values = [agg(_step_value(name)) for name in names for _, agg in _ENDS]
            where = s.c.run_id == run_id
        rows = conn.execute(select(*head, *values).where(where).group_by(bucket).order_by(bucket)).all()
    columns_by_position = list(zip(*rows, strict=True)) if rows else [()] * (3 + 2 * len(names))
    return StepSeries(
        run_id=run_id,
        bucket_steps=width,
        first_step=tuple(columns_by_position[0]),
        last_step=tuple(columns_by_position[1]),
        steps=tuple(columns_by_position[2]),
        minimum={name: tuple(columns_by_position[3 + 2 * i]) for i, name in enumerate(names)},
        maximum={name: tuple(columns_by_position[4 + 2 * i]) for i, name in enumerate(names)},
    )


def device_series(engine: Engine, run_id: int, columns: Sequence[str], *, max_points: int = 1000) -> DeviceSeries:
    """The run's NVML `columns` (names from DEVICE_SERIES_COLUMNS) per GPU in ~max_points buckets of time."""
    names = _series_columns(columns, DEVICE_SERIES_COLUMNS)
    _check_max_points(max_points)
    d = _DEVICES
    with engine.connect() as conn:
        first, last = conn.execute(select(*_min_max(d.c.taken_at, d.c.run_id == run_id))).one()
        if first is None:
            empty = {n: () for n in names}
            return DeviceSeries(run_id, 0.0, (), (), (), (), empty, dict(empty))
        # A zero span (one sample) still needs a positive width to divide by.
        width = (last - first) / max_points or 1.0
        if width >= DEVICE_ROLLUP_SECONDS and _rollups_kept(conn):
            per_row = math.ceil(width / DEVICE_ROLLUP_SECONDS)
            width = float(per_row * DEVICE_ROLLUP_SECONDS)
            r = _DEVICE_ROLLUPS
            bucket = r.c.bucket // per_row
            head = (r.c.gpu_index, func.min(r.c.first_taken_at), func.max(r.c.last_taken_at), func.sum(r.c.samples))
            values = [agg(r.c[f"{end}_{name}"]) for name in names for end, agg in _ENDS]
            where, gpu = r.c.run_id == run_id, r.c.gpu_index
        else:
            bucket = cast(d.c.taken_at / width, Integer)
            head = (d.c.gpu_index, func.min(d.c.taken_at), func.max(d.c.taken_at), func.count())
            values = [agg(d.c[name]) for name in names for _, agg in _ENDS]
            where, gpu = d.c.run_id == run_id, d.c.gpu_index
        statement = select(*head, *values).where(where).group_by(gpu, bucket).order_by(bucket, gpu)
        rows = conn.execute(statement).all()
    by_position = list(zip(*rows, strict=True)) if rows else [()] * (4 + 2 * len(names))
    return DeviceSeries(
        run_id=run_id,
        bucket_seconds=width,
        gpu_index=tuple(by_position[0]),
        first_taken_at=tuple(by_position[1]),
        last_taken_at=tuple(by_position[2]),
        samples=tuple(by_position[3]),
        minimum={name: tuple(by_position[4 + 2 * i]) for i, name in enumerate(names)},
        maximum={name: tuple(by_position[5 + 2 * i]) for i, name in enumerate(names)},
    )


def step_events(engine: Engine, run_id: int, *, limit: int = 200) -> list[StepEvent]:
    """Allocator retries and OOMs counted by the allocator, at their exact steps, oldest first.

    At most `limit` events: a run that retries on every step is thrashing, and the first few
    hundred say so as well as all of them.
    """
    if limit < 0:
        raise ValueError(f"limit must be 0 or more; got {limit}")
    with engine.connect() as conn:
        if _rollups_kept(conn):
            return _events_from_rollups(conn, run_id, limit)
        return _events_from_samples(conn, run_id, limit)


def _rollups_kept(conn: Connection) -> bool:
    # Only SQLite has the triggers (migration 0003).
    return conn.dialect.name == "sqlite"


_ENDS = (("min", func.min), ("max", func.max))


def _series_columns(columns: Sequence[str], allowed: tuple[str, ...]) -> list[str]:
    if isinstance(columns, str):
        raise TypeError("columns must be a sequence of column names, not one string")
    unknown = [name for name in columns if name not in allowed]
    if unknown:
        raise ValueError(f"unknown series column(s) {unknown}; allowed: {', '.join(allowed)}")
    return list(dict.fromkeys(columns))


def _check_max_points(max_points: int) -> None:
    if max_points < 1:
        raise ValueError(f"max_points must be 1 or more; got {max_points}")


def _min_max(column, where) -> tuple:
    # Two scalar subqueries rather than one SELECT min(), max(): SQLite answers each alone from
    # the index in one seek, but scans every row of the run for the pair.
    table = column.table
    return (
        select(func.min(column)).select_from(table).where(where).scalar_subquery(),
        select(func.max(column)).select_from(table).where(where).scalar_subquery(),
    )


def _step_value(name: str):
    if name == "reserved_unallocated_bytes":
        return _STEPS.c.reserved_bytes - _STEPS.c.allocated_bytes
    return _STEPS.c[name]


def _events_from_rollups(conn: Connection, run_id: int, limit: int) -> list[StepEvent]:
    # A counter only grows, so a bucket holds a rise exactly when its maximum passes the previous
    # bucket's; only those buckets' counters are read, and whole rows only for the steps that rose.
    r, s = _STEP_ROLLUPS, _STEPS
    counters = list(STEP_EVENT_COUNTERS.items())
    before = [func.lag(r.c[f"max_{c}"]).over(order_by=r.c.bucket).label(f"before_{k}") for k, c in counters]
    lagged = (
        select(r.c.bucket, r.c.first_step, r.c.last_step, *(r.c[f"max_{c}"] for _, c in counters), *before)
        .where(r.c.run_id == run_id)
        .subquery()
    )
    rose = or_(*(lagged.c[f"max_{c}"] > func.coalesce(lagged.c[f"before_{k}"], 0) for k, c in counters))
    # Each bucket holds at least one event: `limit` buckets are enough.
    buckets = conn.execute(select(lagged).where(rose).order_by(lagged.c.bucket).limit(limit)).mappings().all()
    if not buckets:
        return []
    rises: list[tuple[str, int, int]] = []  # (kind, step, count)
    counts = select(s.c.step, *(s.c[c] for _, c in counters))
    for bucket in buckets:
        # One range per query: SQLite reads an OR of ranges by scanning every row of the run.
        inside = s.c.step.between(bucket["first_step"], bucket["last_step"])
        baseline = {kind: bucket[f"before_{kind}"] or 0 for kind, _ in counters}
        for row in conn.execute(counts.where(s.c.run_id == run_id, inside).order_by(s.c.step)).mappings():
            for kind, counter in counters:
                value = row[counter]
                if value is not None and value > baseline[kind]:
                    rises.append((kind, row["step"], value - baseline[kind]))
                    baseline[kind] = value
    rises = rises[:limit]
    if not rises:
        return []
    statement = select(s).where(s.c.run_id == run_id, s.c.step.in_(sorted({step for _, step, _ in rises})))
    records = {row["step"]: StepRecord(**row) for row in conn.execute(statement).mappings()}
    return [StepEvent(kind, count, records[step]) for kind, step, count in rises]


def _events_from_samples(conn: Connection, run_id: int, limit: int) -> list[StepEvent]:
    s = _STEPS
    counters = list(STEP_EVENT_COUNTERS.items())
    # The window reads only the counters; whole rows are fetched for the few steps that rose.
    before = [func.lag(s.c[c]).over(order_by=s.c.step).label(f"before_{k}") for k, c in counters]
    lagged = select(s.c.step, *(s.c[c] for _, c in counters), *before).where(s.c.run_id == run_id).subquery()
    rose = or_(*(lagged.c[c] > func.coalesce(lagged.c[f"before_{k}"], 0) for k, c in counters))
    rises = conn.execute(select(lagged).where(rose).order_by(lagged.c.step).limit(limit)).mappings().all()
    if not rises:
        return []
    statement = select(s).where(s.c.run_id == run_id, s.c.step.in_([row["step"] for row in rises]))
    records = {row["step"]: StepRecord(**row) for row in conn.execute(statement).mappings()}
    events: list[StepEvent] = []
    for row in rises:
        for kind, counter in counters:
            value, previous = row[counter], row[f"before_{kind}"] or 0
            if value is not None and value > previous:
                events.append(StepEvent(kind, value - previous, records[row["step"]]))
    return events[:limit]
