"""queries.inputs and queries.outputs: what each query read and wrote (lineage)

Revision ID: 0006
Revises: 0008
Create Date: 2026-11-25

Queries from before this revision have no lineage (NULL); the API answers empty lists
for them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("queries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("inputs", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("outputs", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("queries", schema=None) as batch_op:
        batch_op.drop_column("outputs")
        batch_op.drop_column("inputs")
