"""ConvertLead's durable step record (sales_svc/conversion.py)

Revision ID: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.create_table(
        "lead_conversions",
        sa.Column("lead_id", sa.UUID(as_uuid=False), sa.ForeignKey("leads.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("state", sa.Text(), server_default="pending", nullable=False),
        sa.Column("customer_id", sa.Text(), server_default="", nullable=False),
        sa.Column("customer_created", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("opportunity_id", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("requested_by", sa.Text(), server_default="", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_error", sa.Text(), server_default="", nullable=False),
        sa.Column("start_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("done_time", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("lead_conversions")
