"""Campaigns: A/B variants (campaign_variants), throttling, quiet hours, the frequency cap
switch, and the delivery columns of messages (time zone, lease) with their indexes

Revision ID: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    for name, type_, default in (
        ("test_percent", sa.Integer(), "0"),
        ("winner_metric", sa.Text(), ""),
        ("winner_wait_hours", sa.Integer(), "24"),
        ("winner_variant", sa.Text(), ""),
        ("throttle_per_second", sa.Integer(), "0"),
        ("quiet_start_hour", sa.Integer(), "22"),
        ("quiet_end_hour", sa.Integer(), "8"),
        ("ignore_frequency_cap", sa.Boolean(), sa.false()),
    ):
        op.add_column("campaigns", sa.Column(name, type_, server_default=default, nullable=False))
    op.add_column("messages", sa.Column("timezone", sa.Text(), server_default="Asia/Tehran", nullable=False))
    op.add_column("messages", sa.Column("lease_until", sa.TIMESTAMP(timezone=True)))
    op.create_index("messages_sending", "messages", ["lease_until"], postgresql_where=sa.text("state = 'sending'"))
    op.create_index("messages_campaign", "messages", ["campaign_id", "run", "state"])
    op.create_table(
        "campaign_variants",
        sa.Column(
            "campaign_id", sa.UUID(as_uuid=False), sa.ForeignKey("campaigns.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("template_id", sa.Text(), nullable=False),
        sa.Column("template_version", sa.Integer(), nullable=False),
        sa.Column("weight", sa.Integer(), server_default="1", nullable=False),
        sa.PrimaryKeyConstraint("campaign_id", "key"),
    )


def downgrade() -> None:
    op.drop_table("campaign_variants")
    op.drop_index("messages_campaign", table_name="messages")
    op.drop_index("messages_sending", table_name="messages")
    for name in ("lease_until", "timezone"):
        op.drop_column("messages", name)
    for name in (
        "ignore_frequency_cap",
        "quiet_end_hour",
        "quiet_start_hour",
        "throttle_per_second",
        "winner_variant",
        "winner_wait_hours",
        "winner_metric",
        "test_percent",
    ):
        op.drop_column("campaigns", name)
