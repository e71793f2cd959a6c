"""context_starters: which token's lease request created each context; leases by token
and state (both for quotas)

Revision ID: 0008
Revises: 0003
Create Date: 2026-11-25

Contexts created before this revision get their starter from the event that created
them (its actor is ``token:<name>``), so a token's usage this day and month counts them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_BACKFILL = """
INSERT INTO context_starters (context_id, token_id)
SELECT DISTINCT e.context_id, t.id
FROM events e
JOIN tokens t ON e.actor = 'token:' || t.name
JOIN contexts c ON c.id = e.context_id
WHERE e.kind = 'context' AND e.from_state IS NULL AND e.to_state = 'starting'
"""


def upgrade() -> None:
    op.create_table(
        "context_starters",
        sa.Column("context_id", sa.String(length=36), nullable=False),
        sa.Column("token_id", sa.String(length=36), nullable=False),
        sa.ForeignKeyConstraint(
            ["context_id"], ["contexts.id"], name=op.f("fk_context_starters_context_id_contexts")
        ),
        sa.ForeignKeyConstraint(
            ["token_id"], ["tokens.id"], name=op.f("fk_context_starters_token_id_tokens")
        ),
        sa.PrimaryKeyConstraint("context_id", name=op.f("pk_context_starters")),
    )
    with op.batch_alter_table("context_starters", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_context_starters_token_id"), ["token_id"], unique=False
        )
    op.execute(_BACKFILL)
    with op.batch_alter_table("leases", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_leases_token_id_state"), ["token_id", "state"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("leases", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_leases_token_id_state"))
    with op.batch_alter_table("context_starters", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_context_starters_token_id"))
    op.drop_table("context_starters")
