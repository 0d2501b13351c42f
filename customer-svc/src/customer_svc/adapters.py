"""Tables and queries (SQLAlchemy Core: the hot paths here are create, get and list)."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

metadata = sa.MetaData()

customers = sa.Table(
    "customers",
    metadata,
    sa.Column("id", pg.UUID(as_uuid=False), primary_key=True, server_default=sa.text("gen_random_uuid()")),
    sa.Column("type", sa.SmallInteger, nullable=False),
    sa.Column("given_name", sa.Text, nullable=False),
    sa.Column("family_name", sa.Text, nullable=False),
    sa.Column("organization_name", sa.Text, nullable=False),
    sa.Column("display_name", sa.Text, nullable=False),
    sa.Column("email", sa.Text, nullable=False),
    sa.Column("phone", sa.Text, nullable=False),
    sa.Column("acquisition_source", sa.Text, nullable=False),
    sa.Column("request_id", sa.Text, unique=True),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("update_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("version", sa.Integer, nullable=False, server_default="1"),
)

_COLUMNS = [c for c in customers.c if c.name != "request_id"]


def insert_customer(conn: sa.Connection, values: dict) -> sa.Row:
    return conn.execute(customers.insert().values(**values).returning(*_COLUMNS)).one()


def get_customer(conn: sa.Connection, customer_id: str) -> sa.Row | None:
    return conn.execute(sa.select(*_COLUMNS).where(customers.c.id == customer_id)).one_or_none()


def get_by_request_id(conn: sa.Connection, request_id: str) -> sa.Row | None:
    return conn.execute(sa.select(*_COLUMNS).where(customers.c.request_id == request_id)).one_or_none()


def list_customers(conn: sa.Connection, limit: int, after: tuple[dt.datetime, str] | None) -> list[sa.Row]:
    """Newest first; `after` is the (create_time, id) of the last row of the previous page."""
    q = sa.select(*_COLUMNS).order_by(customers.c.create_time.desc(), customers.c.id.desc()).limit(limit)
    if after is not None:
        q = q.where(
            sa.tuple_(customers.c.create_time, customers.c.id)
            < sa.tuple_(sa.literal(after[0], sa.DateTime(timezone=True)), sa.literal(after[1], pg.UUID(as_uuid=False)))
        )
    return list(conn.execute(q).all())
