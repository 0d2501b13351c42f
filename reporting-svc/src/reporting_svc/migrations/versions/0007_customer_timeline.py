"""Customer 360: the timeline of every service's events per customer, and merged customers' aliases

Revision ID: 0007
"""

import sqlalchemy as sa
from alembic import op

from reporting_svc import tables as t

revision = "0007"
down_revision = "0006"

NEW = [t.timeline, t.customer_aliases]


def upgrade() -> None:
    for table in NEW:
        op.create_table(table.name, *(c._copy() for c in table.columns))  # event_id UNIQUE, id IDENTITY
    op.create_index("timeline_page", "timeline", ["customer_id", sa.text("occurred_at DESC"), sa.text("id DESC")])
    op.create_index("timeline_origin", "timeline", ["origin_customer_id"])
    op.create_index("customer_aliases_survivor", "customer_aliases", ["survivor_id"])


def downgrade() -> None:
    for table in reversed(NEW):
        op.drop_table(table.name)
