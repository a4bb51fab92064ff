"""The tables oomlens stores, as SQLAlchemy models; migrations must create exactly this.

Byte counts are BigInteger because a GPU's memory passes 2^31 bytes. Times are unix seconds as
double precision: a single-precision FLOAT (MySQL's) would round them to minutes.
Constraint names follow NAMING_CONVENTION so later migrations can drop or alter them by name
(SQLite's batch mode cannot find unnamed constraints).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    column,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

RUN_STATUSES = ("running", "completed", "failed", "oom", "stopped", "killed")

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {float: Double, dict[str, Any]: JSON, str: String}


class RunRow(Base):
    """One training run, whoever launched it; children point at the run they re-ran with a fix."""

    __tablename__ = "runs"
    __table_args__ = (
        CheckConstraint(column("status").in_(RUN_STATUSES), name="status"),
        # Never reuse the id of a deleted run: ids appear in URLs and in parent_run_id.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    name: Mapped[str | None]
    status: Mapped[str]
    config: Mapped[dict[str, Any]]
    environment: Mapped[dict[str, Any] | None]
    parent_run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"))
    created_at: Mapped[float]
    started_at: Mapped[float | None]
    ended_at: Mapped[float | None]
    heartbeat_at: Mapped[float | None]
    pid: Mapped[int | None]
    host: Mapped[str | None]
    device: Mapped[str | None]
    device_name: Mapped[str | None]
    device_total_bytes: Mapped[int | None] = mapped_column(BigInteger)
    exit_code: Mapped[int | None]
    signal_name: Mapped[str | None]
    error_text: Mapped[str | None] = mapped_column(Text)
    samples_dropped: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class StepSampleRow(Base):
    """One optimizer step: `collector.readings.StepSample` with its nested readings flattened."""

    __tablename__ = "step_samples"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    wall_time: Mapped[float]
    loss: Mapped[float | None]
    tokens: Mapped[int]
    seq_len: Mapped[int]
    step_seconds: Mapped[float]
    tokens_per_s: Mapped[float | None]
    # Allocator: all NULL on a device without caching-allocator stats (the CPU).
    allocated_bytes: Mapped[int | None] = mapped_column(BigInteger)
    reserved_bytes: Mapped[int | None] = mapped_column(BigInteger)
    active_bytes: Mapped[int | None] = mapped_column(BigInteger)
    inactive_split_bytes: Mapped[int | None] = mapped_column(BigInteger)
    peak_allocated_bytes: Mapped[int | None] = mapped_column(BigInteger)
    peak_reserved_bytes: Mapped[int | None] = mapped_column(BigInteger)
    num_alloc_retries: Mapped[int | None]
    num_ooms: Mapped[int | None]
    # Tensor breakdown, counted from the tensors on any device.
    parameter_bytes: Mapped[int] = mapped_column(BigInteger)
    trainable_parameter_bytes: Mapped[int] = mapped_column(BigInteger)
    gradient_bytes: Mapped[int] = mapped_column(BigInteger)
    optimizer_state_bytes: Mapped[int] = mapped_column(BigInteger)
    activation_bytes: Mapped[int | None] = mapped_column(BigInteger)
    # Host process.
    rss_bytes: Mapped[int | None] = mapped_column(BigInteger)
    peak_rss_bytes: Mapped[int | None] = mapped_column(BigInteger)
    cpu_percent: Mapped[float | None]


class DeviceSampleRow(Base):
    """One NVML reading of one GPU; sampled on its own clock, so keyed by time, not step."""

    __tablename__ = "device_samples"
    __table_args__ = (Index("ix_device_samples_run_id_taken_at", "run_id", "taken_at"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    taken_at: Mapped[float]
    gpu_index: Mapped[int]
    memory_used_bytes: Mapped[int | None] = mapped_column(BigInteger)
    memory_total_bytes: Mapped[int | None] = mapped_column(BigInteger)
    gpu_util_percent: Mapped[float | None]
    memory_util_percent: Mapped[float | None]
    temperature_c: Mapped[float | None]
    power_w: Mapped[float | None]
    process_used_bytes: Mapped[int | None] = mapped_column(BigInteger)


class PostmortemRow(Base):
    """What was saved when a run ran out of memory: `collector.readings.PostMortem`, one per run.

    Columns after created_at are PostMortem's fields in its order. Its tuples are JSON arrays;
    an absent mapping is SQL NULL rather than JSON null, so `IS NULL` finds it.
    """

    __tablename__ = "postmortems"
    # One failure ends a run, so a second post-mortem for it is a bug in the caller.
    __table_args__ = (UniqueConstraint("run_id"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    created_at: Mapped[float]
    step: Mapped[int | None]
    micro_batch: Mapped[int | None]
    phase: Mapped[str | None]
    module: Mapped[str | None]
    module_stack: Mapped[list[str]] = mapped_column(JSON)
    batch_shape: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    requested_bytes: Mapped[int | None] = mapped_column(BigInteger)
    error_type: Mapped[str]
    error_text: Mapped[str] = mapped_column(Text)
    traceback: Mapped[str] = mapped_column(Text)
    device: Mapped[str]
    device_total_bytes: Mapped[int | None] = mapped_column(BigInteger)
    device_free_bytes: Mapped[int | None] = mapped_column(BigInteger)
    allocator_stats: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    tensors: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    host: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    nvml: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    recent_steps: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    layer_profile: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    snapshot_path: Mapped[str | None]
    snapshot_bytes: Mapped[int | None] = mapped_column(BigInteger)
    snapshot_note: Mapped[str | None] = mapped_column(Text)
    finding: Mapped[str] = mapped_column(Text)
    finding_details: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))


class LayerProfileRow(Base):
    """One module's memory on one profiled step: `collector.readings.LayerReading`."""

    __tablename__ = "layer_profiles"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    module: Mapped[str] = mapped_column(primary_key=True)
    activation_bytes: Mapped[int] = mapped_column(BigInteger)
    # NULL on a device without a caching allocator (the CPU).
    forward_alloc_delta_bytes: Mapped[int | None] = mapped_column(BigInteger)
    forward_peak_bytes: Mapped[int | None] = mapped_column(BigInteger)
    backward_peak_bytes: Mapped[int | None] = mapped_column(BigInteger)


