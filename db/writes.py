"""Every INSERT, UPDATE and DELETE oomlens makes; each call is one transaction with bound parameters."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine, delete, insert, update

from collector.readings import (
    DeviceReading,
    LayerReading,
    PostMortem,
    StepSample,
)
from db.engine import write_transaction
from db.schema import (
    RUN_STATUSES,
    DeviceSampleRow,
    LayerProfileRow,
    PostmortemRow,
    RunRow,
    StepSampleRow,
    device_rollups,
    step_rollups,
)

_RUN_FIELDS = frozenset(RunRow.__table__.columns.keys()) - {"id"}
# Column names are the readings' field names; a field added to a reading without a migration
# makes the insert fail ("Unconsumed column names") rather than drop the value.
_DEVICE_FIELDS = tuple(f.name for f in dataclasses.fields(DeviceReading))
_LAYER_FIELDS = tuple(f.name for f in dataclasses.fields(LayerReading))
_POSTMORTEM_FIELDS = tuple(f.name for f in dataclasses.fields(PostMortem))


def create_run(
    engine: Engine,
    config: dict[str, Any],
    *,
    name: str | None = None,
    parent_run_id: int | None = None,
    status: str = "running",
) -> int:
    """Record a run before its process starts, so a crash at import time still has a row."""
    _check_status(status)
    values = dict(config=config, name=name, parent_run_id=parent_run_id, status=status, created_at=time.time())
    with write_transaction(engine) as conn:
        return conn.execute(insert(RunRow).values(values)).inserted_primary_key[0]


def update_run(engine: Engine, run_id: int, **fields: Any) -> None:
    """Set columns of a run (environment, pid, started_at...) as the worker learns them."""
    unknown = sorted(set(fields) - _RUN_FIELDS)
    if unknown:
        raise ValueError(f"unknown runs column(s) {unknown}; allowed: {sorted(_RUN_FIELDS)}")
    if "status" in fields:
        _check_status(fields["status"])
    if not fields:
        return
    with write_transaction(engine) as conn:
        conn.execute(update(RunRow).where(RunRow.id == run_id).values(fields))


def heartbeat(engine: Engine, run_id: int, at: float | None = None) -> None:
    """Mark a run alive; `queries.is_lost` reads a stale heartbeat as a process that vanished."""
    update_run(engine, run_id, heartbeat_at=time.time() if at is None else at)


def end_run(
    engine: Engine,
    run_id: int,
    status: str,
    *,
    error_text: str | None = None,
    exit_code: int | None = None,
    signal_name: str | None = None,
    only_if_running: bool = False,
) -> bool:
    """Close a run; True if a row changed.

    only_if_running lets the launcher record "killed" without overwriting the end the worker
    recorded itself (the check and the write are one UPDATE, so they cannot race).
    """
    _check_status(status)
    values: dict[str, Any] = {"status": status, "ended_at": time.time()}
    extras = {"error_text": error_text, "exit_code": exit_code, "signal_name": signal_name}
    values.update({key: value for key, value in extras.items() if value is not None})
    statement = update(RunRow).where(RunRow.id == run_id).values(values)
    if only_if_running:
        statement = statement.where(RunRow.status == "running")
    with write_transaction(engine) as conn:
        return conn.execute(statement).rowcount > 0


def write_records(engine: Engine, run_id: int, records: Sequence[object]) -> None:
    """Store a batch from the collector's sink and refresh the heartbeat, all in one transaction.

    A row that cannot be stored (a (step, module) already profiled, a step already written)
    fails the whole batch, so a batch is never half-written.
    """
    steps: list[dict[str, Any]] = []
    devices: list[dict[str, Any]] = []
    layers: list[dict[str, Any]] = []
    for record in records:
        if isinstance(record, StepSample):
            steps.append(_step_row(run_id, record))
        elif isinstance(record, DeviceReading):
            devices.append({"run_id": run_id, **{name: getattr(record, name) for name in _DEVICE_FIELDS}})
        elif isinstance(record, LayerReading):
            layers.append({"run_id": run_id, **{name: getattr(record, name) for name in _LAYER_FIELDS}})
        else:
            raise TypeError(
                f"cannot store a {type(record).__name__}; expected StepSample, DeviceReading or LayerReading"
            )
    with write_transaction(engine) as conn:
        # A list of parameter sets: one executemany per table, not one statement per row.
        if steps:
            conn.execute(insert(StepSampleRow), steps)
        if devices:
            conn.execute(insert(DeviceSampleRow), devices)
        if layers:
            conn.execute(insert(LayerProfileRow), layers)
        conn.execute(update(RunRow).where(RunRow.id == run_id).values(heartbeat_at=time.time()))


def record_postmortem(engine: Engine, run_id: int, postmortem: PostMortem, *, exit_code: int = 3) -> None:
    """Store an out-of-memory failure and end its run as "oom": both become visible, or neither.

    One transaction, so the dashboard never shows an "oom" run without its post-mortem, nor a
    post-mortem on a run still "running". A second post-mortem for the run raises IntegrityError
    and leaves the run as it was.
    """
    now = time.time()
    row: dict[str, Any] = {"run_id": run_id, "created_at": now}
    row.update({name: getattr(postmortem, name) for name in _POSTMORTEM_FIELDS})
    for name in ("module_stack", "recent_steps", "layer_profile"):
        row[name] = list(row[name])  # JSON arrays; queries.PostmortemRecord turns them back into tuples
    ending = {
        "status": "oom",
        "ended_at": now,
        "exit_code": exit_code,
        "error_text": postmortem.traceback or postmortem.error_text,
    }
    with write_transaction(engine) as conn:
        # Insert first: a refused post-mortem (duplicate, unknown run) fails before the run is touched.
        conn.execute(insert(PostmortemRow).values(row))
        conn.execute(update(RunRow).where(RunRow.id == run_id).values(ending))


def add_dropped(engine: Engine, run_id: int, n: int) -> None:
    """Count samples the sink discarded because its queue was full, so gaps are not mistaken for calm."""
    with write_transaction(engine) as conn:
        conn.execute(update(RunRow).where(RunRow.id == run_id).values(samples_dropped=RunRow.samples_dropped + n))


def _step_row(run_id: int, sample: StepSample) -> dict[str, Any]:
    return {"run_id": run_id, **sample.columns()}


def _check_status(status: object) -> None:
    if status not in RUN_STATUSES:
        raise ValueError(f"status must be one of {', '.join(RUN_STATUSES)}; got {status!r}")


def delete_run(engine: Engine, run_id: int) -> bool:
    """Remove a run with everything recorded for it, in one transaction; True if it existed.

    Children are deleted explicitly rather than left to ON DELETE CASCADE, which SQLite applies only
    on connections that enabled foreign keys. Runs re-run from this one keep their rows and lose the
    link (parent_run_id NULL). Files outside the database (allocator snapshots) are the caller's.
    """
    with write_transaction(engine) as conn:
        for table in (
            StepSampleRow.__table__,
            DeviceSampleRow.__table__,
            LayerProfileRow.__table__,
            PostmortemRow.__table__,
            step_rollups,
            device_rollups,
        ):
            conn.execute(delete(table).where(table.c.run_id == run_id))
        conn.execute(update(RunRow).where(RunRow.parent_run_id == run_id).values(parent_run_id=None))
        return conn.execute(delete(RunRow).where(RunRow.id == run_id)).rowcount > 0
