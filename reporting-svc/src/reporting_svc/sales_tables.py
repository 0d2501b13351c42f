"""The tables of report 2, sales by segment (segments.py, sales_report.py), on the metadata of
tables.py; migration 0011.

- customer_demo_facts: each customer's newest demographics (customer-svc's events, version = the
  etag): birth date, gender, province, city, type (person / organization), kind (end
  consumer / intermediary / internal; migration 0017). A row with version 0
  is a placeholder made by an order or lead that arrived before its customer (unknown values).
- sales_order_facts: each order's newest state (sales-svc's order events, version = the event's
  time), its lines, and the customer's values it was last counted under (age band on the order's
  day, gender, province, city, type, kind): so a change of either side moves exactly what it added.
  `frozen` once its customer was erased (the aggregates stay, the personal values go).
- sales_daily: the rollup the report reads, per Tehran day (the order's date) x grain x the
  customer's values x product x product line x currency: orders, quantity, revenue. `grain` makes
  "orders" additive whatever the grouping: an order counts once per grain row it has lines in:
  "order" (product and product_line ""), "line" (per product line, product "") and "product".
- sales_buyers_daily: the same keys plus the customer, for the distinct customers of a period.
- lead_purchase_facts / lead_purchase_daily: per customer, the first lead's creation and the
  first purchase's day, and the rollup of the days between (per day of the first purchase x the
  customer's values x days: customers), from which averages, medians and buckets are read.
- sales_customer_aliases: merged customer -> survivor (customer.merged.v1).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

from .tables import PROJECTED, TS, metadata

CUSTOMER_DIMS = ("age_band", "gender", "province", "city", "customer_type", "customer_kind")
PRODUCT_DIMS = ("product", "product_line")
SALES_MEASURES = ("orders", "quantity", "revenue")
AMOUNT = sa.Numeric(38, 9)

customer_demo_facts = sa.Table(
    "customer_demo_facts",
    metadata,
    sa.Column("customer_id", sa.Text, primary_key=True),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("birth_date", sa.Date),
    sa.Column("gender", sa.Text, nullable=False),
    sa.Column("province", sa.Text, nullable=False),
    sa.Column("city", sa.Text, nullable=False),
    sa.Column("customer_type", sa.Text, nullable=False),  # person | organization (Customer.type)
    sa.Column("customer_kind", sa.Text, nullable=False),  # end_consumer | intermediary | internal (Customer.kind)
    sa.Column("erased", sa.Boolean, nullable=False, server_default=sa.false()),
)


def _resolved(nullable: bool = True):
    """The customer's values a fact was last counted under (NULL: not counted)."""
    return [sa.Column(d, sa.Text, nullable=nullable) for d in CUSTOMER_DIMS]


sales_order_facts = sa.Table(
    "sales_order_facts",
    metadata,
    sa.Column("order_id", sa.Text, primary_key=True),
    sa.Column("version", TS, nullable=False),
    sa.Column("customer_id", sa.Text, nullable=False),
    sa.Column("day", sa.Date, nullable=False),
    sa.Column("counts", sa.Boolean, nullable=False),  # placed, not cancelled
    sa.Column("lines", JSONB, nullable=False),  # [[product, product_line, quantity, rials, currency], ...]
    *_resolved(),
    sa.Column("frozen", sa.Boolean, nullable=False, server_default=sa.false()),
)
sa.Index("sales_order_facts_customer", sales_order_facts.c.customer_id)


def _keys(*extra: sa.Column) -> list[sa.Column]:
    return [
        sa.Column("day", sa.Date, primary_key=True),
        sa.Column("grain", sa.Text, primary_key=True),
        *extra,
        *(sa.Column(d, sa.Text, primary_key=True) for d in (*CUSTOMER_DIMS, *PRODUCT_DIMS)),
        sa.Column("currency", sa.Text, primary_key=True),
    ]


sales_daily = sa.Table(
    "sales_daily",
    metadata,
    *_keys(),
    sa.Column("orders", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("quantity", AMOUNT, nullable=False, server_default="0"),
    sa.Column("revenue", AMOUNT, nullable=False, server_default="0"),
)

sales_buyers_daily = sa.Table(
    "sales_buyers_daily",
    metadata,
    *_keys(sa.Column("customer_id", sa.Text, primary_key=True)),
    sa.Column("orders", sa.BigInteger, nullable=False, server_default="0"),
)

lead_purchase_facts = sa.Table(
    "lead_purchase_facts",
    metadata,
    sa.Column("customer_id", sa.Text, primary_key=True),
    sa.Column("first_lead_time", TS),
    sa.Column("day", sa.Date),  # the first purchase's day, while counted
    sa.Column("days", sa.Integer),  # from the first lead's Tehran day to it
    *_resolved(),
    sa.Column("frozen", sa.Boolean, nullable=False, server_default=sa.false()),
)

lead_purchase_daily = sa.Table(
    "lead_purchase_daily",
    metadata,
    sa.Column("day", sa.Date, primary_key=True),
    *(sa.Column(d, sa.Text, primary_key=True) for d in CUSTOMER_DIMS),
    sa.Column("days", sa.Integer, primary_key=True),
    sa.Column("customers", sa.BigInteger, nullable=False, server_default="0"),
)

# customer.merged.v1: the merged customer -> the survivor, so an order event naming a merged
# customer (published before the merge, arriving after it) counts under the survivor.
sales_customer_aliases = sa.Table(
    "sales_customer_aliases",
    metadata,
    sa.Column("merged_id", sa.Text, primary_key=True),
    sa.Column("survivor_id", sa.Text, nullable=False),
)
sa.Index("sales_customer_aliases_survivor", sales_customer_aliases.c.survivor_id)

NEW = [
    customer_demo_facts,
    sales_order_facts,
    sales_daily,
    sales_buyers_daily,
    lead_purchase_facts,
    lead_purchase_daily,
    sales_customer_aliases,
]
# The rebuild makes these afresh too (it copies every PROJECTED table).
PROJECTED.extend(NEW)
