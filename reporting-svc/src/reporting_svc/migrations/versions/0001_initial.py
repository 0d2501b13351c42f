"""customer_source_facts, outbox, inbox

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

from crm_chassis.messaging.tables import create_messaging_tables

revision = "0001"
down_revision = None


def upgrade() -> None:
    create_messaging_tables(op)
    op.create_table(
        "customer_source_facts",
        sa.Column("customer_id", sa.Text, primary_key=True),
        sa.Column("acquisition_source", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("customer_source_facts_created", "customer_source_facts", ["created_at", "acquisition_source"])


def downgrade() -> None:
    op.drop_table("customer_source_facts")
    op.drop_table("inbox")
    op.drop_table("outbox")