# Per-bucket minimum and maximum of every numeric step / device column, kept by the SQLite triggers of
# migration 0003 as samples are inserted. A dashboard chart of a million-step run groups these few
# thousand rows instead of the million samples: SQLite sorts every input row for a GROUP BY and spends
# ~70 ns per aggregate per row, several seconds for a long run (bench/dashboard_run_page.py).
# A migration that rebuilds step_samples or device_samples (a batch ALTER) drops their triggers with
# them and must create them again.
STEP_ROLLUP_STEPS = 64  # steps per step_rollups row (bucket = step // 64); the trigger uses the same number
DEVICE_ROLLUP_SECONDS = 60  # seconds per device_rollups row (bucket = taken_at // 60)
STEP_ROLLUP_COLUMNS = (
    ("wall_time", Double),
    ("loss", Double),
    ("tokens", Integer),
    ("seq_len", Integer),
    ("step_seconds", Double),
    ("tokens_per_s", Double),
    ("allocated_bytes", BigInteger),
    ("reserved_bytes", BigInteger),
    ("active_bytes", BigInteger),
    ("inactive_split_bytes", BigInteger),
    ("peak_allocated_bytes", BigInteger),
    ("peak_reserved_bytes", BigInteger),
    ("num_alloc_retries", Integer),
    ("num_ooms", Integer),
    ("parameter_bytes", BigInteger),
    ("trainable_parameter_bytes", BigInteger),
    ("gradient_bytes", BigInteger),
    ("optimizer_state_bytes", BigInteger),
    ("activation_bytes", BigInteger),
    ("rss_bytes", BigInteger),
    ("peak_rss_bytes", BigInteger),
    ("cpu_percent", Double),
    # reserved_bytes - allocated_bytes of one step: cached by the allocator, held by no tensor.
    ("reserved_unallocated_bytes", BigInteger),
)
DEVICE_ROLLUP_COLUMNS = (
    ("memory_used_bytes", BigInteger),
    ("memory_total_bytes", BigInteger),
    ("gpu_util_percent", Double),
    ("memory_util_percent", Double),
    ("temperature_c", Double),
    ("power_w", Double),
    ("process_used_bytes", BigInteger),
)


def _extremes(columns: tuple[tuple[str, Any], ...]) -> list[Column]:
    return [Column(f"{end}_{name}", type_) for name, type_ in columns for end in ("min", "max")]


step_rollups = Table(
    "step_rollups",
    Base.metadata,
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("bucket", Integer, primary_key=True, autoincrement=False),
    Column("first_step", Integer, nullable=False),
    Column("last_step", Integer, nullable=False),
    Column("steps", Integer, nullable=False),
    *_extremes(STEP_ROLLUP_COLUMNS),
)
device_rollups = Table(
    "device_rollups",
    Base.metadata,
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("gpu_index", Integer, primary_key=True, autoincrement=False),
    Column("bucket", Integer, primary_key=True, autoincrement=False),
    Column("first_taken_at", Double, nullable=False),
    Column("last_taken_at", Double, nullable=False),
    Column("samples", Integer, nullable=False),
    *_extremes(DEVICE_ROLLUP_COLUMNS),
)
