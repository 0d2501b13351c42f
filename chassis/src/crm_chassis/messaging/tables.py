"""The outbox and inbox tables every service keeps in its own database.

`messaging_metadata` holds their SQLAlchemy definitions; `create_messaging_tables(op)` is what
a service's first Alembic migration calls, so the DDL exists once.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

messaging_metadata = sa.MetaData()

outbox = sa.Table(
    "outbox",
    messaging_metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("event_id", pg.UUID(as_uuid=False), nullable=False, unique=True),
    sa.Column("exchange", sa.Text, nullable=False),
    sa.Column("routing_key", sa.Text, nullable=False),
    sa.Column("event_type", sa.Text, nullable=False),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("dataschema", sa.Text, nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),
    sa.Column("trace_headers", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("published_at", sa.DateTime(timezone=True)),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
)

inbox = sa.Table(
    "inbox",
    messaging_metadata,
    sa.Column("consumer", sa.Text, primary_key=True),
    sa.Column("event_id", sa.Text, primary_key=True),
    sa.Column("event_type", sa.Text, nullable=False),
    sa.Column("processed_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)


def create_messaging_tables(op) -> None:
    """Alembic helper (revision 1 of every service): the tables above, as they are defined here."""
    for table in (outbox, inbox):
        op.create_table(table.name, *(c._copy() for c in table.columns))
    # The relay only ever scans unpublished rows: a partial index keeps that scan tiny.
    op.create_index("outbox_unpublished", "outbox", ["id"], postgresql_where=sa.text("published_at IS NULL"))
