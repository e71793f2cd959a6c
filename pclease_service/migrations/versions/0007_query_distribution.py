"""queries.distributed: the distributed settings a query runs with

Revision ID: 0007
Revises: 0003
Create Date: 2026-11-25

Null for single-node queries, which is what every query before this revision was.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("queries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("distributed", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("queries", schema=None) as batch_op:
        batch_op.drop_column("distributed")
