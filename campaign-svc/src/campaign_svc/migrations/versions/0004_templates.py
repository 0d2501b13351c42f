"""Message templates and their immutable versions (campaign_svc/templates_tables.py)

Revision ID: 0004
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"

UUID = postgresql.UUID(as_uuid=False)
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "templates",
        sa.Column("id", UUID, server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("display_name", sa.Text(), nullable=False),
        sa.Column("channel", sa.Text(), nullable=False),
        sa.Column("subject", sa.Text(), server_default="", nullable=False),
        sa.Column("html_body", sa.Text(), server_default="", nullable=False),
        sa.Column("text_body", sa.Text(), server_default="", nullable=False),
        sa.Column("language", sa.Text(), server_default="fa", nullable=False),
        sa.Column("direction", sa.Text(), server_default="rtl", nullable=False),
        sa.Column("current_version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("creator", sa.Text(), server_default="", nullable=False),
        sa.Column("request_id", sa.Text(), nullable=True),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("create_time", TS, server_default=sa.text("now()"), nullable=False),
        sa.Column("update_time", TS, server_default=sa.text("now()"), nullable=False),
        sa.Column("delete_time", TS, nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "templates_page",
        "templates",
        [sa.text("update_time DESC"), sa.text("id DESC")],
        postgresql_where=sa.text("delete_time IS NULL"),
    )
    op.create_index(
        "templates_request_id",
        "templates",
        ["request_id"],
        unique=True,
        postgresql_where=sa.text("request_id IS NOT NULL"),
    )
    op.create_table(
        "template_versions",
        sa.Column("template_id", UUID, nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("channel", sa.Text(), nullable=False),
        sa.Column("subject", sa.Text(), server_default="", nullable=False),
        sa.Column("html_body", sa.Text(), server_default="", nullable=False),
        sa.Column("text_body", sa.Text(), server_default="", nullable=False),
        sa.Column("language", sa.Text(), nullable=False),
        sa.Column("direction", sa.Text(), nullable=False),
        sa.Column("creator", sa.Text(), server_default="", nullable=False),
        sa.Column("create_time", TS, server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["template_id"], ["templates.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("template_id", "version"),
    )


def downgrade() -> None:
    op.drop_table("template_versions")
    op.drop_index("templates_request_id", table_name="templates")
    op.drop_index("templates_page", table_name="templates")
    op.drop_table("templates")
