"""The messenger channels and the web form: messenger_chats (one row per chat that wrote to a
bot: who, phone, customer, the ticket its messages go to), webform_submissions (each accepted
form), and a partial index on undelivered replies per channel (support_svc/messengers.py,
channels_api.py)

Revision ID: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0003"


def upgrade() -> None:
    op.create_table(
        "messenger_chats",
        sa.Column("provider", sa.Text(), nullable=False),
        sa.Column("chat_id", sa.Text(), nullable=False),
        sa.Column("user_id", sa.Text(), server_default="", nullable=False),
        sa.Column("username", sa.Text(), server_default="", nullable=False),
        sa.Column("display_name", sa.Text(), server_default="", nullable=False),
        sa.Column("phone", sa.Text(), server_default="", nullable=False),
        sa.Column("customer_id", sa.Text(), server_default="", nullable=False),
        sa.Column("last_ticket_id", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("last_command_message_id", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["last_ticket_id"], ["tickets.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("provider", "chat_id"),
    )
    op.create_index("messenger_chats_last_ticket", "messenger_chats", ["last_ticket_id"], unique=False)
    op.create_table(
        "webform_submissions",
        sa.Column("id", sa.UUID(as_uuid=False), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("ticket_id", sa.UUID(as_uuid=False), nullable=False),
        sa.Column("site_key", sa.Text(), server_default="", nullable=False),
        sa.Column("client_address", sa.Text(), server_default="", nullable=False),
        sa.Column("email", sa.Text(), server_default="", nullable=False),
        sa.Column("phone", sa.Text(), server_default="", nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["ticket_id"], ["tickets.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("webform_submissions_create", "webform_submissions", ["create_time"], unique=False)
    op.create_index("webform_submissions_ticket", "webform_submissions", ["ticket_id"], unique=False)
    op.create_index(
        "ticket_messages_undelivered",
        "ticket_messages",
        ["channel", "delivery"],
        unique=False,
        postgresql_where=sa.text("delivery IN ('pending', 'failed')"),
    )


def downgrade() -> None:
    op.drop_index("ticket_messages_undelivered", table_name="ticket_messages")
    op.drop_table("webform_submissions")
    op.drop_table("messenger_chats")
