"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("context_id", sa.String(length=36), nullable=True),
        sa.Column("lease_id", sa.String(length=36), nullable=True),
        sa.Column("from_state", sa.String(length=16), nullable=True),
        sa.Column("to_state", sa.String(length=16), nullable=True),
        sa.Column("actor", sa.String(length=120), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_events_context_id_id"), ["context_id", "id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_events_lease_id_id"), ["lease_id", "id"], unique=False)

    op.create_table(
        "profiles",
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("lock_version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_profiles")),
    )
    op.create_table(
        "tokens",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("scopes", sa.String(length=100), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tokens")),
        sa.UniqueConstraint("name", name=op.f("uq_tokens_name")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_tokens_token_hash")),
    )
    op.create_table(
        "contexts",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("profile", sa.String(length=63), nullable=False),
        sa.Column("backend", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("refcount", sa.Integer(), nullable=False),
        sa.Column("leases_total", sa.Integer(), nullable=False),
        sa.Column("hourly_cost", sa.Float(), nullable=False),
        sa.Column("backend_handle", sa.JSON(), nullable=True),
        sa.Column("status_message", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("idle_since", sa.DateTime(), nullable=True),
        sa.Column("stopping_since", sa.DateTime(), nullable=True),
        sa.Column("stopped_at", sa.DateTime(), nullable=True),
        sa.Column("stop_reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["profile"], ["profiles.name"], name=op.f("fk_contexts_profile_profiles")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_contexts")),
    )
    with op.batch_alter_table("contexts", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_contexts_profile_state"), ["profile", "state"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_contexts_state"), ["state"], unique=False)

    op.create_table(
        "leases",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("profile", sa.String(length=63), nullable=False),
        sa.Column("context_id", sa.String(length=36), nullable=False),
        sa.Column("token_id", sa.String(length=36), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("ttl_s", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("activated_at", sa.DateTime(), nullable=True),
        sa.Column("ended_at", sa.DateTime(), nullable=True),
        sa.Column("end_reason", sa.Text(), nullable=True),
        sa.Column("holder", sa.JSON(), nullable=False),
        sa.Column("dag_id", sa.String(length=250), nullable=True),
        sa.Column("run_id", sa.String(length=250), nullable=True),
        sa.Column("task_id", sa.String(length=250), nullable=True),
        sa.Column("idempotency_key", sa.String(length=200), nullable=True),
        sa.Column("request_fingerprint", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(
            ["context_id"], ["contexts.id"], name=op.f("fk_leases_context_id_contexts")
        ),
        sa.ForeignKeyConstraint(
            ["profile"], ["profiles.name"], name=op.f("fk_leases_profile_profiles")
        ),
        sa.ForeignKeyConstraint(
            ["token_id"], ["tokens.id"], name=op.f("fk_leases_token_id_tokens")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_leases")),
        sa.UniqueConstraint(
            "token_id", "idempotency_key", name=op.f("uq_leases_token_id_idempotency_key")
        ),
    )
    with op.batch_alter_table("leases", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_leases_context_id_state"), ["context_id", "state"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_leases_dag_id_run_id"), ["dag_id", "run_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_leases_state_expires_at"), ["state", "expires_at"], unique=False
        )


def downgrade() -> None:

    with op.batch_alter_table("leases", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_leases_state_expires_at"))
        batch_op.drop_index(batch_op.f("ix_leases_dag_id_run_id"))
        batch_op.drop_index(batch_op.f("ix_leases_context_id_state"))

    op.drop_table("leases")
    with op.batch_alter_table("contexts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_contexts_state"))
        batch_op.drop_index(batch_op.f("ix_contexts_profile_state"))

    op.drop_table("contexts")
    op.drop_table("tokens")
    op.drop_table("profiles")
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_events_lease_id_id"))
        batch_op.drop_index(batch_op.f("ix_events_context_id_id"))

    op.drop_table("events")
