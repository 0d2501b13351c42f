"""Teams, lead scoring and lead assignment: teams.request_id (idempotent CreateTeam), scoring
rules, assignment rules and their round-robin cursors, lead behaviour (rules_tables.py)

Revision ID: 0009
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0009"
down_revision = "0008"

UUID = postgresql.UUID(as_uuid=False)


def _times() -> list[sa.Column]:
    return [
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
    ]


def upgrade() -> None:
    op.add_column("teams", sa.Column("request_id", sa.Text(), nullable=True))
    op.create_unique_constraint("teams_request_id_key", "teams", ["request_id"])
    op.create_table(
        "scoring_rules",
        sa.Column("id", UUID, server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("display_name", sa.Text(), nullable=False),
        sa.Column("active", sa.Boolean(), server_default=sa.true(), nullable=False),
        sa.Column("points", sa.Integer(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("filter", sa.Text(), server_default="", nullable=False),
        sa.Column("event_kind", sa.Text(), server_default="", nullable=False),
        sa.Column("min_count", sa.Integer(), server_default="1", nullable=False),
        sa.Column("window_days", sa.Integer(), server_default="0", nullable=False),
        sa.Column("cap", sa.Integer(), server_default="1", nullable=False),
        sa.Column("request_id", sa.Text(), nullable=True),
        *_times(),
        sa.CheckConstraint("kind IN ('profile', 'behavior')", name="scoring_rules_kind"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("request_id"),
    )
    op.create_index(
        "scoring_rules_page",
        "scoring_rules",
        [sa.literal_column("create_time DESC"), sa.literal_column("id DESC")],
    )
    op.create_table(
        "assignment_rules",
        sa.Column("id", UUID, server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("display_name", sa.Text(), nullable=False),
        sa.Column("position", sa.Integer(), server_default="0", nullable=False),
        sa.Column("active", sa.Boolean(), server_default=sa.true(), nullable=False),
        sa.Column("provinces", postgresql.ARRAY(sa.Text()), server_default="{}", nullable=False),
        sa.Column("cities", postgresql.ARRAY(sa.Text()), server_default="{}", nullable=False),
        sa.Column("sources", postgresql.ARRAY(sa.Text()), server_default="{}", nullable=False),
        sa.Column("product_line_ids", postgresql.ARRAY(UUID), server_default="{}", nullable=False),
        sa.Column("strategy", sa.Text(), nullable=False),
        sa.Column("team_id", UUID, nullable=True),
        sa.Column("owner_id", sa.Text(), server_default="", nullable=False),
        sa.Column("untouched_hours", sa.Numeric(10, 4), server_default="0", nullable=False),
        sa.Column("request_id", sa.Text(), nullable=True),
        *_times(),
        sa.CheckConstraint(
            "strategy IN ('round_robin', 'least_open', 'fixed_owner')", name="assignment_rules_strategy"
        ),
        sa.ForeignKeyConstraint(["team_id"], ["teams.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("request_id"),
    )
    op.create_index("assignment_rules_order", "assignment_rules", ["position", "create_time", "id"])
    op.create_index("assignment_rules_team", "assignment_rules", ["team_id"])
    op.create_table(
        "assignment_cursors",
        sa.Column("rule_id", UUID, nullable=False),
        sa.Column("last_member", sa.Text(), server_default="", nullable=False),
        sa.Column("turns", sa.BigInteger(), server_default="0", nullable=False),
        sa.ForeignKeyConstraint(["rule_id"], ["assignment_rules.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("rule_id"),
    )
    op.create_table(
        "lead_behaviors",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("lead_id", UUID, nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("idempotency_key", sa.Text(), nullable=True),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["lead_id"], ["leads.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("lead_id", "idempotency_key", name="lead_behaviors_key"),
    )
    op.create_index("lead_behaviors_lead", "lead_behaviors", ["lead_id", "kind", "time"])


def downgrade() -> None:
    for table in ("lead_behaviors", "assignment_cursors", "assignment_rules", "scoring_rules"):
        op.drop_table(table)
    op.drop_constraint("teams_request_id_key", "teams")
    op.drop_column("teams", "request_id")
