"""Trigram search reads the first 20,000 characters of a row's search text (`search_head`, a
generated column with the pg_trgm index the whole text had): word_similarity grows with the
square of a text whose trigrams repeat, so one article of a repeated letter made every search
that reached it take minutes (knowledge.py, SEARCH_HEAD).

Revision ID: 0014
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"

TABLES = ("kb_articles", "canned_answers")


def upgrade() -> None:
    for table in TABLES:
        op.drop_index(f"{table}_search_trgm", table_name=table)
        op.add_column(
            table,
            sa.Column(
                "search_head", sa.Text(), sa.Computed("left(search_text, 20000)", persisted=True), nullable=False
            ),
        )
        op.create_index(
            f"{table}_search_trgm",
            table,
            ["search_head"],
            unique=False,
            postgresql_using="gin",
            postgresql_ops={"search_head": "gin_trgm_ops"},
        )


def downgrade() -> None:
    for table in TABLES:
        op.drop_index(f"{table}_search_trgm", table_name=table)
        op.drop_column(table, "search_head")
        op.create_index(
            f"{table}_search_trgm",
            table,
            ["search_text"],
            unique=False,
            postgresql_using="gin",
            postgresql_ops={"search_text": "gin_trgm_ops"},
        )
