"""The core of sales: teams, the customer projection, catalog and pipelines, leads,
opportunities (lines, history), orders and invoices (sales_svc/tables.py describes them)

Revision ID: 0002
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    op.create_table(
        "customer_refs",
        sa.Column("customer_id", sa.Text(), nullable=False),
        sa.Column("display_name", sa.Text(), server_default="", nullable=False),
        sa.Column("email", sa.Text(), server_default="", nullable=False),
        sa.Column("phone", sa.Text(), server_default="", nullable=False),
        sa.Column("mobile", sa.Text(), server_default="", nullable=False),
        sa.Column("national_id", sa.Text(), server_default="", nullable=False),
        sa.Column("province", sa.Text(), server_default="", nullable=False),
        sa.Column("city", sa.Text(), server_default="", nullable=False),
        sa.Column("acquisition_source", sa.Text(), server_default="", nullable=False),
        sa.Column("merged_into", sa.Text(), server_default="", nullable=False),
        sa.Column("deleted", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("version", sa.Integer(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("customer_id"),
    )
    op.create_index(
        "customer_refs_email", "customer_refs", ["email"], unique=False, postgresql_where=sa.text("email != ''")
    )
    op.create_index(
        "customer_refs_mobile", "customer_refs", ["mobile"], unique=False, postgresql_where=sa.text("mobile != ''")
    )
    op.create_index(
        "customer_refs_national_id",
        "customer_refs",
        ["national_id"],
        unique=False,
        postgresql_where=sa.text("national_id != ''"),
    )
    op.create_index(
        "customer_refs_phone", "customer_refs", ["phone"], unique=False, postgresql_where=sa.text("phone != ''")
    )
    op.create_table(
        "price_lists",
        sa.Column("id", sa.UUID(as_uuid=False), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("currency_code", sa.Text(), nullable=False),
        sa.Column("is_default", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("valid_from", sa.Date(), nullable=True),
        sa.Column("valid_to", sa.Date(), nullable=True),
        sa.Column("active", sa.Boolean(), server_default=sa.true(), nullable=False),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "product_lines",
        sa.Column("id", sa.UUID(as_uuid=False), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("code", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.Column("active", sa.Boolean(), server_default=sa.true(), nullable=False),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("code"),
    )
    op.create_table(
        "teams",
        sa.Column("id", sa.UUID(as_uuid=False), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("manager_id", sa.Text(), server_default="", nullable=False),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_index("teams_manager", "teams", ["manager_id"], unique=False)
    op.create_table(
        "leads",
        sa.Column("id", sa.UUID(as_uuid=False), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("given_name", sa.Text(), server_default="", nullable=False),
        sa.Column("family_name", sa.Text(), server_default="", nullable=False),
        sa.Column("organization_name", sa.Text(), server_default="", nullable=False),
        sa.Column("job_title", sa.Text(), server_default="", nullable=False),
        sa.Column("email", sa.Text(), server_default="", nullable=False),
        sa.Column("phone", sa.Text(), server_default="", nullable=False),
        sa.Column("mobile", sa.Text(), server_default="", nullable=False),
        sa.Column("national_id", sa.Text(), server_default="", nullable=False),
        sa.Column("website", sa.Text(), server_default="", nullable=False),
        sa.Column("industry", sa.Text(), server_default="", nullable=False),
        sa.Column("province", sa.Text(), server_default="", nullable=False),
        sa.Column("city", sa.Text(), server_default="", nullable=False),
        sa.Column("address", sa.Text(), server_default="", nullable=False),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.Column("source", sa.Text(), server_default="", nullable=False),
        sa.Column("campaign_id", sa.Text(), server_default="", nullable=False),
        sa.Column("utm_source", sa.Text(), server_default="", nullable=False),
        sa.Column("utm_medium", sa.Text(), server_default="", nullable=False),
        sa.Column("utm_campaign", sa.Text(), server_default="", nullable=False),
        sa.Column("disqualify_reason", sa.Text(), server_default="", nullable=False),
        sa.Column("owner_id", sa.Text(), server_default="", nullable=False),
        sa.Column("customer_id", sa.Text(), server_default="", nullable=False),
        sa.Column("search_text", sa.Text(), server_default="", nullable=False),
        sa.Column("status", sa.Text(), server_default="new", nullable=False),
        sa.Column("team_id", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("product_line_id", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("score", sa.Integer(), server_default="0", nullable=False),
        sa.Column("tags", postgresql.ARRAY(sa.Text()), server_default="{}", nullable=False),
        sa.Column("opportunity_id", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("assign_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("touch_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("convert_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("request_id", sa.Text(), nullable=True),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("delete_time", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('new', 'contacted', 'qualified', 'converted', 'disqualified')", name="leads_status"
        ),
        sa.ForeignKeyConstraint(
            ["product_line_id"],
            ["product_lines.id"],
        ),
        sa.ForeignKeyConstraint(
            ["team_id"],
            ["teams.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("request_id"),
    )
    op.create_index(
        "leads_customer", "leads", ["customer_id"], unique=False, postgresql_where=sa.text("customer_id != ''")
    )
    op.create_index("leads_email", "leads", ["email"], unique=False, postgresql_where=sa.text("email != ''"))
    op.create_index("leads_mobile", "leads", ["mobile"], unique=False, postgresql_where=sa.text("mobile != ''"))
    op.create_index(
        "leads_national_id", "leads", ["national_id"], unique=False, postgresql_where=sa.text("national_id != ''")
    )
    op.create_index(
        "leads_owner_page",
        "leads",
        ["owner_id", sa.literal_column("create_time DESC"), sa.literal_column("id DESC")],
        unique=False,
    )
    op.create_index(
        "leads_page", "leads", [sa.literal_column("create_time DESC"), sa.literal_column("id DESC")], unique=False
    )
    op.create_index("leads_phone", "leads", ["phone"], unique=False, postgresql_where=sa.text("phone != ''"))
    op.create_index(
        "leads_search",
        "leads",
        ["search_text"],
        unique=False,
        postgresql_using="gin",
        postgresql_ops={"search_text": "gin_trgm_ops"},
    )
    op.create_index(
        "leads_team_page",
        "leads",
        ["team_id", sa.literal_column("create_time DESC"), sa.literal_column("id DESC")],
        unique=False,
    )
    op.create_table(
        "products",
        sa.Column("id", sa.UUID(as_uuid=False), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("sku", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("product_line_id", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("unit", sa.Text(), server_default="unit", nullable=False),
        sa.Column("tax_rate", sa.Numeric(precision=7, scale=4), server_default="10", nullable=False),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.Column("active", sa.Boolean(), server_default=sa.true(), nullable=False),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["product_line_id"],
            ["product_lines.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sku"),
    )
    op.create_index("products_line", "products", ["product_line_id"], unique=False)
    op.create_table(
        "team_members",
        sa.Column("team_id", sa.UUID(as_uuid=False), nullable=False),
        sa.Column("member_id", sa.Text(), nullable=False),
        sa.Column("join_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["team_id"], ["teams.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("team_id", "member_id"),
    )
    op.create_index("team_members_member", "team_members", ["member_id"], unique=False)
    op.create_table(
        "pipelines",
        sa.Column("id", sa.UUID(as_uuid=False), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("product_line_id", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("product_id", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("is_default", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("active", sa.Boolean(), server_default=sa.true(), nullable=False),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["product_id"],
            ["products.id"],
        ),
        sa.ForeignKeyConstraint(
            ["product_line_id"],
            ["product_lines.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "price_list_items",
        sa.Column("price_list_id", sa.UUID(as_uuid=False), nullable=False),
        sa.Column("product_id", sa.UUID(as_uuid=False), nullable=False),
        sa.Column("min_quantity", sa.Numeric(precision=20, scale=6), server_default="1", nullable=False),
        sa.Column("unit_price", sa.Numeric(precision=28, scale=9), nullable=False),
        sa.Column("discount_percent", sa.Numeric(precision=7, scale=4), server_default="0", nullable=False),
        sa.ForeignKeyConstraint(["price_list_id"], ["price_lists.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(
            ["product_id"],
            ["products.id"],
        ),
        sa.PrimaryKeyConstraint("price_list_id", "product_id", "min_quantity"),
    )
    op.create_table(
        "stages",
        sa.Column("id", sa.UUID(as_uuid=False), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("pipeline_id", sa.UUID(as_uuid=False), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), server_default="open", nullable=False),
        sa.Column("probability", sa.Numeric(precision=5, scale=2), nullable=False),
        sa.Column("required_fields", postgresql.ARRAY(sa.Text()), server_default="{}", nullable=False),
        sa.Column("rotting_days", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["pipeline_id"], ["pipelines.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("pipeline_id", "position", deferrable=True, initially="DEFERRED"),
    )
    op.create_table(
        "opportunities",
        sa.Column("id", sa.UUID(as_uuid=False), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("customer_id", sa.Text(), server_default="", nullable=False),
        sa.Column("contact_name", sa.Text(), server_default="", nullable=False),
        sa.Column("lead_id", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("pipeline_id", sa.UUID(as_uuid=False), nullable=False),
        sa.Column("stage_id", sa.UUID(as_uuid=False), nullable=False),
        sa.Column("stage_enter_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("amount", sa.Numeric(precision=28, scale=9), server_default="0", nullable=False),
        sa.Column("amount_from_lines", sa.Boolean(), server_default=sa.true(), nullable=False),
        sa.Column("currency_code", sa.Text(), nullable=False),
        sa.Column("expected_close_date", sa.Date(), nullable=True),
        sa.Column("probability", sa.Numeric(precision=5, scale=2), nullable=False),
        sa.Column("probability_overridden", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("forecast_category", sa.Text(), server_default="pipeline", nullable=False),
        sa.Column("state", sa.Text(), server_default="open", nullable=False),
        sa.Column("close_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("close_reason", sa.Text(), server_default="", nullable=False),
        sa.Column("owner_id", sa.Text(), server_default="", nullable=False),
        sa.Column("team_id", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("product_line_id", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("competitors", postgresql.ARRAY(sa.Text()), server_default="{}", nullable=False),
        sa.Column("next_step", sa.Text(), server_default="", nullable=False),
        sa.Column("source", sa.Text(), server_default="", nullable=False),
        sa.Column("campaign_id", sa.Text(), server_default="", nullable=False),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.Column("search_text", sa.Text(), server_default="", nullable=False),
        sa.Column("request_id", sa.Text(), nullable=True),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("delete_time", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "forecast_category IN ('pipeline', 'best_case', 'commit', 'closed', 'omitted')",
            name="opportunities_category",
        ),
        sa.CheckConstraint("state IN ('open', 'won', 'lost')", name="opportunities_state"),
        sa.ForeignKeyConstraint(
            ["pipeline_id"],
            ["pipelines.id"],
        ),
        sa.ForeignKeyConstraint(
            ["product_line_id"],
            ["product_lines.id"],
        ),
        sa.ForeignKeyConstraint(
            ["stage_id"],
            ["stages.id"],
        ),
        sa.ForeignKeyConstraint(
            ["team_id"],
            ["teams.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("request_id"),
    )
    op.create_index(
        "opportunities_board",
        "opportunities",
        ["pipeline_id", "stage_id"],
        unique=False,
        postgresql_where=sa.text("state = 'open' AND delete_time IS NULL"),
    )
    op.create_index(
        "opportunities_close",
        "opportunities",
        ["expected_close_date"],
        unique=False,
        postgresql_where=sa.text("state = 'open'"),
    )
    op.create_index("opportunities_customer", "opportunities", ["customer_id"], unique=False)
    op.create_index(
        "opportunities_owner_page",
        "opportunities",
        ["owner_id", sa.literal_column("create_time DESC"), sa.literal_column("id DESC")],
        unique=False,
    )
    op.create_index(
        "opportunities_page",
        "opportunities",
        [sa.literal_column("create_time DESC"), sa.literal_column("id DESC")],
        unique=False,
    )
    op.create_index(
        "opportunities_search",
        "opportunities",
        ["search_text"],
        unique=False,
        postgresql_using="gin",
        postgresql_ops={"search_text": "gin_trgm_ops"},
    )
    op.create_index(
        "opportunities_team_page",
        "opportunities",
        ["team_id", sa.literal_column("create_time DESC"), sa.literal_column("id DESC")],
        unique=False,
    )
    op.create_index(
        "opportunities_won", "opportunities", ["close_time"], unique=False, postgresql_where=sa.text("state = 'won'")
    )
    op.create_table(
        "opportunity_history",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("opportunity_id", sa.UUID(as_uuid=False), nullable=False),
        sa.Column("time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("actor", sa.Text(), server_default="", nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("old_value", sa.Text(), server_default="", nullable=False),
        sa.Column("new_value", sa.Text(), server_default="", nullable=False),
        sa.Column("from_stage_id", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("to_stage_id", sa.UUID(as_uuid=False), nullable=True),
        sa.ForeignKeyConstraint(["opportunity_id"], ["opportunities.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("opportunity_history_opportunity", "opportunity_history", ["opportunity_id", "id"], unique=False)
    op.create_table(
        "opportunity_lines",
        sa.Column("id", sa.UUID(as_uuid=False), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("opportunity_id", sa.UUID(as_uuid=False), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("product_id", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.Column("quantity", sa.Numeric(precision=20, scale=6), nullable=False),
        sa.Column("unit_price", sa.Numeric(precision=28, scale=9), nullable=False),
        sa.Column("discount_percent", sa.Numeric(precision=7, scale=4), server_default="0", nullable=False),
        sa.Column("tax_rate", sa.Numeric(precision=7, scale=4), server_default="0", nullable=False),
        sa.Column("amount", sa.Numeric(precision=28, scale=9), nullable=False),
        sa.ForeignKeyConstraint(["opportunity_id"], ["opportunities.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(
            ["product_id"],
            ["products.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("opportunity_lines_opportunity", "opportunity_lines", ["opportunity_id", "position"], unique=False)
    op.create_table(
        "orders",
        sa.Column("id", sa.UUID(as_uuid=False), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("number", sa.Text(), nullable=False),
        sa.Column("opportunity_id", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("quote_id", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("customer_id", sa.Text(), nullable=False),
        sa.Column("owner_id", sa.Text(), server_default="", nullable=False),
        sa.Column("team_id", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("currency_code", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), server_default="open", nullable=False),
        sa.Column("order_date", sa.Date(), nullable=False),
        sa.Column("subtotal", sa.Numeric(precision=28, scale=9), server_default="0", nullable=False),
        sa.Column("discount_total", sa.Numeric(precision=28, scale=9), server_default="0", nullable=False),
        sa.Column("tax_total", sa.Numeric(precision=28, scale=9), server_default="0", nullable=False),
        sa.Column("total", sa.Numeric(precision=28, scale=9), server_default="0", nullable=False),
        sa.Column("cancel_reason", sa.Text(), server_default="", nullable=False),
        sa.Column("request_id", sa.Text(), nullable=True),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["opportunity_id"],
            ["opportunities.id"],
        ),
        sa.ForeignKeyConstraint(
            ["team_id"],
            ["teams.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("number"),
        sa.UniqueConstraint("request_id"),
    )
    op.create_index("orders_customer", "orders", ["customer_id"], unique=False)
    op.create_index(
        "orders_page", "orders", [sa.literal_column("create_time DESC"), sa.literal_column("id DESC")], unique=False
    )
    op.create_table(
        "invoices",
        sa.Column("id", sa.UUID(as_uuid=False), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("kind", sa.Text(), server_default="invoice", nullable=False),
        sa.Column("order_id", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("opportunity_id", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("credited_invoice_id", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("customer_id", sa.Text(), nullable=False),
        sa.Column("owner_id", sa.Text(), server_default="", nullable=False),
        sa.Column("team_id", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("currency_code", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), server_default="draft", nullable=False),
        sa.Column("fiscal_year", sa.Integer(), nullable=True),
        sa.Column("sequence", sa.Integer(), nullable=True),
        sa.Column("number", sa.Text(), server_default="", nullable=False),
        sa.Column("issue_date", sa.Date(), nullable=True),
        sa.Column("due_date", sa.Date(), nullable=True),
        sa.Column("subtotal", sa.Numeric(precision=28, scale=9), server_default="0", nullable=False),
        sa.Column("tax_total", sa.Numeric(precision=28, scale=9), server_default="0", nullable=False),
        sa.Column("total", sa.Numeric(precision=28, scale=9), server_default="0", nullable=False),
        sa.Column("paid_total", sa.Numeric(precision=28, scale=9), server_default="0", nullable=False),
        sa.Column("request_id", sa.Text(), nullable=True),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("kind IN ('invoice', 'credit_note')", name="invoices_kind"),
        sa.ForeignKeyConstraint(
            ["credited_invoice_id"],
            ["invoices.id"],
        ),
        sa.ForeignKeyConstraint(
            ["order_id"],
            ["orders.id"],
        ),
        sa.ForeignKeyConstraint(
            ["team_id"],
            ["teams.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("fiscal_year", "kind", "sequence"),
        sa.UniqueConstraint("request_id"),
    )
    op.create_index("invoices_customer", "invoices", ["customer_id"], unique=False)
    op.create_index(
        "invoices_issued", "invoices", ["issue_date"], unique=False, postgresql_where=sa.text("issue_date IS NOT NULL")
    )
    op.create_index(
        "invoices_page", "invoices", [sa.literal_column("create_time DESC"), sa.literal_column("id DESC")], unique=False
    )
    op.create_table(
        "order_lines",
        sa.Column("id", sa.UUID(as_uuid=False), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("order_id", sa.UUID(as_uuid=False), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("product_id", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.Column("quantity", sa.Numeric(precision=20, scale=6), nullable=False),
        sa.Column("unit_price", sa.Numeric(precision=28, scale=9), nullable=False),
        sa.Column("discount_percent", sa.Numeric(precision=7, scale=4), server_default="0", nullable=False),
        sa.Column("tax_rate", sa.Numeric(precision=7, scale=4), server_default="0", nullable=False),
        sa.Column("amount", sa.Numeric(precision=28, scale=9), nullable=False),
        sa.Column("tax_amount", sa.Numeric(precision=28, scale=9), server_default="0", nullable=False),
        sa.Column("planned_delivery_date", sa.Date(), nullable=True),
        sa.Column("delivered_quantity", sa.Numeric(precision=20, scale=6), server_default="0", nullable=False),
        sa.Column("actual_delivery_date", sa.Date(), nullable=True),
        sa.ForeignKeyConstraint(["order_id"], ["orders.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(
            ["product_id"],
            ["products.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "order_lines_late",
        "order_lines",
        ["planned_delivery_date"],
        unique=False,
        postgresql_where=sa.text("actual_delivery_date IS NULL"),
    )
    op.create_index("order_lines_order", "order_lines", ["order_id", "position"], unique=False)


def downgrade() -> None:
    for table in (
        "invoices",
        "order_lines",
        "orders",
        "opportunity_history",
        "opportunity_lines",
        "opportunities",
        "leads",
        "stages",
        "pipelines",
        "price_list_items",
        "price_lists",
        "products",
        "product_lines",
        "customer_refs",
        "team_members",
        "teams",
    ):
        op.drop_table(table)
