"""The core of support: the customer projection, calendars, teams and agents, categories,
tickets with their state intervals, messages and attachments (support_svc/tables.py describes them)

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
        "agents",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("display_name", sa.Text(), nullable=False),
        sa.Column("email", sa.Text(), server_default="", nullable=False),
        sa.Column("skills", postgresql.ARRAY(sa.Text()), server_default="{}", nullable=False),
        sa.Column("languages", postgresql.ARRAY(sa.Text()), server_default="{fa}", nullable=False),
        sa.Column("capacity", sa.Integer(), server_default="10", nullable=False),
        sa.Column("presence", sa.Text(), server_default="offline", nullable=False),
        sa.Column("presence_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("busy_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("after_call_work_seconds", sa.Integer(), server_default="60", nullable=False),
        sa.Column("active", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "calendars",
        sa.Column("id", sa.UUID(as_uuid=False), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("timezone", sa.Text(), server_default="Asia/Tehran", nullable=False),
        sa.Column("weekly_hours", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("holiday_country", sa.Text(), server_default="IR", nullable=False),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "channel_weights",
        sa.Column("channel", sa.Text(), nullable=False),
        sa.Column("weight", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("channel"),
    )
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
        sa.Column("rank", sa.Text(), server_default="", nullable=False),
        sa.Column("address", sa.Text(), server_default="", nullable=False),
        sa.Column("fax", sa.Text(), server_default="", nullable=False),
        sa.Column("merged_into", sa.Text(), server_default="", nullable=False),
        sa.Column("deleted", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("version", sa.Integer(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("customer_id"),
        info={"extra": ("rank", "address", "fax")},
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
        "calendar_days",
        sa.Column("calendar_id", sa.UUID(as_uuid=False), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("ranges", postgresql.JSONB(astext_type=sa.Text()), server_default="[]", nullable=False),
        sa.Column("name", sa.Text(), server_default="", nullable=False),
        sa.ForeignKeyConstraint(["calendar_id"], ["calendars.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("calendar_id", "day"),
    )
    op.create_table(
        "teams",
        sa.Column("id", sa.UUID(as_uuid=False), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.Column("manager_id", sa.Text(), server_default="", nullable=False),
        sa.Column("calendar_id", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("strategy", sa.Text(), server_default="round_robin", nullable=False),
        sa.Column("offer_timeout_seconds", sa.Integer(), server_default="120", nullable=False),
        sa.Column("rr_cursor", sa.Text(), server_default="", nullable=False),
        sa.Column("email_address", sa.Text(), server_default="", nullable=False),
        sa.Column("active", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["calendar_id"],
            ["calendars.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "categories",
        sa.Column("id", sa.UUID(as_uuid=False), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("display_name", sa.Text(), nullable=False),
        sa.Column("complaint", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("skill", sa.Text(), server_default="", nullable=False),
        sa.Column("team_id", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("active", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["team_id"],
            ["teams.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key"),
    )
    op.create_table(
        "team_members",
        sa.Column("team_id", sa.UUID(as_uuid=False), nullable=False),
        sa.Column("agent_id", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["agent_id"], ["agents.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["team_id"], ["teams.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("team_id", "agent_id"),
    )
    op.create_index("team_members_agent", "team_members", ["agent_id"], unique=False)
    op.create_table(
        "tickets",
        sa.Column("id", sa.UUID(as_uuid=False), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("number", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("customer_id", sa.Text(), server_default="", nullable=False),
        sa.Column("channel", sa.Text(), nullable=False),
        sa.Column("contact_address", sa.Text(), server_default="", nullable=False),
        sa.Column("contact_name", sa.Text(), server_default="", nullable=False),
        sa.Column("category_id", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("complaint", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("priority", sa.Text(), server_default="normal", nullable=False),
        sa.Column("product", sa.Text(), server_default="", nullable=False),
        sa.Column("order_ref", sa.Text(), server_default="", nullable=False),
        sa.Column("team_id", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("assignee_id", sa.Text(), server_default="", nullable=False),
        sa.Column("state", sa.Text(), server_default="new", nullable=False),
        sa.Column("tags", postgresql.ARRAY(sa.Text()), server_default="{}", nullable=False),
        sa.Column("custom_fields", postgresql.JSONB(astext_type=sa.Text()), server_default="{}", nullable=False),
        sa.Column("language", sa.Text(), server_default="fa", nullable=False),
        sa.Column("exchange_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("message_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("awaiting_reply", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("first_response_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_customer_message_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_agent_message_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resolve_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("close_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("search_text", sa.Text(), server_default="", nullable=False),
        sa.Column("request_id", sa.Text(), server_default="", nullable=False),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["category_id"],
            ["categories.id"],
        ),
        sa.ForeignKeyConstraint(
            ["team_id"],
            ["teams.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("number"),
    )
    op.create_index(
        "tickets_assignee_open",
        "tickets",
        ["assignee_id"],
        unique=False,
        postgresql_where=sa.text("(state NOT IN ('resolved', 'closed'))"),
    )
    op.create_index(
        "tickets_create", "tickets", [sa.literal_column("create_time DESC"), sa.literal_column("id DESC")], unique=False
    )
    op.create_index("tickets_customer", "tickets", ["customer_id", sa.literal_column("create_time DESC")], unique=False)
    op.create_index(
        "tickets_request_id", "tickets", ["request_id"], unique=True, postgresql_where=sa.text("request_id != ''")
    )
    op.create_index(
        "tickets_search_trgm",
        "tickets",
        ["search_text"],
        unique=False,
        postgresql_using="gin",
        postgresql_ops={"search_text": "gin_trgm_ops"},
    )
    op.create_index("tickets_state_team", "tickets", ["team_id", "state"], unique=False)
    op.create_table(
        "ticket_intervals",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("ticket_id", sa.UUID(as_uuid=False), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("start_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("end_time", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["ticket_id"], ["tickets.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ticket_intervals_ticket", "ticket_intervals", ["ticket_id", "start_time"], unique=False)
    op.create_table(
        "ticket_messages",
        sa.Column("id", sa.UUID(as_uuid=False), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("ticket_id", sa.UUID(as_uuid=False), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("author", sa.Text(), server_default="", nullable=False),
        sa.Column("body", sa.Text(), server_default="", nullable=False),
        sa.Column("channel", sa.Text(), nullable=False),
        sa.Column("external_id", sa.Text(), server_default="", nullable=False),
        sa.Column("delivery", sa.Text(), server_default="", nullable=False),
        sa.Column("delivery_error", sa.Text(), server_default="", nullable=False),
        sa.Column("headers", postgresql.JSONB(astext_type=sa.Text()), server_default="{}", nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["ticket_id"], ["tickets.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ticket_messages_external",
        "ticket_messages",
        ["channel", "external_id"],
        unique=True,
        postgresql_where=sa.text("external_id != ''"),
    )
    op.create_index("ticket_messages_ticket", "ticket_messages", ["ticket_id", "create_time"], unique=False)
    op.create_table(
        "attachments",
        sa.Column("id", sa.UUID(as_uuid=False), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("message_id", sa.UUID(as_uuid=False), nullable=False),
        sa.Column("filename", sa.Text(), nullable=False),
        sa.Column("content_type", sa.Text(), server_default="application/octet-stream", nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["message_id"], ["ticket_messages.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("attachments_message", "attachments", ["message_id"], unique=False)
    op.bulk_insert(
        sa.table("channel_weights", sa.column("channel"), sa.column("weight")),
        [
            {"channel": "phone", "weight": 5},
            {"channel": "telegram", "weight": 2},
            {"channel": "bale", "weight": 2},
            {"channel": "web", "weight": 1},
            {"channel": "email", "weight": 1},
            {"channel": "fax", "weight": 1},
            {"channel": "agent", "weight": 1},
        ],
    )
    op.bulk_insert(
        sa.table("categories", sa.column("key"), sa.column("display_name"), sa.column("complaint")),
        [
            {"key": "complaint", "display_name": "شکایت", "complaint": True},
            {"key": "question", "display_name": "پرسش", "complaint": False},
            {"key": "technical", "display_name": "پشتیبانی فنی", "complaint": False},
            {"key": "billing", "display_name": "مالی و صورتحساب", "complaint": False},
            {"key": "request", "display_name": "درخواست خدمت", "complaint": False},
        ],
    )


def downgrade() -> None:
    for table in (
        "attachments",
        "ticket_messages",
        "ticket_intervals",
        "tickets",
        "categories",
        "channel_weights",
        "team_members",
        "agents",
        "teams",
        "calendar_days",
        "calendars",
        "customer_refs",
    ):
        op.drop_table(table)
