"""The customer reference projection every service that names customers keeps: customer-svc's
customers as its events tell them (created, updated, deleted, merged, erased), in a table of
the service's own, so that matching a sender's e-mail or phone to a customer, or printing a
buyer's name, never calls customer-svc per message.

    customer_refs = define(metadata, "rank", "address")        # tables.py
    create(op, "rank", "address")                                # its migration
    audience = define(metadata, "gender", "birth_date", "tags", name="audience",
                      columns=lambda: [sa.Column("order_count", sa.Integer, ...)])
    apply_customers(conn, customer_refs, [c1, c2])               # from customer.*.v1 events
    match(conn, customer_refs, email="a@b.ir", phone="+98912...")  # -> customer id or None

Rows are version-guarded: an event older than the stored customer (several relays, a replay)
changes nothing. A merged customer's row names its survivor, and `match` follows it.

Extra fields are text copied by name (rank, address, fax, industry, ...), or one of TYPED,
stored in a column of their own type: enums as lower-case value names without the prefix
(type 'person', kind 'end_consumer', gender 'female'), dates as DATE, create_time (when the
customer registered) as timestamptz, groups and tags as text[] (group ids without 'groups/').
`columns` are the service's own columns on the same row (a campaign audience's order count):
`apply_customers` never writes them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.dialects.postgresql import insert as pg_insert

from crm.customer.v1 import customer_events_pb2 as ce
from crm.customer.v1 import customer_pb2 as cpb

from .messaging.envelope import Event

# Text columns copied from the Customer message (by field name), "" when unset.
BASE = ("display_name", "email", "phone", "mobile", "national_id", "province", "city", "acquisition_source")
INDEXED = ("email", "phone", "mobile", "national_id")
CUSTOMER_EVENTS = ("customer.created.v1", "customer.updated.v1", "customer.deleted.v1", "customer.undeleted.v1")


def _enum(enum, prefix: str, field: str) -> Callable:
    names = {v.number: v.name.removeprefix(prefix).lower() for v in enum.DESCRIPTOR.values if v.number}
    return lambda c: names.get(getattr(c, field), "")


def _date(d) -> dt.date | None:
    try:
        return dt.date(d.year, d.month, d.day) if d.year else None
    except ValueError:
        return None


TIMESTAMPTZ = sa.DateTime(timezone=True)
TEXTS = pg.ARRAY(sa.Text)
# Typed extra fields: name -> (column type, server default, value from the Customer message).
TYPED: dict[str, tuple] = {
    "type": (sa.Text, "", _enum(cpb.CustomerType, "CUSTOMER_TYPE_", "type")),
    "kind": (sa.Text, "", _enum(cpb.CustomerKind, "CUSTOMER_KIND_", "kind")),
    "gender": (sa.Text, "", _enum(cpb.Gender, "GENDER_", "gender")),
    "lifecycle_stage": (sa.Text, "", _enum(cpb.LifecycleStage, "LIFECYCLE_STAGE_", "lifecycle_stage")),
    "education_degree": (sa.Text, "", _enum(cpb.EducationDegree, "EDUCATION_DEGREE_", "education_degree")),
    "birth_date": (sa.Date, None, lambda c: _date(c.birth_date)),
    "acquisition_date": (sa.Date, None, lambda c: _date(c.acquisition_date)),
    "create_time": (
        TIMESTAMPTZ,
        None,
        lambda c: c.create_time.ToDatetime(dt.UTC) if c.HasField("create_time") else None,
    ),
    "groups": (TEXTS, "{}", lambda c: [g.removeprefix("groups/") for g in c.groups]),
    "tags": (TEXTS, "{}", lambda c: list(c.tags)),
}


def _extra_column(n: str) -> sa.Column:
    if n not in TYPED:
        return sa.Column(n, sa.Text, nullable=False, server_default="")
    kind, default, _ = TYPED[n]
    if default is None:
        return sa.Column(n, kind)
    return sa.Column(n, kind, nullable=False, server_default=default)


def _columns(extra: tuple[str, ...]) -> list:
    text = [sa.Column(n, sa.Text, nullable=False, server_default="") for n in BASE]
    return [
        sa.Column("customer_id", sa.Text, primary_key=True),  # customer-svc's id (uuid text)
        *text,
        *[_extra_column(n) for n in extra],
        sa.Column("merged_into", sa.Text, nullable=False, server_default=""),  # the survivor's id
        sa.Column("deleted", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("version", sa.Integer, nullable=False, server_default="0"),  # the customer's etag version
    ]


def define(
    metadata: sa.MetaData, *extra: str, name: str = "customer_refs", columns: Callable[[], list] | None = None
) -> sa.Table:
    """The projection's table; `extra`: more Customer fields the service keeps (rank, address,
    fax, or a TYPED field); `columns()`: the service's own columns on the row."""
    own = columns() if columns else []
    table = sa.Table(name, metadata, *_columns(extra), *own, info={"extra": extra})
    for c in INDEXED:
        sa.Index(f"{name}_{c}", table.c[c], postgresql_where=table.c[c] != "")
    return table


def create(op, *extra: str, name: str = "customer_refs", columns: Callable[[], list] | None = None) -> None:
    """Create the table in an Alembic migration (frozen there, like any migration's DDL)."""
    op.create_table(name, *_columns(extra), *(columns() if columns else []))
    for c in INDEXED:
        op.create_index(f"{name}_{c}", name, [c], postgresql_where=sa.text(f"{c} != ''"))


