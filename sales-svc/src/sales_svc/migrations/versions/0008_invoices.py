"""Invoicing: invoice details (terms, credited total, Iranian e-invoice fields), invoice lines
with VAT, payments, gapless number counters, and indexes on invoices for scopes and filters

Revision ID: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"

UUID = sa.UUID(as_uuid=False)
MONEY = sa.Numeric(28, 9)


def _text(name: str) -> sa.Column:
    return sa.Column(name, sa.Text(), server_default="", nullable=False)


def upgrade() -> None:
    op.create_table(
        "invoice_details",
        sa.Column("invoice_id", UUID, sa.ForeignKey("invoices.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("payment_terms_days", sa.Integer(), server_default="30", nullable=False),
        sa.Column("credited_total", MONEY, server_default="0", nullable=False),
        _text("description"),
        sa.Column("issue_time", sa.DateTime(timezone=True)),
        _text("seller_economic_code"),
        _text("seller_national_id"),
        _text("seller_name"),
        sa.Column("buyer_type", sa.Integer(), server_default="0", nullable=False),
        _text("buyer_economic_code"),
        _text("buyer_national_id"),
        _text("buyer_postal_code"),
        _text("buyer_name"),
        _text("tax_id"),
        sa.Column("tax_id_given", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("tax_serial", sa.BigInteger()),
        sa.Column("invoice_type", sa.Integer(), server_default="1", nullable=False),
        sa.Column("invoice_pattern", sa.Integer(), server_default="1", nullable=False),
        sa.Column("subject", sa.Integer(), server_default="1", nullable=False),
        _text("reference_tax_id"),
        _text("exchange_rate"),
        sa.Column("settlement_method", sa.Integer(), server_default="2", nullable=False),
    )
    op.create_table(
        "invoice_lines",
        sa.Column("id", UUID, server_default=sa.text("gen_random_uuid()"), primary_key=True),
        sa.Column("invoice_id", UUID, sa.ForeignKey("invoices.id", ondelete="CASCADE"), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("order_line_id", UUID, sa.ForeignKey("order_lines.id")),
        sa.Column("product_id", UUID),
        _text("description"),
        sa.Column("quantity", sa.Numeric(20, 6), nullable=False),
        sa.Column("unit", sa.Text(), server_default="unit", nullable=False),
        sa.Column("unit_price", MONEY, nullable=False),
        sa.Column("discount_percent", sa.Numeric(7, 4), server_default="0", nullable=False),
        sa.Column("tax_rate", sa.Numeric(7, 4), server_default="0", nullable=False),
        sa.Column("gross_amount", MONEY, nullable=False),
        sa.Column("discount_amount", MONEY, nullable=False),
        sa.Column("amount", MONEY, nullable=False),
        sa.Column("tax_amount", MONEY, nullable=False),
        _text("tax_product_code"),
        sa.Column("credited_line_id", UUID, sa.ForeignKey("invoice_lines.id")),
        sa.Column("credited_quantity", sa.Numeric(20, 6), server_default="0", nullable=False),
        sa.Column("credited_amount", MONEY, server_default="0", nullable=False),
        sa.Column("credited_tax", MONEY, server_default="0", nullable=False),
        sa.UniqueConstraint("invoice_id", "position", name="invoice_lines_position"),
    )
    op.create_index(
        "invoice_lines_order_line",
        "invoice_lines",
        ["order_line_id"],
        postgresql_where=sa.text("order_line_id IS NOT NULL"),
    )
    op.create_table(
        "invoice_payments",
        sa.Column("id", UUID, server_default=sa.text("gen_random_uuid()"), primary_key=True),
        sa.Column("invoice_id", UUID, sa.ForeignKey("invoices.id", ondelete="CASCADE"), nullable=False),
        sa.Column("amount", MONEY, nullable=False),
        sa.Column("currency_code", sa.Text(), nullable=False),
        sa.Column("method", sa.Text(), nullable=False),
        sa.Column("pay_time", sa.DateTime(timezone=True), nullable=False),
        _text("reference"),
        _text("recorded_by"),
        sa.Column("request_id", sa.Text(), unique=True),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("method IN ('cash', 'card', 'transfer', 'cheque')", name="invoice_payments_method"),
        sa.CheckConstraint("amount > 0", name="invoice_payments_positive"),
    )
    op.create_index("invoice_payments_invoice", "invoice_payments", ["invoice_id", "create_time", "id"])
    op.create_table(
        "invoice_counters",
        sa.Column("fiscal_year", sa.Integer(), primary_key=True),
        sa.Column("kind", sa.Text(), primary_key=True),
        sa.Column("last_sequence", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("last_issue_date", sa.Date()),
    )
    op.create_index(
        "invoices_owner_page",
        "invoices",
        ["owner_id", sa.literal_column("create_time DESC"), sa.literal_column("id DESC")],
    )
    op.create_index(
        "invoices_team_page",
        "invoices",
        ["team_id", sa.literal_column("create_time DESC"), sa.literal_column("id DESC")],
    )
    op.create_index("invoices_state_due", "invoices", ["state", "due_date"])
    op.create_index("invoices_order", "invoices", ["order_id"], postgresql_where=sa.text("order_id IS NOT NULL"))
    op.create_index(
        "invoices_credited",
        "invoices",
        ["credited_invoice_id"],
        postgresql_where=sa.text("credited_invoice_id IS NOT NULL"),
    )


def downgrade() -> None:
    for name in (
        "invoices_credited",
        "invoices_order",
        "invoices_state_due",
        "invoices_team_page",
        "invoices_owner_page",
    ):
        op.drop_index(name, table_name="invoices")
    for table in ("invoice_counters", "invoice_payments", "invoice_lines", "invoice_details"):
        op.drop_table(table)
