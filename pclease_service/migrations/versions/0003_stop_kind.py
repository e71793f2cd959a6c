"""contexts.stop_kind: why a context stopped, as a code

Revision ID: 0003
Revises: 0002
Create Date: 2027-01-12

Rows from before this revision get their kind from their reason text, once, here; nothing
after this migration reads the reason to tell kinds apart.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# The reason texts of earlier releases, in the order the metrics used to test them.
_BACKFILL = """
UPDATE contexts SET stop_kind = CASE
    WHEN state = 'failed' THEN 'failed'
    WHEN stop_reason LIKE 'idle for%' THEN 'idle'
    WHEN stop_reason LIKE 'idle past%' THEN 'max_lifetime'
    WHEN stop_reason LIKE 'force-stopped%' THEN 'forced'
    WHEN stop_reason LIKE '%shutting down%' THEN 'shutdown'
    WHEN stop_reason LIKE '%no longer configured%' THEN 'unconfigured'
    ELSE NULL
END
WHERE state IN ('stopping', 'stopped', 'failed')
"""


def upgrade() -> None:
    with op.batch_alter_table("contexts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("stop_kind", sa.String(length=16), nullable=True))
    op.execute(_BACKFILL)


def downgrade() -> None:
    with op.batch_alter_table("contexts", schema=None) as batch_op:
        batch_op.drop_column("stop_kind")
