"""Opens and clicks by machines (link scanners, prefetchers) counted apart: messages
.machine_open_count and .machine_click_count (campaign_svc/tracking.py, machine_reason).

Revision ID: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"


def upgrade() -> None:
    for name in ("machine_open_count", "machine_click_count"):
        op.add_column("messages", sa.Column(name, sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    for name in ("machine_open_count", "machine_click_count"):
        op.drop_column("messages", name)
