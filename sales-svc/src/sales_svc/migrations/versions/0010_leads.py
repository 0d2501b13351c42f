"""Leads: the managed list of disqualification reasons (seeded), and the indexes the lead lists
filter and sort by (status, score, source, campaign)

Revision ID: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"

SEED = [
    ("no_budget", "بودجه ندارد"),
    ("no_need", "نیازی ندارد"),
    ("competitor", "رقیب را انتخاب کرد"),
    ("unreachable", "در دسترس نیست"),
    ("duplicate", "تکراری"),
    ("spam", "هرزنامه"),
]


def upgrade() -> None:
    reasons = op.create_table(
        "disqualify_reasons",
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("active", sa.Boolean(), server_default=sa.true(), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.bulk_insert(reasons, [{"key": k, "title": t} for k, t in SEED])
    op.create_index(
        "leads_status_page",
        "leads",
        ["status", sa.literal_column("create_time DESC"), sa.literal_column("id DESC")],
    )
    op.create_index("leads_score_page", "leads", [sa.literal_column("score DESC"), sa.literal_column("id DESC")])
    op.create_index(  # a rep's leads by score ("my hottest leads")
        "leads_owner_score", "leads", ["owner_id", sa.literal_column("score DESC"), sa.literal_column("id DESC")]
    )
    op.create_index("leads_source", "leads", ["source"], postgresql_where=sa.text("source != ''"))
    op.create_index("leads_campaign", "leads", ["campaign_id"], postgresql_where=sa.text("campaign_id != ''"))


def downgrade() -> None:
    for index in ("leads_campaign", "leads_source", "leads_owner_score", "leads_score_page", "leads_status_page"):
        op.drop_index(index, table_name="leads")
    op.drop_table("disqualify_reasons")
