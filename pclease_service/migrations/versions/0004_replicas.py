"""replicas: liveness rows, per-context claims with fences, hosts, waiting tickets

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25

Several replicas share one database. Each heartbeats its ``replicas`` row; a context is
acted on by the replica that claims it (``claimed_by`` until ``claim_expires_at``), and
every write that records a backend side effect checks the claim's ``fence``. Local
workers record the replica that hosts them (``host_replica``); a running query records the
replica that runs it (``runner_replica``). Lease requests waiting for capacity hold a
``waiting_tickets`` row, ordered by its id (arrival). ``fleet`` holds one row: whether the
service as a whole is being shut down.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "replicas",
        sa.Column("id", sa.String(length=100), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_replicas")),
    )
    op.create_table(
        "fleet",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("shutdown_requested_at", sa.DateTime(), nullable=True),
        sa.Column("shutdown_requested_by", sa.String(length=120), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fleet")),
    )
    op.create_table(
        "waiting_tickets",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("profile", sa.String(length=63), nullable=False),
        sa.Column("replica", sa.String(length=100), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["profile"], ["profiles.name"], name=op.f("fk_waiting_tickets_profile_profiles")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_waiting_tickets")),
    )
    with op.batch_alter_table("waiting_tickets", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_waiting_tickets_profile_id"), ["profile", "id"], unique=False
        )
    with op.batch_alter_table("contexts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("fence", sa.BigInteger(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("claimed_by", sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column("claim_expires_at", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("host_replica", sa.String(length=100), nullable=True))
    with op.batch_alter_table("queries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("runner_replica", sa.String(length=100), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("queries", schema=None) as batch_op:
        batch_op.drop_column("runner_replica")
    with op.batch_alter_table("contexts", schema=None) as batch_op:
        batch_op.drop_column("host_replica")
        batch_op.drop_column("claim_expires_at")
        batch_op.drop_column("claimed_by")
        batch_op.drop_column("fence")
    with op.batch_alter_table("waiting_tickets", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_waiting_tickets_profile_id"))
    op.drop_table("waiting_tickets")
    op.drop_table("fleet")
    op.drop_table("replicas")
