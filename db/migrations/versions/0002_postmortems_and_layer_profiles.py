"""Post-mortems of out-of-memory failures, and per-module memory on profiled steps.

Written out rather than built from db.schema, like 0001. Only new tables: rows already stored
are untouched, and no batch rebuild is needed.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The models' JSON(none_as_null=True) only changes how Python None is bound: same DDL as sa.JSON().
    op.create_table(
        "postmortems",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=True),
        sa.Column("micro_batch", sa.Integer(), nullable=True),
        sa.Column("phase", sa.String(), nullable=True),
        sa.Column("module", sa.String(), nullable=True),
        sa.Column("module_stack", sa.JSON(), nullable=False),
        sa.Column("batch_shape", sa.JSON(), nullable=True),
        sa.Column("requested_bytes", sa.BigInteger(), nullable=True),
        sa.Column("error_type", sa.String(), nullable=False),
        sa.Column("error_text", sa.Text(), nullable=False),
        sa.Column("traceback", sa.Text(), nullable=False),
        sa.Column("device", sa.String(), nullable=False),
        sa.Column("device_total_bytes", sa.BigInteger(), nullable=True),
        sa.Column("device_free_bytes", sa.BigInteger(), nullable=True),
        sa.Column("allocator_stats", sa.JSON(), nullable=True),
        sa.Column("tensors", sa.JSON(), nullable=True),
        sa.Column("host", sa.JSON(), nullable=True),
        sa.Column("nvml", sa.JSON(), nullable=True),
        sa.Column("recent_steps", sa.JSON(), nullable=False),
        sa.Column("layer_profile", sa.JSON(), nullable=False),
        sa.Column("snapshot_path", sa.String(), nullable=True),
        sa.Column("snapshot_bytes", sa.BigInteger(), nullable=True),
        sa.Column("snapshot_note", sa.Text(), nullable=True),
        sa.Column("finding", sa.Text(), nullable=False),
        sa.Column("finding_details", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_postmortems_run_id_runs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_postmortems")),
        sa.UniqueConstraint("run_id", name=op.f("uq_postmortems_run_id")),
    )
    op.create_table(
        "layer_profiles",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("module", sa.String(), nullable=False),
        sa.Column("activation_bytes", sa.BigInteger(), nullable=False),
        sa.Column("forward_alloc_delta_bytes", sa.BigInteger(), nullable=True),
        sa.Column("forward_peak_bytes", sa.BigInteger(), nullable=True),
        sa.Column("backward_peak_bytes", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_layer_profiles_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", "step", "module", name=op.f("pk_layer_profiles")),
    )


def downgrade() -> None:
    op.drop_table("layer_profiles")
    op.drop_table("postmortems")
