"""Per-bucket minimum and maximum of the samples, kept by triggers: charts of long runs read these.

A million-step run takes SQLite seconds to group (it sorts every input row for a GROUP BY and pays
~70 ns per aggregate per row), far over the dashboard's one-second budget; grouping its ~16k rollup
rows takes milliseconds. The triggers fire in the inserting transaction, so a rollup never disagrees
with the samples; rows already stored are rolled up here once.

SQLite only: other backends get the (empty) tables, and db.queries groups their samples directly
(PostgreSQL hashes a GROUP BY rather than sorting it). Written out rather than built from db.schema,
like 0001; the column lists and bucket widths here must keep matching db.schema's.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STEP_WIDTH = 64
_DEVICE_SECONDS = 60
# Each rolled-up value as an SQL expression over a sample row ({row} is NEW in a trigger).
_STEP_VALUES = (
    ("wall_time", sa.Double(), "{row}wall_time"),
    ("loss", sa.Double(), "{row}loss"),
    ("tokens", sa.Integer(), "{row}tokens"),
    ("seq_len", sa.Integer(), "{row}seq_len"),
    ("step_seconds", sa.Double(), "{row}step_seconds"),
    ("tokens_per_s", sa.Double(), "{row}tokens_per_s"),
    ("allocated_bytes", sa.BigInteger(), "{row}allocated_bytes"),
    ("reserved_bytes", sa.BigInteger(), "{row}reserved_bytes"),
    ("active_bytes", sa.BigInteger(), "{row}active_bytes"),
    ("inactive_split_bytes", sa.BigInteger(), "{row}inactive_split_bytes"),
    ("peak_allocated_bytes", sa.BigInteger(), "{row}peak_allocated_bytes"),
    ("peak_reserved_bytes", sa.BigInteger(), "{row}peak_reserved_bytes"),
    ("num_alloc_retries", sa.Integer(), "{row}num_alloc_retries"),
    ("num_ooms", sa.Integer(), "{row}num_ooms"),
    ("parameter_bytes", sa.BigInteger(), "{row}parameter_bytes"),
    ("trainable_parameter_bytes", sa.BigInteger(), "{row}trainable_parameter_bytes"),
    ("gradient_bytes", sa.BigInteger(), "{row}gradient_bytes"),
    ("optimizer_state_bytes", sa.BigInteger(), "{row}optimizer_state_bytes"),
    ("activation_bytes", sa.BigInteger(), "{row}activation_bytes"),
    ("rss_bytes", sa.BigInteger(), "{row}rss_bytes"),
    ("peak_rss_bytes", sa.BigInteger(), "{row}peak_rss_bytes"),
    ("cpu_percent", sa.Double(), "{row}cpu_percent"),
    ("reserved_unallocated_bytes", sa.BigInteger(), "{row}reserved_bytes - {row}allocated_bytes"),
)
_DEVICE_VALUES = (
    ("memory_used_bytes", sa.BigInteger(), "{row}memory_used_bytes"),
    ("memory_total_bytes", sa.BigInteger(), "{row}memory_total_bytes"),
    ("gpu_util_percent", sa.Double(), "{row}gpu_util_percent"),
    ("memory_util_percent", sa.Double(), "{row}memory_util_percent"),
    ("temperature_c", sa.Double(), "{row}temperature_c"),
    ("power_w", sa.Double(), "{row}power_w"),
    ("process_used_bytes", sa.BigInteger(), "{row}process_used_bytes"),
)
# The SQL below is assembled from the constants above only: no value from outside this file.
_STEP_TRIGGER = "step_samples_rollup"
_DEVICE_TRIGGER = "device_samples_rollup"


def _extremes(values) -> list[sa.Column]:
    return [sa.Column(f"{end}_{name}", type_, nullable=True) for name, type_, _ in values for end in ("min", "max")]


def _names(values) -> str:
    return ", ".join(f"min_{name}, max_{name}" for name, _, _ in values)


def _merge(values) -> str:
    # SQLite's two-argument min()/max() return NULL if either side is NULL; a bucket whose
    # earlier samples had no reading must still take a later one's.
    return ", ".join(
        f"{end}_{name} = {end}(coalesce({end}_{name}, excluded.{end}_{name}), "
        f"coalesce(excluded.{end}_{name}, {end}_{name}))"
        for name, _, _ in values
        for end in ("min", "max")
    )


def _new_row(values) -> str:
    return ", ".join(f"{expr}, {expr}".format(row="NEW.") for _, _, expr in values)


def _grouped(values) -> str:
    return ", ".join(f"min({expr}), max({expr})".format(row="") for _, _, expr in values)


def upgrade() -> None:
    op.create_table(
        "step_rollups",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("bucket", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("first_step", sa.Integer(), nullable=False),
        sa.Column("last_step", sa.Integer(), nullable=False),
        sa.Column("steps", sa.Integer(), nullable=False),
        *_extremes(_STEP_VALUES),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_step_rollups_run_id_runs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("run_id", "bucket", name=op.f("pk_step_rollups")),
    )
    op.create_table(
        "device_rollups",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("gpu_index", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("bucket", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("first_taken_at", sa.Double(), nullable=False),
        sa.Column("last_taken_at", sa.Double(), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        *_extremes(_DEVICE_VALUES),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_device_rollups_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", "gpu_index", "bucket", name=op.f("pk_device_rollups")),
    )
    if op.get_bind().dialect.name != "sqlite":
        return
    step_bucket = f"step / {_STEP_WIDTH}"
    device_bucket = f"CAST(taken_at / {_DEVICE_SECONDS} AS INTEGER)"
    op.execute(
        f"INSERT INTO step_rollups (run_id, bucket, first_step, last_step, steps, {_names(_STEP_VALUES)}) "
        f"SELECT run_id, {step_bucket}, min(step), max(step), count(*), {_grouped(_STEP_VALUES)} "
        f"FROM step_samples GROUP BY run_id, {step_bucket}"
    )
    op.execute(
        f"INSERT INTO device_rollups (run_id, gpu_index, bucket, first_taken_at, last_taken_at, samples, "
        f"{_names(_DEVICE_VALUES)}) "
        f"SELECT run_id, gpu_index, {device_bucket}, min(taken_at), max(taken_at), count(*), "
        f"{_grouped(_DEVICE_VALUES)} FROM device_samples GROUP BY run_id, gpu_index, {device_bucket}"
    )
    op.execute(
        f"CREATE TRIGGER {_STEP_TRIGGER} AFTER INSERT ON step_samples BEGIN "
        f"INSERT INTO step_rollups (run_id, bucket, first_step, last_step, steps, {_names(_STEP_VALUES)}) "
        f"VALUES (NEW.run_id, NEW.step / {_STEP_WIDTH}, NEW.step, NEW.step, 1, {_new_row(_STEP_VALUES)}) "
        f"ON CONFLICT (run_id, bucket) DO UPDATE SET first_step = min(first_step, excluded.first_step), "
        f"last_step = max(last_step, excluded.last_step), steps = steps + 1, {_merge(_STEP_VALUES)}; END"
    )
    op.execute(
        f"CREATE TRIGGER {_DEVICE_TRIGGER} AFTER INSERT ON device_samples BEGIN "
        f"INSERT INTO device_rollups (run_id, gpu_index, bucket, first_taken_at, last_taken_at, samples, "
        f"{_names(_DEVICE_VALUES)}) "
        f"VALUES (NEW.run_id, NEW.gpu_index, CAST(NEW.taken_at / {_DEVICE_SECONDS} AS INTEGER), NEW.taken_at, "
        f"NEW.taken_at, 1, {_new_row(_DEVICE_VALUES)}) "
        f"ON CONFLICT (run_id, gpu_index, bucket) DO UPDATE SET "
        f"first_taken_at = min(first_taken_at, excluded.first_taken_at), "
        f"last_taken_at = max(last_taken_at, excluded.last_taken_at), samples = samples + 1, "
        f"{_merge(_DEVICE_VALUES)}; END"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute(f"DROP TRIGGER IF EXISTS {_DEVICE_TRIGGER}")
        op.execute(f"DROP TRIGGER IF EXISTS {_STEP_TRIGGER}")
    op.drop_table("device_rollups")
    op.drop_table("step_rollups")
