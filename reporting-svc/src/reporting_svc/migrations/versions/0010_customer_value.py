"""customer value: invoice facts, the per-customer daily rollup, the models' fits and scores

Revision ID: 0010
"""

from alembic import op

from reporting_svc import value_tables as t

revision = "0010"
down_revision = "0009"

NEW = [t.invoice_value_facts, t.customer_value_daily, t.value_fits, t.value_scores]


def upgrade() -> None:
    for table in NEW:
        op.create_table(table.name, *(c._copy() for c in table.columns))
    op.create_index("customer_value_daily_customer", "customer_value_daily", ["customer_id", "day"])
    op.execute("CREATE INDEX value_scores_risk ON value_scores (currency, as_of, churn_risk DESC, customer_id)")


def downgrade() -> None:
    for table in reversed(NEW):
        op.drop_table(table.name)
