"""The core of campaign-svc: the audience projection and its facts (orders, invoices,
opportunities, tickets), campaigns and their messages, the consent ledger, consent state and
suppressions (campaign_svc/tables.py describes them)

Revision ID: 0002
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.create_table(
        "audience",
        sa.Column("customer_id", sa.Text(), nullable=False),
        sa.Column("display_name", sa.Text(), server_default="", nullable=False),
        sa.Column("email", sa.Text(), server_default="", nullable=False),
        sa.Column("phone", sa.Text(), server_default="", nullable=False),
        sa.Column("mobile", sa.Text(), server_default="", nullable=False),
        sa.Column("national_id", sa.Text(), server_default="", nullable=False),
        sa.Column("province", sa.Text(), server_default="", nullable=False),
        sa.Column("city", sa.Text(), server_default="", nullable=False),
        sa.Column("acquisition_source", sa.Text(), server_default="", nullable=False),
        sa.Column("type", sa.Text(), server_default="", nullable=False),
        sa.Column("kind", sa.Text(), server_default="", nullable=False),
        sa.Column("gender", sa.Text(), server_default="", nullable=False),
        sa.Column("lifecycle_stage", sa.Text(), server_default="", nullable=False),
        sa.Column("education_degree", sa.Text(), server_default="", nullable=False),
        sa.Column("birth_date", sa.Date(), nullable=True),
        sa.Column("acquisition_date", sa.Date(), nullable=True),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("groups", postgresql.ARRAY(sa.Text()), server_default="{}", nullable=False),
        sa.Column("tags", postgresql.ARRAY(sa.Text()), server_default="{}", nullable=False),
        sa.Column("rank", sa.Text(), server_default="", nullable=False),
        sa.Column("industry", sa.Text(), server_default="", nullable=False),
        sa.Column("country", sa.Text(), server_default="", nullable=False),
        sa.Column("owner", sa.Text(), server_default="", nullable=False),
        sa.Column("merged_into", sa.Text(), server_default="", nullable=False),
        sa.Column("deleted", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("version", sa.Integer(), server_default="0", nullable=False),
        sa.Column("order_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("open_opportunities", sa.Integer(), server_default="0", nullable=False),
        sa.Column("won_opportunities", sa.Integer(), server_default="0", nullable=False),
        sa.Column("ticket_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("complaint_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("revenue", sa.Numeric(precision=18, scale=2), server_default="0", nullable=False),
        sa.Column("first_purchase_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_purchase_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_ticket_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_complaint_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_activity_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("email_consent", sa.Text(), server_default="", nullable=False),
        sa.Column("sms_consent", sa.Text(), server_default="", nullable=False),
        sa.Column("behaviour_time", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("customer_id"),
        info={
            "extra": (
                "type",
                "kind",
                "gender",
                "lifecycle_stage",
                "education_degree",
                "birth_date",
                "acquisition_date",
                "create_time",
                "groups",
                "tags",
                "rank",
                "industry",
                "country",
                "owner",
            )
        },
    )
    op.create_index("audience_email", "audience", ["email"], unique=False, postgresql_where=sa.text("email != ''"))
    op.create_index("audience_mobile", "audience", ["mobile"], unique=False, postgresql_where=sa.text("mobile != ''"))
    op.create_index(
        "audience_national_id", "audience", ["national_id"], unique=False, postgresql_where=sa.text("national_id != ''")
    )
    op.create_index("audience_phone", "audience", ["phone"], unique=False, postgresql_where=sa.text("phone != ''"))
    op.create_table(
        "audience_invoices",
        sa.Column("invoice_id", sa.Text(), nullable=False),
        sa.Column("customer_id", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), server_default="", nullable=False),
        sa.Column("state", sa.Text(), server_default="", nullable=False),
        sa.Column("order_id", sa.Text(), server_default="", nullable=False),
        sa.Column("credited_invoice", sa.Text(), server_default="", nullable=False),
        sa.Column("total", sa.Numeric(precision=18, scale=2), server_default="0", nullable=False),
        sa.Column("paid_total", sa.Numeric(precision=18, scale=2), server_default="0", nullable=False),
        sa.Column("currency", sa.Text(), server_default="", nullable=False),
        sa.Column("issue_date", sa.Date(), nullable=True),
        sa.Column("paid_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("campaign_id", sa.Text(), server_default="", nullable=False),
        sa.Column("source", sa.Text(), server_default="", nullable=False),
        sa.Column("products", postgresql.ARRAY(sa.Text()), server_default="{}", nullable=False),
        sa.Column("event_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("invoice_id"),
    )
    op.create_index(op.f("ix_audience_invoices_customer_id"), "audience_invoices", ["customer_id"], unique=False)
    op.create_table(
        "audience_opportunities",
        sa.Column("opportunity_id", sa.Text(), nullable=False),
        sa.Column("customer_id", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), server_default="", nullable=False),
        sa.Column("version", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("event_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("opportunity_id"),
    )
    op.create_index(
        op.f("ix_audience_opportunities_customer_id"), "audience_opportunities", ["customer_id"], unique=False
    )
    op.create_table(
        "audience_orders",
        sa.Column("order_id", sa.Text(), nullable=False),
        sa.Column("customer_id", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), server_default="", nullable=False),
        sa.Column("total", sa.Numeric(precision=18, scale=2), server_default="0", nullable=False),
        sa.Column("currency", sa.Text(), server_default="", nullable=False),
        sa.Column("order_date", sa.Date(), nullable=True),
        sa.Column("placed_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("campaign_id", sa.Text(), server_default="", nullable=False),
        sa.Column("source", sa.Text(), server_default="", nullable=False),
        sa.Column("products", postgresql.ARRAY(sa.Text()), server_default="{}", nullable=False),
        sa.Column("event_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("order_id"),
    )
    op.create_index(op.f("ix_audience_orders_customer_id"), "audience_orders", ["customer_id"], unique=False)
    op.create_table(
        "audience_tickets",
        sa.Column("ticket_id", sa.Text(), nullable=False),
        sa.Column("customer_id", sa.Text(), nullable=False),
        sa.Column("complaint", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("state", sa.Text(), server_default="", nullable=False),
        sa.Column("open_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("version", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("event_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("ticket_id"),
    )
    op.create_index(op.f("ix_audience_tickets_customer_id"), "audience_tickets", ["customer_id"], unique=False)
    op.create_table(
        "campaigns",
        sa.Column("id", sa.UUID(as_uuid=False), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("display_name", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.Column("channel", sa.Text(), nullable=False),
        sa.Column("purpose", sa.Text(), server_default="marketing", nullable=False),
        sa.Column("state", sa.Text(), server_default="draft", nullable=False),
        sa.Column("segment_id", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("exclude_segment_ids", postgresql.ARRAY(sa.Text()), server_default="{}", nullable=False),
        sa.Column("start_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cron", sa.Text(), server_default="", nullable=False),
        sa.Column("timezone", sa.Text(), server_default="Asia/Tehran", nullable=False),
        sa.Column("run", sa.Integer(), server_default="0", nullable=False),
        sa.Column("goal_kind", sa.Text(), server_default="", nullable=False),
        sa.Column("goal_target", sa.Numeric(precision=18, scale=2), server_default="0", nullable=False),
        sa.Column("cost", sa.Numeric(precision=18, scale=2), server_default="0", nullable=False),
        sa.Column("currency", sa.Text(), server_default="IRR", nullable=False),
        sa.Column("attribution_days", sa.Integer(), server_default="30", nullable=False),
        sa.Column("cloned_from", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("launch_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("complete_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("owner", sa.Text(), server_default="", nullable=False),
        sa.Column("request_id", sa.Text(), nullable=True),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("request_id"),
    )
    op.create_table(
        "consent_ledger",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("channel", sa.Text(), nullable=False),
        sa.Column("address", sa.Text(), nullable=False),
        sa.Column("purpose", sa.Text(), server_default="marketing", nullable=False),
        sa.Column("customer_id", sa.Text(), server_default="", nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("text_version", sa.Text(), server_default="", nullable=False),
        sa.Column("proof", postgresql.JSONB(astext_type=sa.Text()), server_default="{}", nullable=False),
        sa.Column("actor", sa.Text(), server_default="", nullable=False),
        sa.Column("occur_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("record_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        info={"personal": ("address", "proof")},
    )
    op.create_index("consent_ledger_address", "consent_ledger", ["channel", "address", "id"], unique=False)
    op.create_index(
        "consent_ledger_customer",
        "consent_ledger",
        ["customer_id"],
        unique=False,
        postgresql_where=sa.text("customer_id != ''"),
    )
    op.create_table(
        "consent_state",
        sa.Column("channel", sa.Text(), nullable=False),
        sa.Column("address", sa.Text(), nullable=False),
        sa.Column("purpose", sa.Text(), nullable=False),
        sa.Column("customer_id", sa.Text(), server_default="", nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("ledger_id", sa.BigInteger(), nullable=False),
        sa.Column("source", sa.Text(), server_default="", nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("channel", "address", "purpose"),
        info={"personal": ("address",)},
    )
    op.create_index(
        "consent_state_customer",
        "consent_state",
        ["customer_id"],
        unique=False,
        postgresql_where=sa.text("customer_id != ''"),
    )
    op.create_table(
        "suppressions",
        sa.Column("channel", sa.Text(), nullable=False),
        sa.Column("address", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("detail", sa.Text(), server_default="", nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("channel", "address"),
        info={"personal": ("address",)},
    )
    op.create_table(
        "messages",
        sa.Column("id", sa.UUID(as_uuid=False), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("campaign_id", sa.UUID(as_uuid=False), nullable=False),
        sa.Column("run", sa.Integer(), server_default="1", nullable=False),
        sa.Column("variant", sa.Text(), server_default="", nullable=False),
        sa.Column("customer_id", sa.Text(), nullable=False),
        sa.Column("channel", sa.Text(), nullable=False),
        sa.Column("address", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), server_default="queued", nullable=False),
        sa.Column("not_before", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("provider", sa.Text(), server_default="", nullable=False),
        sa.Column("provider_message_id", sa.Text(), server_default="", nullable=False),
        sa.Column("error", sa.Text(), server_default="", nullable=False),
        sa.Column("bounce_kind", sa.Text(), server_default="", nullable=False),
        sa.Column("queued_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("sent_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("delivered_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("bounced_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("opened_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("clicked_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("responded_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("unsubscribed_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("open_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("click_count", sa.Integer(), server_default="0", nullable=False),
        sa.ForeignKeyConstraint(["campaign_id"], ["campaigns.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("campaign_id", "run", "customer_id", name="messages_one_per_run"),
        info={"personal": ("address",)},
    )
    op.create_index("messages_customer", "messages", ["customer_id", "sent_time"], unique=False)
    op.create_index(
        "messages_due", "messages", ["not_before"], unique=False, postgresql_where=sa.text("state = 'queued'")
    )
    op.create_index(
        "messages_provider_id",
        "messages",
        ["provider_message_id"],
        unique=False,
        postgresql_where=sa.text("provider_message_id != ''"),
    )


def downgrade() -> None:
    op.drop_table("messages")
    op.drop_table("suppressions")
    op.drop_table("consent_state")
    op.drop_table("consent_ledger")
    op.drop_table("campaigns")
    op.drop_table("audience_tickets")
    op.drop_table("audience_orders")
    op.drop_table("audience_opportunities")
    op.drop_table("audience_invoices")
    op.drop_table("audience")
