"""Column shapes every service's tables repeat (SQLAlchemy Core): a uuid key, a non-null text
defaulting to "", and the version + create/update times of an etag'd resource."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

UUID = pg.UUID(as_uuid=False)
TIMESTAMPTZ = sa.DateTime(timezone=True)


def id_column(name: str = "id") -> sa.Column:
    return sa.Column(name, UUID, primary_key=True, server_default=sa.text("gen_random_uuid()"))


def text_column(name: str) -> sa.Column:
    return sa.Column(name, sa.Text, nullable=False, server_default="")


def times(deletable: bool = False) -> list[sa.Column]:
    """version (the etag), create_time, update_time (and delete_time for soft deletes)."""
    cols = [
        sa.Column("version", sa.Integer, nullable=False, server_default="1"),
        sa.Column("create_time", TIMESTAMPTZ, nullable=False, server_default=sa.func.now()),
        sa.Column("update_time", TIMESTAMPTZ, nullable=False, server_default=sa.func.now()),
    ]
    if deletable:
        cols.append(sa.Column("delete_time", TIMESTAMPTZ))
    return cols
