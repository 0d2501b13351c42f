"""The live queue view: an index over the open tickets' queue columns (queue.py)

Revision ID: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"


def upgrade() -> None:
    op.create_index(
        "tickets_queue",
        "tickets",
        ["team_id", "state", "assignee_id", "create_time"],
        postgresql_where=sa.text("state NOT IN ('resolved', 'closed')"),
    )


def downgrade() -> None:
    op.drop_index("tickets_queue", table_name="tickets")
