"""Web behaviour on the audience row, for segment filters: web_page_views, web_events and
last_web_visit_time (kept by tracking.summarise from web_activity), an index on the last visit
for relative filters and the hourly refresh, and the columns filled from web_activity.

Revision ID: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"

LIVE = "NOT deleted AND merged_into = ''"


def upgrade() -> None:
    op.add_column("audience", sa.Column("web_page_views", sa.Integer(), server_default="0", nullable=False))
    op.add_column("audience", sa.Column("web_events", sa.Integer(), server_default="0", nullable=False))
    op.add_column("audience", sa.Column("last_web_visit_time", sa.DateTime(timezone=True), nullable=True))
    op.execute(
        """UPDATE audience a SET web_page_views = w.page_views, web_events = w.event_count,
                  last_web_visit_time = w.last_visit_time
             FROM web_activity w WHERE w.customer_id = a.customer_id"""
    )
    op.create_index("audience_seg_last_web_visit", "audience", ["last_web_visit_time"], postgresql_where=sa.text(LIVE))


def downgrade() -> None:
    op.drop_index("audience_seg_last_web_visit", table_name="audience")
    for name in ("last_web_visit_time", "web_events", "web_page_views"):
        op.drop_column("audience", name)
