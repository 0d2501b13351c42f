"""lead and opportunity facts, the acquisition rollup (filled from the customer facts kept so far)

Revision ID: 0005
"""

from alembic import op

from reporting_svc import tables as t

revision = "0005"
down_revision = "0004"

NEW = [t.lead_facts, t.opportunity_facts, t.acquisition_daily]


def upgrade() -> None:
    for table in NEW:
        op.create_table(table.name, *(c._copy() for c in table.columns))
    op.create_index("acquisition_daily_source", "acquisition_daily", ["source", "day"])
    op.execute(
        "INSERT INTO acquisition_daily (day, source, currency, customers) "
        "SELECT tehran_day(created_at), acquisition_source, '', count(*) FROM customer_source_facts "
        "WHERE NOT deleted GROUP BY 1, 2"
    )


def downgrade() -> None:
    for table in reversed(NEW):
        op.drop_table(table.name)
