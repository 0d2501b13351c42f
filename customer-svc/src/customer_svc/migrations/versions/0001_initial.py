"""customers, outbox, inbox

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

from crm_chassis.messaging.tables import create_messaging_tables

revision = "0001"
down_revision = None


def upgrade() -> None:
    create_messaging_tables(op)
    op.create_table(
        "customers",
        sa.Column("id", pg.UUID(as_uuid=False), primary_key=True, server_default=sa.text("gen_random_uuid()")),
        sa.Column("type", sa.SmallInteger, nullable=False),
        sa.Column("given_name", sa.Text, nullable=False, server_default=""),
        sa.Column("family_name", sa.Text, nullable=False, server_default=""),
        sa.Column("organization_name", sa.Text, nullable=False, server_default=""),
        sa.Column("display_name", sa.Text, nullable=False),
        sa.Column("email", sa.Text, nullable=False, server_default=""),
        sa.Column("phone", sa.Text, nullable=False, server_default=""),
        sa.Column("acquisition_source", sa.Text, nullable=False, server_default=""),
        sa.Column("request_id", sa.Text, unique=True),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("version", sa.Integer, nullable=False, server_default="1"),
    )
    # Keyset pagination walks this index: newest first, id breaks ties.
    op.create_index("customers_create_time_id", "customers", [sa.text("create_time DESC"), sa.text("id DESC")])


def downgrade() -> None:
    op.drop_table("customers")
    op.drop_table("inbox")
    op.drop_table("outbox")