def _id(name: str) -> str:
    return name.removeprefix("customers/")


def values(table: sa.Table, c) -> dict:
    row = {n: getattr(c, n) for n in BASE}
    for n in table.info.get("extra", ()):
        row[n] = TYPED[n][2](c) if n in TYPED else getattr(c, n)
    row["email"] = c.email.strip().lower()
    row.update(
        customer_id=_id(c.name),
        merged_into=_id(c.merged_into) if c.merged_into else "",
        deleted=c.HasField("delete_time") or bool(c.merged_into),
        version=int(c.etag.strip('"') or 0),
    )
    return row


def _written(table: sa.Table) -> list[str]:
    """The columns apply_customers writes (not the service's own)."""
    return ["customer_id", *BASE, *table.info.get("extra", ()), "merged_into", "deleted", "version"]


def _upsert(table: sa.Table):
    stmt = pg_insert(table)
    return stmt.on_conflict_do_update(
        index_elements=["customer_id"],
        set_={n: stmt.excluded[n] for n in _written(table) if n != "customer_id"},
        # Events may come out of order (several relays) or again (a replay): never go back.
        where=table.c.version < stmt.excluded.version,
    )


def apply_customers(conn: sa.Connection, table: sa.Table, customers) -> None:
    """Upsert these customers unless a newer version is stored (one statement)."""
    rows = [values(table, c) for c in customers]
    if rows:
        conn.execute(_upsert(table), rows)


def customer_of(event: Event):
    """The customer a customer.created/updated/deleted/undeleted.v1 event carries."""
    cls = {"customer.created.v1": ce.CustomerCreated, "customer.updated.v1": ce.CustomerUpdated}.get(
        event.routing_key, ce.CustomerDeleted
    )
    return event.parse(cls).customer


def on_customer(table: sa.Table):
    """The handler of the customer.* events that carry the customer as it is now."""

    def handle(conn: sa.Connection, event: Event) -> None:
        apply_customers(conn, table, [customer_of(event)])

    return handle


def mark_merged(conn: sa.Connection, table: sa.Table, event: Event) -> tuple[str, list[str]]:
    """customer.merged.v1: the survivor stored, the merged customers pointing to it. Returns
    (survivor id, merged ids) for the service to re-point its own records."""
    msg = event.parse(ce.CustomerMerged)
    survivor = _id(msg.survivor.name)
    merged = [_id(n) for n in msg.merged if _id(n) != survivor]
    apply_customers(conn, table, [msg.survivor])
    if merged:
        conn.execute(table.update().where(table.c.customer_id.in_(merged)).values(deleted=True, merged_into=survivor))
    return survivor, merged


def erased(conn: sa.Connection, table: sa.Table, event: Event) -> str:
    """customer.erased.v1: the row loses its personal data (the event carries it blank).
    Returns the customer's id."""
    c = event.parse(ce.CustomerErased).customer
    apply_customers(conn, table, [c])
    return _id(c.name)


def match(conn: sa.Connection, table: sa.Table, *, email: str = "", phones: tuple[str, ...] = ()) -> str | None:
    """The live customer with this e-mail (case-insensitive) or one of these E.164 numbers
    (phone or mobile), following a merge to its survivor; None if none or ambiguous-free miss.
    E-mail wins over phone; among several, the newest version."""
    conds = []
    if email.strip():
        conds.append(table.c.email == email.strip().lower())
    phones = tuple(p for p in phones if p)
    if phones:
        conds.append(table.c.phone.in_(phones))
        conds.append(table.c.mobile.in_(phones))
    if not conds:
        return None
    rows = conn.execute(
        sa.select(table.c.customer_id, table.c.merged_into, table.c.deleted, table.c.email)
        .where(sa.or_(*conds))
        .order_by(table.c.version.desc())
        .limit(20)
    ).all()
    if not rows:
        return None
    by_email = [r for r in rows if email and r.email == email.strip().lower()]
    for r in by_email or rows:
        if r.merged_into:
            return r.merged_into
        if not r.deleted:
            return r.customer_id
    return None


def unmerged(conn: sa.Connection, table: sa.Table, event: Event) -> None:
    """customer.unmerged.v1: the survivor and the restored customers as they are now."""
    msg = event.parse(ce.CustomerUnmerged)
    apply_customers(conn, table, [msg.survivor, *msg.restored])


def requires() -> dict:
    """What a consumer of customer-svc's events reads of each (the consumer dead-letters an
    event without it): crm_chassis.messaging.consumer.Subscription(requires=...)."""
    from .messaging.consumer import Requires

    customer = ("customer.name", "customer.create_time")
    return {
        "customer.created.v1": Requires(ce.CustomerCreated, customer),
        "customer.updated.v1": Requires(ce.CustomerUpdated, customer),
        "customer.deleted.v1": Requires(ce.CustomerDeleted, customer),
        "customer.undeleted.v1": Requires(ce.CustomerDeleted, customer),
        "customer.erased.v1": Requires(ce.CustomerErased, customer),
        "customer.merged.v1": Requires(ce.CustomerMerged, ("survivor.name", "survivor.create_time", "merged")),
        "customer.unmerged.v1": Requires(ce.CustomerUnmerged, ("survivor.name", "survivor.create_time", "restored")),
    }
