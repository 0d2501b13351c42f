"""Report 3, pipeline and forecast vs actual: the opportunity facts' owner, team, stage,
probability, forecast category and expected close date; the rollup sales_pipeline_daily; the
forecast snapshot facts. Opportunities projected before keep empty values until a rebuild
(RebuildProjections) replays their events.

Revision ID: 0012
"""

from alembic import op

from reporting_svc import tables as t

revision = "0012"
down_revision = "0010"

NEW = [t.sales_pipeline_daily, t.forecast_snapshot_facts]
COLUMNS = {  # as in tables.opportunity_facts
    "owner": "text NOT NULL DEFAULT ''",
    "team": "text NOT NULL DEFAULT ''",
    "stage": "text NOT NULL DEFAULT ''",
    "stage_name": "text NOT NULL DEFAULT ''",
    "probability": "numeric(9, 4) NOT NULL DEFAULT 0",
    "forecast_category": "text NOT NULL DEFAULT ''",
    "expected_close_date": "date",
}

FILL = """
INSERT INTO sales_pipeline_daily (day, owner, team, stage, stage_name, forecast_category, currency,
    open_opportunities, open_amount, weighted_amount, won_opportunities, won_amount)
SELECT CASE WHEN state = 'open' THEN coalesce(expected_close_date, DATE '0001-01-01') ELSE tehran_day(close_time) END,
    owner, team, stage, stage_name, forecast_category, currency,
    count(*) FILTER (WHERE state = 'open'),
    coalesce(sum(amount) FILTER (WHERE state = 'open'), 0),
    coalesce(sum(round(amount * probability / 100, 9)) FILTER (WHERE state = 'open'), 0),
    count(*) FILTER (WHERE state = 'won'),
    coalesce(sum(amount) FILTER (WHERE state = 'won'), 0)
FROM opportunity_facts
WHERE state = 'open' OR (state = 'won' AND close_time IS NOT NULL)
GROUP BY 1, 2, 3, 4, 5, 6, 7
"""


def upgrade() -> None:
    # 0005 creates opportunity_facts from tables.py: a database made since has the columns already
    for name, ddl in COLUMNS.items():
        op.execute(f"ALTER TABLE opportunity_facts ADD COLUMN IF NOT EXISTS {name} {ddl}")
    for table in NEW:
        op.create_table(table.name, *(c._copy() for c in table.columns))
    # the rollup of the opportunities projected before (as sales.pipeline_contributions counts)
    op.execute(FILL)
    op.create_index(
        "forecast_snapshot_facts_period", "forecast_snapshot_facts", ["calendar", "unit", "period_start", "owner"]
    )


def downgrade() -> None:
    for table in reversed(NEW):
        op.drop_table(table.name)
    for name in COLUMNS:
        op.execute(f"ALTER TABLE opportunity_facts DROP COLUMN IF EXISTS {name}")
