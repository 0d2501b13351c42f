"""Report 4's zone of tolerance (expectation facts and their rollup) and report 1's cost per
acquisition (the lead facts' campaign id and the rollup campaign_leads_daily). Surveys answered
and leads projected before are counted after a rebuild (RebuildProjections).

Revision ID: 0013
"""

from alembic import op

from reporting_svc import tables as t

revision = "0013"
down_revision = "0012"

NEW = [t.expectation_facts, t.expectation_daily, t.campaign_leads_daily]


def upgrade() -> None:
    # 0005 creates lead_facts from tables.py: a database made since has the column already
    op.execute("ALTER TABLE lead_facts ADD COLUMN IF NOT EXISTS campaign_id text NOT NULL DEFAULT ''")
    for table in NEW:
        op.create_table(table.name, *(c._copy() for c in table.columns))
    op.create_index("campaign_leads_daily_campaign", "campaign_leads_daily", ["campaign_id"])


def downgrade() -> None:
    for table in reversed(NEW):
        op.drop_table(table.name)
    op.execute("ALTER TABLE lead_facts DROP COLUMN IF EXISTS campaign_id")
