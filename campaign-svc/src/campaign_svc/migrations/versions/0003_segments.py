"""Segments: definitions, materialised membership, and audience indexes for segment filters
(campaign_svc/segments_tables.py describes them)

Revision ID: 0003
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"

LIVE = "NOT deleted AND merged_into = ''"
INDEXES = {
    "audience_seg_province": (["province", "last_purchase_time"], None),  # INCLUDE (city, order_count)
    "audience_seg_last_purchase": (["last_purchase_time"], None),
    "audience_seg_last_activity": (["last_activity_time"], None),
    "audience_seg_create_time": (["create_time"], None),
    "audience_seg_tags": (["tags"], "gin"),
    "audience_seg_groups": (["groups"], "gin"),
}


def upgrade() -> None:
    op.create_table(
        "segments",
        sa.Column("id", sa.UUID(as_uuid=False), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("display_name", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("filter", sa.Text(), server_default="", nullable=False),
        sa.Column("include_ids", postgresql.ARRAY(sa.Text()), server_default="{}", nullable=False),
        sa.Column("include_all", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("exclude_ids", postgresql.ARRAY(sa.Text()), server_default="{}", nullable=False),
        sa.Column("relative", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("depth", sa.Integer(), server_default="0", nullable=False),
        sa.Column("member_count", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("rebuild_job", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("rebuild_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("evaluated_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("creator", sa.Text(), server_default="", nullable=False),
        sa.Column("request_id", sa.Text(), nullable=True),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("display_name"),
        sa.UniqueConstraint("request_id"),
    )
    op.create_table(
        "segment_members",
        sa.Column("segment_id", sa.UUID(as_uuid=False), nullable=False),
        sa.Column("customer_id", sa.Text(), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("source", sa.Text(), server_default="filter", nullable=False),
        sa.PrimaryKeyConstraint("segment_id", "customer_id"),
    )
    for name, (cols, using) in INDEXES.items():
        op.create_index(
            name,
            "audience",
            cols,
            postgresql_where=sa.text(LIVE),
            **({"postgresql_using": using} if using else {}),
            **({"postgresql_include": ["city", "order_count"]} if name == "audience_seg_province" else {}),
        )


def downgrade() -> None:
    for name in INDEXES:
        op.drop_index(name, table_name="audience")
    op.drop_table("segment_members")
    op.drop_table("segments")
