"""Short links of SMS messages: short_links (code -> message, target URL; tracking.py).

Revision ID: 0010
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0010"
down_revision = "0009"


def upgrade() -> None:
    op.create_table(
        "short_links",
        sa.Column("code", sa.Text(), primary_key=True),
        sa.Column("message_id", postgresql.UUID(as_uuid=False), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
    )
    op.create_index("ix_short_links_message_id", "short_links", ["message_id"])


def downgrade() -> None:
    op.drop_table("short_links")
