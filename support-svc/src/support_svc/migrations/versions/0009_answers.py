"""Canned answers (reply templates) and the knowledge base: categories, articles with their
search columns (normalised text, a generated tsvector with a GIN index, a pg_trgm index) and one
rating per reader (support_svc/answers.py and knowledge.py describe them)

Revision ID: 0009
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0009"
down_revision = "0008"


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    op.create_table(
        "canned_answers",
        sa.Column("id", sa.UUID(as_uuid=False), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("category_ids", postgresql.ARRAY(sa.UUID(as_uuid=False)), server_default="{}", nullable=False),
        sa.Column("language", sa.Text(), server_default="fa", nullable=False),
        sa.Column("tags", postgresql.ARRAY(sa.Text()), server_default="{}", nullable=False),
        sa.Column("active", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("usage_count", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("last_use_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("creator", sa.Text(), server_default="", nullable=False),
        sa.Column("request_id", sa.Text(), nullable=True),
        sa.Column("search_title", sa.Text(), server_default="", nullable=False),
        sa.Column("search_text", sa.Text(), server_default="", nullable=False),
        sa.Column(
            "search_vector",
            postgresql.TSVECTOR(),
            sa.Computed(
                "setweight(to_tsvector('simple'::regconfig, search_title), 'A') || setweight(to_tsvector('simple'::regconfig, search_text), 'D')",
                persisted=True,
            ),
            nullable=False,
        ),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "canned_answers_categories", "canned_answers", ["category_ids"], unique=False, postgresql_using="gin"
    )
    op.create_index(
        "canned_answers_page",
        "canned_answers",
        [sa.literal_column("create_time DESC"), sa.literal_column("id DESC")],
        unique=False,
    )
    op.create_index(
        "canned_answers_request_id",
        "canned_answers",
        ["request_id"],
        unique=True,
        postgresql_where=sa.text("request_id IS NOT NULL"),
    )
    op.create_index("canned_answers_search", "canned_answers", ["search_vector"], unique=False, postgresql_using="gin")
    op.create_index(
        "canned_answers_search_trgm",
        "canned_answers",
        ["search_text"],
        unique=False,
        postgresql_using="gin",
        postgresql_ops={"search_text": "gin_trgm_ops"},
    )
    op.create_table(
        "kb_categories",
        sa.Column("id", sa.UUID(as_uuid=False), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("display_name", sa.Text(), nullable=False),
        sa.Column("name_key", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.Column("parent_id", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("position", sa.Integer(), server_default="0", nullable=False),
        sa.Column("ticket_category_ids", postgresql.ARRAY(sa.UUID(as_uuid=False)), server_default="{}", nullable=False),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["parent_id"],
            ["kb_categories.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "kb_categories_name",
        "kb_categories",
        [sa.literal_column("coalesce(parent_id, '00000000-0000-0000-0000-000000000000'::uuid)"), "name_key"],
        unique=True,
    )
    op.create_index("kb_categories_page", "kb_categories", ["position", "name_key", "id"], unique=False)
    op.create_index("kb_categories_parent", "kb_categories", ["parent_id"], unique=False)
    op.create_table(
        "kb_articles",
        sa.Column("id", sa.UUID(as_uuid=False), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("body", sa.Text(), server_default="", nullable=False),
        sa.Column("format", sa.Text(), server_default="markdown", nullable=False),
        sa.Column("category_id", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("state", sa.Text(), server_default="draft", nullable=False),
        sa.Column("language", sa.Text(), server_default="fa", nullable=False),
        sa.Column("tags", postgresql.ARRAY(sa.Text()), server_default="{}", nullable=False),
        sa.Column("search_title", sa.Text(), server_default="", nullable=False),
        sa.Column("search_text", sa.Text(), server_default="", nullable=False),
        sa.Column(
            "search_vector",
            postgresql.TSVECTOR(),
            sa.Computed(
                "setweight(to_tsvector('simple'::regconfig, search_title), 'A') || setweight(to_tsvector('simple'::regconfig, search_text), 'D')",
                persisted=True,
            ),
            nullable=False,
        ),
        sa.Column("view_count", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("helpful_count", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("not_helpful_count", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("author", sa.Text(), server_default="", nullable=False),
        sa.Column("publish_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("request_id", sa.Text(), nullable=True),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("format IN ('markdown', 'plain')", name="kb_articles_format"),
        sa.CheckConstraint("state IN ('draft', 'published', 'archived')", name="kb_articles_state"),
        sa.ForeignKeyConstraint(
            ["category_id"],
            ["kb_categories.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("kb_articles_category", "kb_articles", ["category_id"], unique=False)
    op.create_index(
        "kb_articles_page",
        "kb_articles",
        [sa.literal_column("create_time DESC"), sa.literal_column("id DESC")],
        unique=False,
    )
    op.create_index(
        "kb_articles_request_id",
        "kb_articles",
        ["request_id"],
        unique=True,
        postgresql_where=sa.text("request_id IS NOT NULL"),
    )
    op.create_index("kb_articles_search", "kb_articles", ["search_vector"], unique=False, postgresql_using="gin")
    op.create_index(
        "kb_articles_search_trgm",
        "kb_articles",
        ["search_text"],
        unique=False,
        postgresql_using="gin",
        postgresql_ops={"search_text": "gin_trgm_ops"},
    )
    op.create_table(
        "kb_article_feedback",
        sa.Column("article_id", sa.UUID(as_uuid=False), nullable=False),
        sa.Column("voter", sa.Text(), nullable=False),
        sa.Column("helpful", sa.Boolean(), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["article_id"], ["kb_articles.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("article_id", "voter"),
    )
    # ### end Alembic commands ###


def downgrade() -> None:
    op.drop_table("kb_article_feedback")
    op.drop_table("kb_articles")
    op.drop_table("kb_categories")
    op.drop_table("canned_answers")
