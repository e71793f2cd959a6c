"""shared state for replicas: the Polars Cloud start ledger, blobs, shared keys

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25

What used to live in each replica's data directory moves into the database, where every
replica reads it: the polars_cloud backend's start ledger (``cloud_starts``), query plans
and results when ``storage.kind = "database"`` (``blobs``) and the dashboard's session key
(``service_keys``). The ledger files of earlier releases are imported by the backend.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cloud_starts",
        sa.Column("context_id", sa.String(length=36), nullable=False),
        sa.Column("workspace_id", sa.String(length=64), nullable=False),
        sa.Column("compute_id", sa.String(length=64), nullable=True),
        sa.Column("requested_at", sa.Float(), nullable=False),
        sa.Column("answer_due_at", sa.Float(), nullable=False),
        sa.Column("cpus", sa.Integer(), nullable=True),
        sa.Column("memory_gb", sa.Float(), nullable=True),
        sa.Column("cluster_size", sa.Integer(), nullable=False),
        sa.Column("replica", sa.String(length=100), nullable=True),
        sa.Column("fence", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("context_id", name=op.f("pk_cloud_starts")),
    )
    op.create_index(
        op.f("ix_cloud_starts_workspace_id"), "cloud_starts", ["workspace_id"], unique=False
    )
    op.create_index(
        op.f("ix_cloud_starts_compute_id"), "cloud_starts", ["compute_id"], unique=False
    )
    op.create_table(
        "blobs",
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_blobs")),
    )
    op.create_table(
        "service_keys",
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("value", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_service_keys")),
    )


def downgrade() -> None:
    op.drop_table("service_keys")
    op.drop_table("blobs")
    op.drop_index(op.f("ix_cloud_starts_compute_id"), table_name="cloud_starts")
    op.drop_index(op.f("ix_cloud_starts_workspace_id"), table_name="cloud_starts")
    op.drop_table("cloud_starts")
