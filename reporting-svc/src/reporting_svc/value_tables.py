"""The tables of customer value (value.py), on the metadata of tables.py; migration 0006.

invoice_value_facts: one row per invoice or credit note (sales-svc's invoice events), its
newest state; version = the event's time (InvoiceEvent carries no version number).
customer_value_daily: the rollup the reports read, per Tehran day x customer x currency: net
revenue (paid invoices net of tax, less credit notes on their issue day), paid invoices and
credit notes. value_scores / value_fits: the models' results per customer (derived, not
projected: a refit after a rebuild makes them again).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

from .tables import PROJECTED, TS, metadata

invoice_value_facts = sa.Table(
    "invoice_value_facts",
    metadata,
    sa.Column("invoice_id", sa.Text, primary_key=True),
    sa.Column("version", TS, nullable=False),
    sa.Column("customer_id", sa.Text, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),  # invoice or credit_note
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("currency", sa.Text, nullable=False),  # IRR for IRT amounts (kept in rials)
    sa.Column("net_amount", sa.Numeric(38, 9), nullable=False),  # total less tax
    sa.Column("value_time", TS),  # when it counts: paid (an invoice) or issued (a credit note)
)

VALUE_MEASURES = ("revenue", "purchases", "credit_notes")

customer_value_daily = sa.Table(
    "customer_value_daily",
    metadata,
    sa.Column("day", sa.Date, primary_key=True),
    sa.Column("customer_id", sa.Text, primary_key=True),
    sa.Column("currency", sa.Text, primary_key=True),
    sa.Column("revenue", sa.Numeric(38, 9), nullable=False, server_default="0"),
    sa.Column("purchases", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("credit_notes", sa.BigInteger, nullable=False, server_default="0"),
)

# One row per customer x currency over all of customer_value_daily (migration 0016): what
# RFM and Pareto read when the range has no start (value.py). Derived from the daily rollup, not
# from the facts: first / last day with a non-zero row, the last day with a purchase, the days
# with a purchase (RFM's frequency: count(*) FILTER (WHERE purchases > 0)), purchases, revenue
# and credit notes. The invoice projection recomputes a customer's row from their daily rows in
# the transaction that changes them (value.refresh_summary), after locking it.
customer_value_summary = sa.Table(
    "customer_value_summary",
    metadata,
    sa.Column("customer_id", sa.Text, primary_key=True),
    sa.Column("currency", sa.Text, primary_key=True),
    sa.Column("first_day", sa.Date),
    sa.Column("last_day", sa.Date),
    sa.Column("last_purchase_day", sa.Date),
    sa.Column("purchase_days", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("purchases", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("revenue", sa.Numeric(38, 9), nullable=False, server_default="0"),
    sa.Column("credit_notes", sa.BigInteger, nullable=False, server_default="0"),
)

value_fits = sa.Table(
    "value_fits",
    metadata,
    sa.Column("currency", sa.Text, primary_key=True),
    sa.Column("as_of", sa.Date, primary_key=True),
    sa.Column("fit_time", TS, nullable=False),
    sa.Column("customers", sa.Integer, nullable=False),
    sa.Column("params", JSONB, nullable=False),  # {"bgnbd": {...}, "gamma_gamma": {...} or null}
)

value_scores = sa.Table(
    "value_scores",
    metadata,
    sa.Column("currency", sa.Text, primary_key=True),
    sa.Column("as_of", sa.Date, primary_key=True),
    sa.Column("customer_id", sa.Text, primary_key=True),
    sa.Column("purchases", sa.Integer, nullable=False),
    sa.Column("first_day", sa.Date, nullable=False),
    sa.Column("last_day", sa.Date, nullable=False),
    sa.Column("historic_clv", sa.Numeric(38, 9), nullable=False),
    sa.Column("p_alive", sa.Float, nullable=False),
    sa.Column("churn_risk", sa.Float, nullable=False),  # 1 - p_alive
    sa.Column("expected_purchases", sa.Float, nullable=False),  # in the horizon
    sa.Column("expected_spend", sa.Float, nullable=False),  # per purchase (Gamma-Gamma)
    sa.Column("predicted_clv", sa.Float, nullable=False),  # expected purchases x spend
    sa.Column("horizon_days", sa.Integer, nullable=False),
    sa.Column("reasons", JSONB, nullable=False),
)
sa.Index(
    "value_scores_risk",
    value_scores.c.currency,
    value_scores.c.as_of,
    value_scores.c.churn_risk.desc(),
    value_scores.c.customer_id,
)
sa.Index("customer_value_daily_customer", customer_value_daily.c.customer_id, customer_value_daily.c.day)

# The rebuild makes these afresh too (it copies every PROJECTED table).
PROJECTED.extend([invoice_value_facts, customer_value_daily, customer_value_summary])
