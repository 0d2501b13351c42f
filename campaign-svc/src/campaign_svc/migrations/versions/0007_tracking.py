"""Tracking: web visitors, page events, per-customer web activity, responses
(campaign_svc/tracking_tables.py), and the index first-touch attribution reads invoices by

Revision ID: 0007
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0007"
down_revision = "0006"

UUID = postgresql.UUID(as_uuid=False)
TS = sa.DateTime(timezone=True)


def _text(name: str) -> sa.Column:
    return sa.Column(name, sa.Text(), server_default="", nullable=False)


def upgrade() -> None:
    op.create_table(
        "visitors",
        sa.Column("visitor_id", sa.Text(), primary_key=True),
        _text("customer_id"),
        _text("identified_by"),
        sa.Column("first_seen_time", TS, server_default=sa.text("now()"), nullable=False),
        sa.Column("last_seen_time", TS, server_default=sa.text("now()"), nullable=False),
    )
    op.create_index("visitors_customer", "visitors", ["customer_id"], postgresql_where=sa.text("customer_id <> ''"))
    op.create_table(
        "page_events",
        sa.Column("id", sa.BigInteger(), sa.Identity(), primary_key=True),
        sa.Column("visitor_id", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), server_default="page_view", nullable=False),
        *[
            _text(n)
            for n in (
                "name",
                "url",
                "referrer",
                "title",
                "utm_source",
                "utm_medium",
                "utm_campaign",
                "utm_term",
                "utm_content",
            )
        ],  # fmt: skip
        sa.Column("event_time", TS, nullable=False),
        sa.Column("record_time", TS, server_default=sa.text("now()"), nullable=False),
    )
    op.create_index("page_events_visitor", "page_events", ["visitor_id", "event_time"])
    op.create_table(
        "web_activity",
        sa.Column("customer_id", sa.Text(), primary_key=True),
        sa.Column("page_views", sa.Integer(), server_default="0", nullable=False),
        sa.Column("event_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("first_visit_time", TS),
        sa.Column("last_visit_time", TS),
        _text("last_page"),
    )
    op.create_table(
        "responses",
        sa.Column("id", UUID, server_default=sa.text("gen_random_uuid()"), primary_key=True),
        sa.Column("campaign_id", UUID, sa.ForeignKey("campaigns.id", ondelete="CASCADE"), nullable=False),
        sa.Column("message_id", UUID),
        _text("customer_id"),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("channel", sa.Text(), nullable=False),
        *[
            _text(n)
            for n in (
                "contact_name",
                "email",
                "phone",
                "text",
                "utm_source",
                "utm_medium",
                "utm_campaign",
                "visitor_id",
                "actor",
            )
        ],  # fmt: skip
        sa.Column("request_id", sa.Text(), unique=True),
        sa.Column("create_time", TS, server_default=sa.text("now()"), nullable=False),
    )
    op.create_index("responses_campaign", "responses", ["campaign_id", "create_time", "id"])
    op.create_index(
        "audience_invoices_campaign",
        "audience_invoices",
        ["campaign_id"],
        postgresql_where=sa.text("campaign_id <> ''"),
    )


def downgrade() -> None:
    op.drop_index("audience_invoices_campaign", table_name="audience_invoices")
    op.drop_table("responses")
    op.drop_table("web_activity")
    op.drop_index("page_events_visitor", table_name="page_events")
    op.drop_table("page_events")
    op.drop_index("visitors_customer", table_name="visitors")
    op.drop_table("visitors")
