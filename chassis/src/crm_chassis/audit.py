"""The audit trail every service keeps: who changed what, when, in which request.

An entry names a resource (`customers/1`, `customers/1/notes/7`, `groups/3`), an action
(`create`, `note.update`, ...), the actor, the request id and a list of field changes, each
`{"field", "old_value", "new_value"}` with the values as JSON text. Entries are written in the
transaction of the change they record (through the unit of work: `tx.audit(...)`), read newest
first with keyset pages, and redacted when a subject is erased: the whole subtree of the
resource (a customer's notes included) keeps who/when/which field, never the values.

`create_audit_table(op)` is what a service's Alembic migration calls, so the DDL exists once.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from .filtering import keyset_page
from .pagination import PageTokens

audit_metadata = sa.MetaData()

audit_entries = sa.Table(
    "audit_entries",
    audit_metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("resource", sa.Text, nullable=False),
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("actor", sa.Text, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("changes", pg.JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
    sa.Column("request_id", sa.Text, nullable=False, server_default=""),
)

# The columns a bulk write (COPY) fills, in this order.
AUDIT_COLUMNS = ("resource", "action", "actor", "changes", "request_id")


def create_audit_table(op) -> None:
    """Alembic helper: the table above and its index (newest entries of a resource first)."""
    op.create_table(audit_entries.name, *(c._copy() for c in audit_entries.columns))
    op.create_index("audit_entries_resource", "audit_entries", ["resource", sa.text("id DESC")])


_JSON = json.JSONEncoder(ensure_ascii=False, sort_keys=True, default=str).encode
_QUOTE = json.encoder.encode_basestring  # a str as a JSON string, non-ASCII kept


def value(v) -> str:
    """A value as the audit trail keeps it: JSON text (dates as ISO strings, keys sorted,
    non-ASCII kept). The common kinds go without building an encoder per call: it runs for
    every field of every write."""
    if isinstance(v, str):
        return _QUOTE(v)
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    if isinstance(v, dt.date):
        return _QUOTE(v.isoformat())
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return "[" + ", ".join(map(_QUOTE, v)) + "]"
    return _JSON(v)


def change(field: str, old: str, new: str) -> dict:
    """One field change; `old` and `new` are JSON text ("null" for none)."""
    return {"field": field, "old_value": old, "new_value": new}


def record_many(conn: sa.Connection, entries: Iterable[tuple]) -> None:
    """Entries as (resource, action, actor, changes, request_id) in one executemany."""
    rows = [dict(zip(AUDIT_COLUMNS, e, strict=True)) for e in entries]
    if rows:
        conn.execute(audit_entries.insert(), rows)


def subtree(resource: str):
    """The resource and everything below it (`customers/1` and `customers/1/notes/7`)."""
    c = audit_entries.c.resource
    return sa.or_(c == resource, c.startswith(resource + "/", autoescape=True))


def page(conn: sa.Connection, tokens: PageTokens, resource: str, limit: int, token: str) -> tuple[list, str]:
    """Entries newest first (of `resource` and below it, or all when it is empty), a keyset page."""
    q = sa.select(audit_entries)
    if resource:
        q = q.where(subtree(resource))
    return keyset_page(conn, q, [(audit_entries.c.id, True)], tokens, f"audit:{resource}", limit, token)


_REDACT = sa.text(
    "UPDATE audit_entries SET changes = (SELECT coalesce(jsonb_agg(jsonb_build_object("
    "'field', e->>'field', 'old_value', '\"[erased]\"', 'new_value', '\"[erased]\"')), '[]'::jsonb) "
    "FROM jsonb_array_elements(changes) e) WHERE resource = :r OR starts_with(resource, :below)"
)


def redact(conn: sa.Connection, resource: str) -> int:
    """Erase the values every entry about `resource` and below it recorded (a customer's notes
    too); keep who, when, which action and which fields. Returns how many entries it rewrote."""
    return conn.execute(_REDACT, {"r": resource, "below": resource + "/"}).rowcount
