"""merges: what a merge changed, so it can be undone within the retention window

Revision ID: 0003
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.create_table(
        "merges",
        sa.Column("id", pg.UUID(as_uuid=False), primary_key=True, server_default=sa.text("gen_random_uuid()")),
        sa.Column("survivor_id", pg.UUID(as_uuid=False), nullable=False),
        sa.Column("merged_ids", pg.ARRAY(pg.UUID(as_uuid=False)), nullable=False),
        # Rows (and group memberships, moved note ids) as they were before the merge.
        sa.Column("snapshot", pg.JSONB, nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("undo_time", sa.DateTime(timezone=True)),
    )
    op.create_index("merges_survivor", "merges", ["survivor_id"])


def downgrade() -> None:
    op.drop_table("merges")
