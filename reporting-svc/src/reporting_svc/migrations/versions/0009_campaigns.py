"""Report 5, campaigns: campaign facts (goal, cost), what is attributed to each, per-campaign sums

Revision ID: 0009
"""

from alembic import op

from reporting_svc import tables as t

revision = "0009"
down_revision = "0008"

NEW = [t.campaign_facts, t.campaign_stats, t.campaign_attribution_facts]


def upgrade() -> None:
    for table in NEW:
        op.create_table(table.name, *(c._copy() for c in table.columns))


def downgrade() -> None:
    for table in reversed(NEW):
        op.drop_table(table.name)
