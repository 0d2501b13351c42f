"""The core tables of sales-svc (SQLAlchemy Core), shared by every part of the service.

Parts that need tables of their own (activities, quotes, invoices, forecasts, ...) define them in
their own module on this `metadata`, and each table is created by a migration (never by
create_all). Money is NUMERIC(28, 9) beside a currency code (crm.type.v1.Money's units + nanos,
exactly); probabilities are NUMERIC(5, 2) percentages; people are token subjects (TEXT).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from crm_chassis import customer_refs as refs
from crm_chassis.columns import UUID, id_column, text_column, times

metadata = sa.MetaData()
MONEY = sa.Numeric(28, 9)
PERCENT = sa.Numeric(7, 4)  # 0..100 with four decimals: discounts, tax rates
QUANTITY = sa.Numeric(20, 6)


_id, _text, _times = id_column, text_column, times


# --- teams: who manages whom (record-level access, access.py) ---
teams = sa.Table(
    "teams",
    metadata,
    _id(),
    sa.Column("name", sa.Text, nullable=False, unique=True),
    _text("manager_id"),  # the manager's subject; sees the team's records
    _text("description"),
    *_times(),
    sa.Column("request_id", sa.Text, unique=True),  # idempotent create (added by 0009_lead_rules)
)
sa.Index("teams_manager", teams.c.manager_id)

team_members = sa.Table(
    "team_members",
    metadata,
    sa.Column("team_id", UUID, sa.ForeignKey("teams.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("member_id", sa.Text, primary_key=True),  # a subject
    sa.Column("join_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)
sa.Index("team_members_member", team_members.c.member_id)

# --- customers as customer-svc's events describe them (never a call per row) ---
customer_refs = refs.define(metadata)  # customer-svc's customers, from its events

# --- catalog: product lines, products, price lists, pipelines and stages ---
product_lines = sa.Table(
    "product_lines",
    metadata,
    _id(),
    sa.Column("code", sa.Text, nullable=False, unique=True),
    sa.Column("name", sa.Text, nullable=False),
    _text("description"),
    sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
    *_times(),
)

products = sa.Table(
    "products",
    metadata,
    _id(),
    sa.Column("sku", sa.Text, nullable=False, unique=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("product_line_id", UUID, sa.ForeignKey("product_lines.id")),
    sa.Column("unit", sa.Text, nullable=False, server_default="unit"),
    sa.Column("tax_rate", PERCENT, nullable=False, server_default="10"),  # VAT %, Iran's default 10
    _text("description"),
    sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
    _text("search_name"),  # persian.normalize'd name and SKU, for the name filter (catalog, 0005)
    *_times(),
)
sa.Index("products_line", products.c.product_line_id)

price_lists = sa.Table(
    "price_lists",
    metadata,
    _id(),
    sa.Column("name", sa.Text, nullable=False, unique=True),
    sa.Column("currency_code", sa.Text, nullable=False),
    sa.Column("is_default", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("valid_from", sa.Date),
    sa.Column("valid_to", sa.Date),
    sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
    *_times(),
)

price_list_items = sa.Table(
    "price_list_items",
    metadata,
    sa.Column("price_list_id", UUID, sa.ForeignKey("price_lists.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("product_id", UUID, sa.ForeignKey("products.id"), primary_key=True),
    sa.Column("min_quantity", QUANTITY, primary_key=True, server_default="1"),
    sa.Column("unit_price", MONEY, nullable=False),
    sa.Column("discount_percent", PERCENT, nullable=False, server_default="0"),
)

pipelines = sa.Table(
    "pipelines",
    metadata,
    _id(),
    sa.Column("name", sa.Text, nullable=False, unique=True),
    sa.Column("product_line_id", UUID, sa.ForeignKey("product_lines.id")),  # pipeline per product line
    sa.Column("product_id", UUID, sa.ForeignKey("products.id")),  # or per product
    sa.Column("is_default", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
    *_times(),
)

stages = sa.Table(
    "stages",
    metadata,
    _id(),
    sa.Column("pipeline_id", UUID, sa.ForeignKey("pipelines.id", ondelete="CASCADE"), nullable=False),
    sa.Column("position", sa.Integer, nullable=False),  # order within the pipeline, 0-based
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("kind", sa.Text, nullable=False, server_default="open"),  # open | won | lost
    sa.Column("probability", sa.Numeric(5, 2), nullable=False),  # default probability, 0..100
    sa.Column("required_fields", pg.ARRAY(sa.Text), nullable=False, server_default="{}"),  # to enter it
    sa.Column("rotting_days", sa.Integer),  # an opportunity idle longer in it is rotting
    sa.UniqueConstraint("pipeline_id", "position", deferrable=True, initially="DEFERRED"),
)

# --- leads ---
LEAD_STATUSES = ("new", "contacted", "qualified", "converted", "disqualified")
leads = sa.Table(
    "leads",
    metadata,
    _id(),
    *(
        _text(n)
        for n in (
            "given_name",
            "family_name",
            "organization_name",
            "job_title",
            "email",  # lower-cased
            "phone",  # E.164
            "mobile",  # E.164
            "national_id",
            "website",
            "industry",
            "province",
            "city",
            "address",
            "description",
            "source",  # acquisition source key (customer-svc's managed list)
            "campaign_id",
            "utm_source",
            "utm_medium",
            "utm_campaign",
            "disqualify_reason",  # key of a managed disqualification reason
            "owner_id",
            "customer_id",  # linked or created customer (customer-svc id)
            "search_text",  # persian.normalize'd words
        )
    ),
    sa.Column("status", sa.Text, nullable=False, server_default="new"),
    sa.Column("team_id", UUID, sa.ForeignKey("teams.id")),
    sa.Column("product_line_id", UUID, sa.ForeignKey("product_lines.id")),  # what the lead wants
    sa.Column("score", sa.Integer, nullable=False, server_default="0"),
    sa.Column("tags", pg.ARRAY(sa.Text), nullable=False, server_default="{}"),
    sa.Column("opportunity_id", UUID),
    sa.Column("assign_time", sa.DateTime(timezone=True)),  # when the current owner got it
    sa.Column("touch_time", sa.DateTime(timezone=True)),  # the owner's last action on it
    sa.Column("convert_time", sa.DateTime(timezone=True)),
    sa.Column("request_id", sa.Text, unique=True),  # idempotent create
    *_times(deletable=True),
    sa.CheckConstraint(f"status IN {LEAD_STATUSES!r}", name="leads_status"),
)
sa.Index("leads_owner_page", leads.c.owner_id, leads.c.create_time.desc(), leads.c.id.desc())
sa.Index("leads_team_page", leads.c.team_id, leads.c.create_time.desc(), leads.c.id.desc())
sa.Index("leads_page", leads.c.create_time.desc(), leads.c.id.desc())
sa.Index("leads_search", leads.c.search_text, postgresql_using="gin", postgresql_ops={"search_text": "gin_trgm_ops"})
for _c in ("email", "phone", "mobile", "national_id"):
    sa.Index(f"leads_{_c}", leads.c[_c], postgresql_where=leads.c[_c] != "")
sa.Index("leads_customer", leads.c.customer_id, postgresql_where=leads.c.customer_id != "")

# --- opportunities ---
FORECAST_CATEGORIES = ("pipeline", "best_case", "commit", "closed", "omitted")
OPPORTUNITY_STATES = ("open", "won", "lost")
opportunities = sa.Table(
    "opportunities",
    metadata,
    _id(),
    sa.Column("name", sa.Text, nullable=False),
    _text("customer_id"),
    _text("contact_name"),  # the contact person at the customer
    sa.Column("lead_id", UUID),
    sa.Column("pipeline_id", UUID, sa.ForeignKey("pipelines.id"), nullable=False),
    sa.Column("stage_id", UUID, sa.ForeignKey("stages.id"), nullable=False),
    sa.Column("stage_enter_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("amount", MONEY, nullable=False, server_default="0"),
    sa.Column("amount_from_lines", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("currency_code", sa.Text, nullable=False),
    sa.Column("expected_close_date", sa.Date),
    sa.Column("probability", sa.Numeric(5, 2), nullable=False),
    sa.Column("probability_overridden", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("forecast_category", sa.Text, nullable=False, server_default="pipeline"),
    sa.Column("state", sa.Text, nullable=False, server_default="open"),
    sa.Column("close_time", sa.DateTime(timezone=True)),
    _text("close_reason"),
    _text("owner_id"),
    sa.Column("team_id", UUID, sa.ForeignKey("teams.id")),
    sa.Column("product_line_id", UUID, sa.ForeignKey("product_lines.id")),
    sa.Column("competitors", pg.ARRAY(sa.Text), nullable=False, server_default="{}"),
    _text("next_step"),
    _text("source"),  # acquisition source, from the lead
    _text("campaign_id"),
    _text("description"),
    _text("search_text"),
    sa.Column("request_id", sa.Text, unique=True),
    *_times(deletable=True),
    sa.CheckConstraint(f"forecast_category IN {FORECAST_CATEGORIES!r}", name="opportunities_category"),
    sa.CheckConstraint(f"state IN {OPPORTUNITY_STATES!r}", name="opportunities_state"),
)
sa.Index(  # the board's rotting counts and narrow scopes' cards (0012; replaced "opportunities_board")
    "opportunities_board_owner",
    opportunities.c.pipeline_id,
    opportunities.c.stage_id,
    opportunities.c.owner_id,
    opportunities.c.stage_enter_time,
    postgresql_include=["team_id", "product_line_id", "amount", "currency_code", "probability", "id"],
    postgresql_where=sa.and_(opportunities.c.state == "open", opportunities.c.delete_time.is_(None)),
)
sa.Index(
    "opportunities_owner_page", opportunities.c.owner_id, opportunities.c.create_time.desc(), opportunities.c.id.desc()
)
sa.Index(
    "opportunities_team_page", opportunities.c.team_id, opportunities.c.create_time.desc(), opportunities.c.id.desc()
)
sa.Index("opportunities_page", opportunities.c.create_time.desc(), opportunities.c.id.desc())
sa.Index("opportunities_customer", opportunities.c.customer_id)
sa.Index("opportunities_close", opportunities.c.expected_close_date, postgresql_where=opportunities.c.state == "open")
sa.Index("opportunities_won", opportunities.c.close_time, postgresql_where=opportunities.c.state == "won")
sa.Index(
    "opportunities_search",
    opportunities.c.search_text,
    postgresql_using="gin",
    postgresql_ops={"search_text": "gin_trgm_ops"},
)

# The pipeline board's counts and sums: the open, not deleted opportunities per key, kept exact by
# the trigger opportunities_board_rollup (migration 0012; never written by the service itself).
opportunity_board_rollup = sa.Table(
    "opportunity_board_rollup",
    metadata,
    sa.Column("pipeline_id", UUID, nullable=False),
    sa.Column("stage_id", UUID, nullable=False),
    sa.Column("owner_id", sa.Text, nullable=False),
    sa.Column("team_id", UUID),
    sa.Column("product_line_id", UUID),
    sa.Column("currency_code", sa.Text, nullable=False),
    sa.Column("open_count", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("amount", sa.Numeric, nullable=False, server_default="0"),  # Σ amount
    sa.Column("weighted_amount", sa.Numeric, nullable=False, server_default="0"),  # Σ amount × probability / 100
)
sa.Index(
    "opportunity_board_rollup_key",
    *(
        opportunity_board_rollup.c[c]
        for c in ("pipeline_id", "stage_id", "owner_id", "team_id", "product_line_id", "currency_code")
    ),
    unique=True,
    postgresql_nulls_not_distinct=True,
)

opportunity_lines = sa.Table(
    "opportunity_lines",
    metadata,
    _id(),
    sa.Column("opportunity_id", UUID, sa.ForeignKey("opportunities.id", ondelete="CASCADE"), nullable=False),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("product_id", UUID, sa.ForeignKey("products.id")),
    _text("description"),
    sa.Column("quantity", QUANTITY, nullable=False),
    sa.Column("unit_price", MONEY, nullable=False),
    sa.Column("discount_percent", PERCENT, nullable=False, server_default="0"),
    sa.Column("tax_rate", PERCENT, nullable=False, server_default="0"),
    sa.Column("amount", MONEY, nullable=False),  # quantity × unit price − discount, before tax
)
sa.Index("opportunity_lines_opportunity", opportunity_lines.c.opportunity_id, opportunity_lines.c.position)

# Every stage move, amount and close-date change, probability and state change: to see deals slip.
opportunity_history = sa.Table(
    "opportunity_history",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("opportunity_id", UUID, sa.ForeignKey("opportunities.id", ondelete="CASCADE"), nullable=False),
    sa.Column("time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    _text("actor"),
    sa.Column("kind", sa.Text, nullable=False),  # stage | amount | close_date | probability | state | owner
    _text("old_value"),
    _text("new_value"),
    sa.Column("from_stage_id", UUID),
    sa.Column("to_stage_id", UUID),
)
sa.Index("opportunity_history_opportunity", opportunity_history.c.opportunity_id, opportunity_history.c.id)

# --- orders and invoices: the core that quotes, invoicing and forecasts share ---
orders = sa.Table(
    "orders",
    metadata,
    _id(),
    sa.Column("number", sa.Text, nullable=False, unique=True),
    sa.Column("opportunity_id", UUID, sa.ForeignKey("opportunities.id")),
    sa.Column("quote_id", UUID),
    sa.Column("customer_id", sa.Text, nullable=False),
    _text("owner_id"),
    sa.Column("team_id", UUID, sa.ForeignKey("teams.id")),
    sa.Column("currency_code", sa.Text, nullable=False),
    sa.Column(
        "state", sa.Text, nullable=False, server_default="open"
    ),  # open | partially_delivered | delivered | cancelled
    sa.Column("order_date", sa.Date, nullable=False),
    sa.Column("subtotal", MONEY, nullable=False, server_default="0"),
    sa.Column("discount_total", MONEY, nullable=False, server_default="0"),
    sa.Column("tax_total", MONEY, nullable=False, server_default="0"),
    sa.Column("total", MONEY, nullable=False, server_default="0"),
    _text("cancel_reason"),
    sa.Column("request_id", sa.Text, unique=True),
    *_times(),
)
sa.Index("orders_customer", orders.c.customer_id)
sa.Index("orders_page", orders.c.create_time.desc(), orders.c.id.desc())

order_lines = sa.Table(
    "order_lines",
    metadata,
    _id(),
    sa.Column("order_id", UUID, sa.ForeignKey("orders.id", ondelete="CASCADE"), nullable=False),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("product_id", UUID, sa.ForeignKey("products.id")),
    _text("description"),
    sa.Column("quantity", QUANTITY, nullable=False),
    sa.Column("unit_price", MONEY, nullable=False),
    sa.Column("discount_percent", PERCENT, nullable=False, server_default="0"),
    sa.Column("tax_rate", PERCENT, nullable=False, server_default="0"),
    sa.Column("amount", MONEY, nullable=False),  # net of discount, before tax
    sa.Column("tax_amount", MONEY, nullable=False, server_default="0"),
    sa.Column("planned_delivery_date", sa.Date),
    sa.Column("delivered_quantity", QUANTITY, nullable=False, server_default="0"),
    sa.Column("actual_delivery_date", sa.Date),  # when the last of it was delivered
)
sa.Index("order_lines_order", order_lines.c.order_id, order_lines.c.position)
sa.Index(
    "order_lines_late",
    order_lines.c.planned_delivery_date,
    postgresql_where=order_lines.c.actual_delivery_date.is_(None),
)

INVOICE_KINDS = ("invoice", "credit_note")
invoices = sa.Table(
    "invoices",
    metadata,
    _id(),
    sa.Column("kind", sa.Text, nullable=False, server_default="invoice"),
    sa.Column("order_id", UUID, sa.ForeignKey("orders.id")),
    sa.Column("opportunity_id", UUID),
    sa.Column("credited_invoice_id", UUID, sa.ForeignKey("invoices.id")),  # a credit note's invoice
    sa.Column("customer_id", sa.Text, nullable=False),
    _text("owner_id"),
    sa.Column("team_id", UUID, sa.ForeignKey("teams.id")),
    sa.Column("currency_code", sa.Text, nullable=False),
    # draft | issued | partially_paid | paid | overdue | cancelled
    sa.Column("state", sa.Text, nullable=False, server_default="draft"),
    sa.Column("fiscal_year", sa.Integer),  # Jalali year of issue; with sequence, set at issue
    sa.Column("sequence", sa.Integer),  # gapless within (fiscal_year, kind)
    _text("number"),  # formatted, e.g. 1405-000123
    sa.Column("issue_date", sa.Date),
    sa.Column("due_date", sa.Date),
    sa.Column("subtotal", MONEY, nullable=False, server_default="0"),
    sa.Column("tax_total", MONEY, nullable=False, server_default="0"),
    sa.Column("total", MONEY, nullable=False, server_default="0"),
    sa.Column("paid_total", MONEY, nullable=False, server_default="0"),
    sa.Column("request_id", sa.Text, unique=True),
    *_times(),
    sa.UniqueConstraint("fiscal_year", "kind", "sequence"),
    sa.CheckConstraint(f"kind IN {INVOICE_KINDS!r}", name="invoices_kind"),
)
sa.Index("invoices_customer", invoices.c.customer_id)
sa.Index("invoices_issued", invoices.c.issue_date, postgresql_where=invoices.c.issue_date.is_not(None))
sa.Index("invoices_page", invoices.c.create_time.desc(), invoices.c.id.desc())

# Tables whose customer_id follows a merge (customer.merged re-points them to the survivor).
CUSTOMER_REFERENCES = [leads, opportunities, orders, invoices]
