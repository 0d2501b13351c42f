"""The ticket API: the agents' queue pages tickets by update time (ListTickets order_by
"update_time desc")

Revision ID: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.create_index(
        "tickets_update", "tickets", [sa.literal_column("update_time DESC"), sa.literal_column("id DESC")], unique=False
    )


def downgrade() -> None:
    op.drop_index("tickets_update", table_name="tickets")
