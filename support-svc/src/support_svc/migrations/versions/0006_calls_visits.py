"""Calls from the PBX (CTI), callbacks for missed calls, field-service visits and the parts
they used (support_svc/calls.py and visits.py describe them). A technician's visits that are
not cancelled never overlap: an exclusion constraint over (technician_id, slot) (btree_gist).

Revision ID: 0006
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS btree_gist")
    op.create_table(
        "calls",
        sa.Column("id", sa.UUID(as_uuid=False), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("pbx", sa.Text(), nullable=False),
        sa.Column("external_id", sa.Text(), nullable=False),
        sa.Column("direction", sa.Text(), nullable=False),
        sa.Column("caller", sa.Text(), server_default="", nullable=False),
        sa.Column("callee", sa.Text(), server_default="", nullable=False),
        sa.Column("number", sa.Text(), server_default="", nullable=False),
        sa.Column("customer_id", sa.Text(), server_default="", nullable=False),
        sa.Column("queue", sa.Text(), server_default="", nullable=False),
        sa.Column("agent_id", sa.Text(), server_default="", nullable=False),
        sa.Column("agent_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("start_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("start_known", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("answer_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("end_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("queue_seconds", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("talk_seconds", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("outcome", sa.Text(), server_default="", nullable=False),
        sa.Column("cause", sa.Text(), server_default="", nullable=False),
        sa.Column("transfer_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("disposition", sa.Text(), server_default="", nullable=False),
        sa.Column("note", sa.Text(), server_default="", nullable=False),
        sa.Column("ticket_id", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("seen", postgresql.ARRAY(sa.Text()), server_default="{}", nullable=False),
        sa.Column("logged", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("direction IN ('inbound', 'outbound')", name="calls_direction"),
        sa.ForeignKeyConstraint(["ticket_id"], ["tickets.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("pbx", "external_id", name="calls_pbx_external"),
    )
    op.create_index(
        "calls_agent_start",
        "calls",
        ["agent_id", sa.literal_column("start_time DESC"), sa.literal_column("id DESC")],
        unique=False,
        postgresql_where=sa.text("agent_id != ''"),
    )
    op.create_index(
        "calls_customer_start",
        "calls",
        ["customer_id", sa.literal_column("start_time DESC"), sa.literal_column("id DESC")],
        unique=False,
        postgresql_where=sa.text("customer_id != ''"),
    )
    op.create_index(
        "calls_start", "calls", [sa.literal_column("start_time DESC"), sa.literal_column("id DESC")], unique=False
    )
    op.create_index("calls_ticket", "calls", ["ticket_id"], unique=False)
    op.create_table(
        "visits",
        sa.Column("id", sa.UUID(as_uuid=False), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("ticket_id", sa.UUID(as_uuid=False), nullable=False),
        sa.Column("customer_id", sa.Text(), server_default="", nullable=False),
        sa.Column("technician_id", sa.Text(), nullable=False),
        sa.Column("start_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("travel_minutes", sa.Integer(), server_default="0", nullable=False),
        sa.Column("work_minutes", sa.Integer(), nullable=False),
        sa.Column("slot", postgresql.TSTZRANGE(), nullable=False),
        sa.Column("address", sa.Text(), server_default="", nullable=False),
        sa.Column("note", sa.Text(), server_default="", nullable=False),
        sa.Column("state", sa.Text(), server_default="booked", nullable=False),
        sa.Column("cancel_reason", sa.Text(), server_default="", nullable=False),
        sa.Column("outcome", sa.Text(), server_default="", nullable=False),
        sa.Column("actual_work_minutes", sa.Integer(), server_default="0", nullable=False),
        sa.Column("signer_name", sa.Text(), server_default="", nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=True),
        sa.Column("signature_content_type", sa.Text(), server_default="", nullable=False),
        sa.Column("sign_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("complete_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancel_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("booked_by", sa.Text(), server_default="", nullable=False),
        sa.Column("request_id", sa.Text(), nullable=True),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("state IN ('booked', 'completed', 'cancelled')", name="visits_state"),
        sa.CheckConstraint("travel_minutes BETWEEN 0 AND 600", name="visits_travel"),
        sa.CheckConstraint("work_minutes BETWEEN 1 AND 1440", name="visits_work"),
        sa.ForeignKeyConstraint(
            ["technician_id"],
            ["agents.id"],
        ),
        sa.ForeignKeyConstraint(["ticket_id"], ["tickets.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.execute(
        "ALTER TABLE visits ADD CONSTRAINT visits_no_overlap "
        "EXCLUDE USING gist (technician_id WITH =, slot WITH &&) WHERE (state <> 'cancelled')"
    )
    op.create_index(
        "visits_request_id", "visits", ["request_id"], unique=True, postgresql_where=sa.text("request_id IS NOT NULL")
    )
    op.create_index("visits_start", "visits", ["start_time", "id"], unique=False)
    op.create_index("visits_technician_start", "visits", ["technician_id", "start_time", "id"], unique=False)
    op.create_index("visits_ticket", "visits", ["ticket_id"], unique=False)
    op.create_table(
        "callbacks",
        sa.Column("id", sa.UUID(as_uuid=False), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("number", sa.Text(), nullable=False),
        sa.Column("customer_id", sa.Text(), server_default="", nullable=False),
        sa.Column("call_id", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("queue", sa.Text(), server_default="", nullable=False),
        sa.Column("missed_count", sa.Integer(), server_default="1", nullable=False),
        sa.Column("due_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("state", sa.Text(), server_default="open", nullable=False),
        sa.Column("assignee_id", sa.Text(), server_default="", nullable=False),
        sa.Column("outcome", sa.Text(), server_default="", nullable=False),
        sa.Column("note", sa.Text(), server_default="", nullable=False),
        sa.Column("completed_by", sa.Text(), server_default="", nullable=False),
        sa.Column("complete_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("state IN ('open', 'done')", name="callbacks_state"),
        sa.ForeignKeyConstraint(["call_id"], ["calls.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("callbacks_call", "callbacks", ["call_id"], unique=False)
    op.create_index("callbacks_due", "callbacks", ["due_time", "id"], unique=False)
    op.create_index(
        "callbacks_open_number", "callbacks", ["number"], unique=True, postgresql_where=sa.text("state = 'open'")
    )
    op.create_table(
        "visit_parts",
        sa.Column("visit_id", sa.UUID(as_uuid=False), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("sku", sa.Text(), server_default="", nullable=False),
        sa.Column("name", sa.Text(), server_default="", nullable=False),
        sa.Column("quantity", sa.Integer(), nullable=False),
        sa.CheckConstraint("quantity > 0", name="visit_parts_quantity"),
        sa.ForeignKeyConstraint(["visit_id"], ["visits.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("visit_id", "position"),
    )


def downgrade() -> None:
    op.drop_table("visit_parts")
    op.drop_table("callbacks")
    op.drop_table("visits")
    op.drop_table("calls")
