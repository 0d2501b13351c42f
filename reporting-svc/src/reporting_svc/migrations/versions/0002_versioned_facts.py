"""customer facts follow updates and deletes (version-guarded against out-of-order events)

Revision ID: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.add_column("customer_source_facts", sa.Column("deleted", sa.Boolean, nullable=False, server_default=sa.false()))
    op.add_column("customer_source_facts", sa.Column("version", sa.Integer, nullable=False, server_default="0"))


def downgrade() -> None:
    op.drop_column("customer_source_facts", "version")
    op.drop_column("customer_source_facts", "deleted")
