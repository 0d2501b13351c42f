"""Quotes (versions, lines), the yearly numbers of quotes and orders, order deliveries, and the
indexes the order lists use (sales_svc/quotes.py and orders.py describe them)

Revision ID: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"

UUID = sa.UUID(as_uuid=False)
MONEY = sa.Numeric(precision=28, scale=9)
PERCENT = sa.Numeric(precision=7, scale=4)
QUANTITY = sa.Numeric(precision=20, scale=6)


def _desc(*cols: str) -> list:
    return [sa.literal_column(f"{c} DESC") for c in cols]


def upgrade() -> None:
    op.create_table(
        "sales_numbers",
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("year", sa.Integer(), nullable=False),
        sa.Column("last_value", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("kind", "year"),
    )
    op.create_table(
        "quotes",
        sa.Column("id", UUID, server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("number", sa.Text(), nullable=False),
        sa.Column("opportunity_id", UUID, nullable=False),
        sa.Column("customer_id", sa.Text(), nullable=False),
        sa.Column("owner_id", sa.Text(), server_default="", nullable=False),
        sa.Column("team_id", UUID, nullable=True),
        sa.Column("currency_code", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), server_default="draft", nullable=False),
        sa.Column("latest_version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("order_id", UUID, nullable=True),
        sa.Column("reject_reason", sa.Text(), server_default="", nullable=False),
        sa.Column("close_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("request_id", sa.Text(), nullable=True),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("state IN ('draft', 'sent', 'accepted', 'rejected', 'expired')", name="quotes_state"),
        sa.ForeignKeyConstraint(["opportunity_id"], ["opportunities.id"]),
        sa.ForeignKeyConstraint(["team_id"], ["teams.id"]),
        sa.ForeignKeyConstraint(["order_id"], ["orders.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("number"),
        sa.UniqueConstraint("request_id"),
    )
    op.create_index("quotes_page", "quotes", _desc("create_time", "id"))
    op.create_index("quotes_owner_page", "quotes", [sa.literal_column("owner_id"), *_desc("create_time", "id")])
    op.create_index("quotes_team_page", "quotes", [sa.literal_column("team_id"), *_desc("create_time", "id")])
    op.create_index("quotes_opportunity", "quotes", ["opportunity_id"])
    op.create_index("quotes_customer", "quotes", ["customer_id"])
    op.create_index("quotes_state", "quotes", [sa.literal_column("state"), *_desc("create_time")])
    op.create_table(
        "quote_versions",
        sa.Column("quote_id", UUID, nullable=False),
        sa.Column("quote_version", sa.Integer(), nullable=False),
        sa.Column("state", sa.Text(), server_default="draft", nullable=False),
        sa.Column("valid_until", sa.Date(), nullable=False),
        sa.Column("notes", sa.Text(), server_default="", nullable=False),
        sa.Column("subtotal", MONEY, server_default="0", nullable=False),
        sa.Column("discount_total", MONEY, server_default="0", nullable=False),
        sa.Column("tax_total", MONEY, server_default="0", nullable=False),
        sa.Column("total", MONEY, server_default="0", nullable=False),
        sa.Column("send_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["quote_id"], ["quotes.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("quote_id", "quote_version"),
    )
    op.create_table(
        "quote_lines",
        sa.Column("id", UUID, server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("quote_id", UUID, nullable=False),
        sa.Column("quote_version", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("product_id", UUID, nullable=True),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.Column("quantity", QUANTITY, nullable=False),
        sa.Column("unit_price", MONEY, nullable=False),
        sa.Column("discount_percent", PERCENT, server_default="0", nullable=False),
        sa.Column("tax_rate", PERCENT, server_default="0", nullable=False),
        sa.Column("gross_amount", MONEY, nullable=False),
        sa.Column("discount_amount", MONEY, nullable=False),
        sa.Column("amount", MONEY, nullable=False),
        sa.Column("tax_amount", MONEY, nullable=False),
        sa.Column("planned_delivery_date", sa.Date(), nullable=True),
        sa.ForeignKeyConstraint(
            ["quote_id", "quote_version"],
            ["quote_versions.quote_id", "quote_versions.quote_version"],
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(["product_id"], ["products.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("quote_id", "quote_version", "position", name="quote_lines_position"),
    )
    op.create_table(
        "order_deliveries",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("order_id", UUID, nullable=False),
        sa.Column("line_id", UUID, nullable=False),
        sa.Column("quantity", QUANTITY, nullable=False),
        sa.Column("delivery_date", sa.Date(), nullable=False),
        sa.Column("actor", sa.Text(), server_default="", nullable=False),
        sa.Column("record_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["order_id"], ["orders.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["line_id"], ["order_lines.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("order_deliveries_order", "order_deliveries", ["order_id", "id"])
    # The core orders table: one order per quote, and the lists' keyset orders.
    op.create_index(
        "orders_quote", "orders", ["quote_id"], unique=True, postgresql_where=sa.text("quote_id IS NOT NULL")
    )
    op.create_index("orders_owner_page", "orders", [sa.literal_column("owner_id"), *_desc("create_time", "id")])
    op.create_index("orders_team_page", "orders", [sa.literal_column("team_id"), *_desc("create_time", "id")])
    op.create_index("orders_date", "orders", _desc("order_date", "id"))
    op.create_index("orders_opportunity", "orders", ["opportunity_id"])
    op.create_index(
        "order_lines_delivered_late",
        "order_lines",
        ["planned_delivery_date"],
        postgresql_where=sa.text("actual_delivery_date > planned_delivery_date"),
    )


def downgrade() -> None:
    for index, table in (
        ("order_lines_delivered_late", "order_lines"),
        ("orders_opportunity", "orders"),
        ("orders_date", "orders"),
        ("orders_team_page", "orders"),
        ("orders_owner_page", "orders"),
        ("orders_quote", "orders"),
    ):
        op.drop_index(index, table_name=table)
    for table in ("order_deliveries", "quote_lines", "quote_versions", "quotes", "sales_numbers"):
        op.drop_table(table)
