"""Activities: calls, meetings, tasks and e-mails about a lead, an opportunity or a customer,
with their agenda indexes (sales_svc/activities.py)

Revision ID: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"

UUID = sa.UUID(as_uuid=False)


def upgrade() -> None:
    op.create_table(
        "activities",
        sa.Column("id", UUID, server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.Column("regarding", sa.Text(), nullable=False),
        sa.Column("lead_id", UUID, nullable=True),
        sa.Column("opportunity_id", UUID, nullable=True),
        sa.Column("customer_id", sa.Text(), server_default="", nullable=False),
        sa.Column("owner_id", sa.Text(), nullable=False),
        sa.Column("team_id", UUID, sa.ForeignKey("teams.id"), nullable=True),
        sa.Column("due_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("remind_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("duration_seconds", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("outcome", sa.Text(), server_default="", nullable=False),
        sa.Column("direction", sa.Text(), server_default="", nullable=False),
        sa.Column("done", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("complete_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("creator", sa.Text(), server_default="", nullable=False),
        sa.Column("request_id", sa.Text(), nullable=True),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("request_id"),
        sa.CheckConstraint("kind IN ('call', 'meeting', 'task', 'email')", name="activities_kind"),
        sa.CheckConstraint("direction IN ('', 'inbound', 'outbound')", name="activities_direction"),
        sa.CheckConstraint("num_nonnulls(lead_id, opportunity_id) <= 1", name="activities_one_regarding"),
        sa.CheckConstraint("remind_time IS NULL OR remind_time <= due_time", name="activities_remind_before_due"),
    )
    op.create_index("activities_page", "activities", [sa.text("create_time DESC"), sa.text("id DESC")])
    op.create_index(
        "activities_owner_page", "activities", ["owner_id", sa.text("create_time DESC"), sa.text("id DESC")]
    )
    op.create_index("activities_team_page", "activities", ["team_id", sa.text("create_time DESC"), sa.text("id DESC")])
    op.create_index(
        "activities_regarding_page", "activities", ["regarding", sa.text("create_time DESC"), sa.text("id DESC")]
    )
    op.create_index(
        "activities_customer_page",
        "activities",
        ["customer_id", sa.text("create_time DESC"), sa.text("id DESC")],
        postgresql_where=sa.text("customer_id != ''"),
    )
    op.create_index(
        "activities_agenda_open", "activities", ["owner_id", "due_time", "id"], postgresql_where=sa.text("NOT done")
    )
    op.create_index("activities_agenda", "activities", ["owner_id", "due_time", "id"])


def downgrade() -> None:
    op.drop_table("activities")
