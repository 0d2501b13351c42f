"""Report 5, loyalty: points ledger facts and their daily rollup, members' tiers and the tier counts

Revision ID: 0008
"""

from alembic import op

from reporting_svc import tables as t

revision = "0008"
down_revision = "0007"

NEW = [t.points_facts, t.loyalty_daily, t.tier_facts, t.tier_counts]


def upgrade() -> None:
    for table in NEW:
        op.create_table(table.name, *(c._copy() for c in table.columns))
    op.create_index("loyalty_daily_programme", "loyalty_daily", ["programme", "day"])


def downgrade() -> None:
    for table in reversed(NEW):
        op.drop_table(table.name)
