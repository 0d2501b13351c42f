"""The invoicing part's own tables (on tables.metadata; created by migration 0008_invoices):
what an invoice carries beyond the core `invoices` row (terms, credited total, what Iran's tax
system needs), its lines with their VAT, payments, and the gapless number counters."""

from __future__ import annotations

import sqlalchemy as sa

from .tables import MONEY, PERCENT, QUANTITY, UUID, invoices, metadata


def _text(name: str) -> sa.Column:
    return sa.Column(name, sa.Text, nullable=False, server_default="")


# One row per invoice (1:1): terms, the credited total and the tax-system fields.
invoice_details = sa.Table(
    "invoice_details",
    metadata,
    sa.Column("invoice_id", UUID, sa.ForeignKey("invoices.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("payment_terms_days", sa.Integer, nullable=False, server_default="30"),
    sa.Column("credited_total", MONEY, nullable=False, server_default="0"),  # by credit notes
    _text("description"),
    sa.Column("issue_time", sa.DateTime(timezone=True)),
    # Iranian e-invoicing (samaneh-ye moadian)
    _text("seller_economic_code"),
    _text("seller_national_id"),
    _text("seller_name"),
    sa.Column("buyer_type", sa.Integer, nullable=False, server_default="0"),  # tob; 0 none
    _text("buyer_economic_code"),
    _text("buyer_national_id"),
    _text("buyer_postal_code"),
    _text("buyer_name"),
    _text("tax_id"),  # taxid, 22 characters
    sa.Column("tax_id_given", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("tax_serial", sa.BigInteger),  # inno, gapless within the seller
    sa.Column("invoice_type", sa.Integer, nullable=False, server_default="1"),  # inty
    sa.Column("invoice_pattern", sa.Integer, nullable=False, server_default="1"),  # inp
    sa.Column("subject", sa.Integer, nullable=False, server_default="1"),  # ins
    _text("reference_tax_id"),  # irtaxid
    _text("exchange_rate"),  # exr, rials per unit of a foreign currency
    sa.Column("settlement_method", sa.Integer, nullable=False, server_default="2"),  # setm
)

invoice_lines = sa.Table(
    "invoice_lines",
    metadata,
    sa.Column("id", UUID, primary_key=True, server_default=sa.text("gen_random_uuid()")),
    sa.Column("invoice_id", UUID, sa.ForeignKey("invoices.id", ondelete="CASCADE"), nullable=False),
    sa.Column("position", sa.Integer, nullable=False),  # from 1
    sa.Column("order_line_id", UUID, sa.ForeignKey("order_lines.id")),
    sa.Column("product_id", UUID),
    _text("description"),
    sa.Column("quantity", QUANTITY, nullable=False),
    sa.Column("unit", sa.Text, nullable=False, server_default="unit"),
    sa.Column("unit_price", MONEY, nullable=False),
    sa.Column("discount_percent", PERCENT, nullable=False, server_default="0"),
    sa.Column("tax_rate", PERCENT, nullable=False, server_default="0"),
    sa.Column("gross_amount", MONEY, nullable=False),  # quantity x unit price (prdis)
    sa.Column("discount_amount", MONEY, nullable=False),  # (dis)
    sa.Column("amount", MONEY, nullable=False),  # net, before tax (adis)
    sa.Column("tax_amount", MONEY, nullable=False),  # VAT (vam)
    _text("tax_product_code"),  # sstid
    # a credit note's line: the invoice line it credits
    sa.Column("credited_line_id", UUID, sa.ForeignKey("invoice_lines.id")),
    # an invoice's line: how much credit notes took back so far
    sa.Column("credited_quantity", QUANTITY, nullable=False, server_default="0"),
    sa.Column("credited_amount", MONEY, nullable=False, server_default="0"),
    sa.Column("credited_tax", MONEY, nullable=False, server_default="0"),
    sa.UniqueConstraint("invoice_id", "position", name="invoice_lines_position"),
)
sa.Index(
    "invoice_lines_order_line",
    invoice_lines.c.order_line_id,
    postgresql_where=invoice_lines.c.order_line_id.is_not(None),
)

PAYMENT_METHODS = ("cash", "card", "transfer", "cheque")
invoice_payments = sa.Table(
    "invoice_payments",
    metadata,
    sa.Column("id", UUID, primary_key=True, server_default=sa.text("gen_random_uuid()")),
    sa.Column("invoice_id", UUID, sa.ForeignKey("invoices.id", ondelete="CASCADE"), nullable=False),
    sa.Column("amount", MONEY, nullable=False),
    sa.Column("currency_code", sa.Text, nullable=False),
    sa.Column("method", sa.Text, nullable=False),
    sa.Column("pay_time", sa.DateTime(timezone=True), nullable=False),
    _text("reference"),
    _text("recorded_by"),
    sa.Column("request_id", sa.Text, unique=True),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.CheckConstraint(f"method IN {PAYMENT_METHODS!r}", name="invoice_payments_method"),
    sa.CheckConstraint("amount > 0", name="invoice_payments_positive"),
)
sa.Index(
    "invoice_payments_invoice", invoice_payments.c.invoice_id, invoice_payments.c.create_time, invoice_payments.c.id
)

# The last number taken per (fiscal_year, kind): locked by the issuing transaction, so a
# rolled-back issue leaves no gap and concurrent issues wait for each other. (0, "tax_serial")
# is the seller's tax serial (inno) across years and kinds.
invoice_counters = sa.Table(
    "invoice_counters",
    metadata,
    sa.Column("fiscal_year", sa.Integer, primary_key=True),
    sa.Column("kind", sa.Text, primary_key=True),
    sa.Column("last_sequence", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("last_issue_date", sa.Date),
)

# Indexes on the core invoices table for the lists' scopes and filters.
sa.Index("invoices_owner_page", invoices.c.owner_id, invoices.c.create_time.desc(), invoices.c.id.desc())
sa.Index("invoices_team_page", invoices.c.team_id, invoices.c.create_time.desc(), invoices.c.id.desc())
sa.Index("invoices_state_due", invoices.c.state, invoices.c.due_date)
sa.Index("invoices_order", invoices.c.order_id, postgresql_where=invoices.c.order_id.is_not(None))
sa.Index(
    "invoices_credited", invoices.c.credited_invoice_id, postgresql_where=invoices.c.credited_invoice_id.is_not(None)
)
