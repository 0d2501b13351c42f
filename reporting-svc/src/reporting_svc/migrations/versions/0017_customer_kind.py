"""report 2: Customer.type and Customer.kind as two dimensions. `customer_kind` held the type
(person / organization); it becomes `customer_type`, and `customer_kind` is now Customer.kind
(end consumer / intermediary / internal), "unknown" for what was projected before: a
RebuildProjections fills it from the event log.

A database whose report 2 tables were made by 0011 from today's definitions has both columns
already; this migration then changes nothing.

Revision ID: 0017
"""

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0011"

DEMO = "customer_demo_facts"
FACTS = ("sales_order_facts", "lead_purchase_facts")  # the values a fact was counted under (NULL: not counted)
ROLLUPS = {  # table: its primary key after this migration
    "sales_daily": ["day", "grain", "age_band", "gender", "province", "city", "customer_type", "customer_kind",
                    "product", "product_line", "currency"],
    "sales_buyers_daily": ["day", "grain", "customer_id", "age_band", "gender", "province", "city", "customer_type",
                           "customer_kind", "product", "product_line", "currency"],
    "lead_purchase_daily": ["day", "age_band", "gender", "province", "city", "customer_type", "customer_kind", "days"],
}  # fmt: skip


def _columns(table: str) -> set[str]:
    return {c["name"] for c in sa.inspect(op.get_bind()).get_columns(table)}


def upgrade() -> None:
    if "customer_type" in _columns(DEMO):
        return
    for table in (DEMO, *FACTS, *ROLLUPS):
        op.alter_column(table, "customer_kind", new_column_name="customer_type")
    for table in (DEMO, *ROLLUPS):
        op.add_column(table, sa.Column("customer_kind", sa.Text(), nullable=False, server_default="unknown"))
        op.alter_column(table, "customer_kind", server_default=None)
    for table in FACTS:
        op.add_column(table, sa.Column("customer_kind", sa.Text(), nullable=True))
        op.execute(f"UPDATE {table} SET customer_kind = 'unknown' WHERE customer_type IS NOT NULL")
    for table, key in ROLLUPS.items():
        op.execute(f"ALTER TABLE {table} DROP CONSTRAINT {table}_pkey, ADD PRIMARY KEY ({', '.join(key)})")


def downgrade() -> None:
    for table, key in ROLLUPS.items():
        # rows apart only by the kind add up again under the type
        measures = {"sales_daily": ["orders", "quantity", "revenue"], "sales_buyers_daily": ["orders"],
                    "lead_purchase_daily": ["customers"]}[table]  # fmt: skip
        rest = [c for c in key if c != "customer_kind"]
        cols = ", ".join(rest)
        sums = ", ".join(f"sum({m}) AS {m}" for m in measures)
        op.execute(f"CREATE TEMP TABLE _k AS SELECT {cols}, {sums} FROM {table} GROUP BY {cols}")
        op.execute(f"DELETE FROM {table}")
        op.execute(f"ALTER TABLE {table} DROP CONSTRAINT {table}_pkey, DROP COLUMN customer_kind")
        op.execute(f"INSERT INTO {table} ({cols}, {', '.join(measures)}) SELECT * FROM _k")
        op.execute("DROP TABLE _k")
        op.execute(f"ALTER TABLE {table} ADD PRIMARY KEY ({cols})")
    for table in (DEMO, *FACTS):
        op.drop_column(table, "customer_kind")
    for table in (DEMO, *FACTS, *ROLLUPS):
        op.alter_column(table, "customer_type", new_column_name="customer_kind")
