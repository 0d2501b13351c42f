"""report 2, sales by segment: customer demographics, order facts, the sales and buyers rollups,
lead-to-purchase facts and rollup, merged customers' aliases

Revision ID: 0011
"""

from alembic import op

from reporting_svc import sales_tables as t

revision = "0011"
down_revision = "0015"  # re-chained after main's 0012..0015 (assigned 0011 on 0010)


def upgrade() -> None:
    for table in t.NEW:
        op.create_table(table.name, *(c._copy() for c in table.columns))
    op.create_index("sales_order_facts_customer", "sales_order_facts", ["customer_id"])
    op.create_index("sales_customer_aliases_survivor", "sales_customer_aliases", ["survivor_id"])


def downgrade() -> None:
    for table in reversed(t.NEW):
        op.drop_table(table.name)
