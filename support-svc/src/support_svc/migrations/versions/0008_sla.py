"""SLA: policies (conditions, business-minute targets, warning, breach actions) and each
ticket's SLA state (policy, due times, warned/breached/met flags, business seconds) — see
support_svc/sla.py

Revision ID: 0008
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0008"
down_revision = "0007"


def upgrade() -> None:
    op.create_table(
        "sla_policies",
        sa.Column("id", sa.UUID(as_uuid=False), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("display_name", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.Column("position", sa.Integer(), server_default="0", nullable=False),
        sa.Column("priorities", postgresql.ARRAY(sa.Text()), server_default="{}", nullable=False),
        sa.Column("category_ids", postgresql.ARRAY(sa.UUID(as_uuid=False)), server_default="{}", nullable=False),
        sa.Column("ranks", postgresql.ARRAY(sa.Text()), server_default="{}", nullable=False),
        sa.Column("first_response_minutes", sa.Integer(), server_default="0", nullable=False),
        sa.Column("next_response_minutes", sa.Integer(), server_default="0", nullable=False),
        sa.Column("resolution_minutes", sa.Integer(), server_default="0", nullable=False),
        sa.Column("warning_before_minutes", sa.Integer(), server_default="0", nullable=False),
        sa.Column("breach_actions", postgresql.ARRAY(sa.Text()), server_default="{}", nullable=False),
        sa.Column("active", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("creator", sa.Text(), server_default="", nullable=False),
        sa.Column("request_id", sa.Text(), server_default="", nullable=False),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("display_name"),
    )
    op.create_index(
        "sla_policies_precedence",
        "sla_policies",
        ["position", "create_time", "id"],
        unique=False,
        postgresql_where=sa.text("active"),
    )
    op.create_index(
        "sla_policies_request_id",
        "sla_policies",
        ["request_id"],
        unique=True,
        postgresql_where=sa.text("request_id != ''"),
    )
    op.create_table(
        "ticket_sla",
        sa.Column("ticket_id", sa.UUID(as_uuid=False), nullable=False),
        sa.Column("policy_id", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("first_response_due", sa.DateTime(timezone=True), nullable=True),
        sa.Column("next_response_due", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resolution_due", sa.DateTime(timezone=True), nullable=True),
        sa.Column("next_response_start", sa.DateTime(timezone=True), nullable=True),
        sa.Column("first_response_warned", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("first_response_breached", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("next_response_warned", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("next_response_breached", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("resolution_warned", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("resolution_breached", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("first_response_met", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("resolution_met", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("first_response_seconds", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("next_response_seconds", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("resolution_seconds", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("computed_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["policy_id"],
            ["sla_policies.id"],
        ),
        sa.ForeignKeyConstraint(["ticket_id"], ["tickets.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("ticket_id"),
    )
    op.create_index("ticket_sla_policy", "ticket_sla", ["policy_id"], unique=False)


def downgrade() -> None:
    op.drop_table("ticket_sla")
    op.drop_table("sla_policies")
