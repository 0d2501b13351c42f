"""Routing: ticket_offers (one live offer per ticket; the history of every offer)

Revision ID: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    op.create_table(
        "ticket_offers",
        sa.Column("id", sa.UUID(as_uuid=False), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("ticket_id", sa.UUID(as_uuid=False), nullable=False),
        sa.Column("agent_id", sa.Text(), nullable=False),
        sa.Column("team_id", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("strategy", sa.Text(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("state", sa.Text(), server_default="offered", nullable=False),
        sa.Column("reason", sa.Text(), server_default="", nullable=False),
        sa.Column("offer_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("expire_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("answer_time", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "state IN ('offered', 'accepted', 'declined', 'expired', 'withdrawn')", name="ticket_offers_state"
        ),
        sa.ForeignKeyConstraint(["agent_id"], ["agents.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["team_id"], ["teams.id"], ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["ticket_id"], ["tickets.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ticket_offers_live", "ticket_offers", ["ticket_id"], unique=True, postgresql_where=sa.text("state = 'offered'")
    )
    op.create_index(
        "ticket_offers_ticket", "ticket_offers", ["ticket_id", sa.text("offer_time DESC"), sa.text("id DESC")]
    )
    op.create_index(
        "ticket_offers_agent", "ticket_offers", ["agent_id", sa.text("offer_time DESC"), sa.text("id DESC")]
    )
    op.create_index(
        "ticket_offers_agent_live", "ticket_offers", ["agent_id"], postgresql_where=sa.text("state = 'offered'")
    )


def downgrade() -> None:
    op.drop_table("ticket_offers")
