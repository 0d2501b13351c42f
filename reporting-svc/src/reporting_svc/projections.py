"""The customer projection (customer-svc's events): customers per acquisition source, and its query."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

from crm.customer.v1 import customer_events_pb2
from crm_chassis.messaging.consumer import Requires
from crm_chassis.messaging.envelope import Event

from .projection import Facts, Projection, Rollup, per_event, tehran_day
from .tables import ACQUISITION_MEASURES, acquisition_daily, customer_source_facts

UNKNOWN_SOURCE = "unknown"


ROLLUP = Rollup(acquisition_daily, ("day", "source", "currency"), ACQUISITION_MEASURES)


def _contrib(f) -> list:
    if f is None:
        return []
    m = f._mapping if hasattr(f, "_mapping") else f
    if m["deleted"]:
        return []
    return [({"day": tehran_day(m["created_at"]), "source": m["acquisition_source"], "currency": ""}, {"customers": 1})]


def _customer_change(c):
    """The customer's facts (applied unless a newer version is stored: events may arrive out of
    order, from several relays, or again, replayed from the stream); its count in the
    acquisition rollup moves with them."""
    values = {
        "acquisition_source": c.acquisition_source or UNKNOWN_SOURCE,
        "created_at": c.create_time.ToDatetime(tzinfo=dt.UTC),
        "deleted": c.HasField("delete_time") or bool(c.merged_into),
        "version": int(c.etag.strip('"') or 0),
    }
    return CUSTOMERS, {"customer_id": c.name.removeprefix("customers/")}, values


def _apply_customer(conn: sa.Connection, c) -> None:
    CUSTOMERS.apply(conn, *_customer_change(c)[1:])


CUSTOMERS = Facts(customer_source_facts, ROLLUP, _contrib)
# created, updated, deleted / undeleted (the customer carries delete_time or not), erased (the
# aggregate facts stay: the counts do not change): each carries the customer after the change.
on_customer_created = per_event(lambda e: _customer_change(e.parse(customer_events_pb2.CustomerCreated).customer))
on_customer_updated = per_event(lambda e: _customer_change(e.parse(customer_events_pb2.CustomerUpdated).customer))
on_customer_deleted = per_event(lambda e: _customer_change(e.parse(customer_events_pb2.CustomerDeleted).customer))
on_customer_erased = per_event(lambda e: _customer_change(e.parse(customer_events_pb2.CustomerErased).customer))


def on_customer_merged(conn: sa.Connection, event: Event) -> None:
    """The merged customers stop counting; the survivor counts with its (possibly new) source."""
    msg = event.parse(customer_events_pb2.CustomerMerged)
    _apply_customer(conn, msg.survivor)
    ids = [n.removeprefix("customers/") for n in msg.merged]
    t = customer_source_facts
    gone = conn.execute(
        t.update().where(t.c.customer_id.in_(ids), t.c.deleted.is_(False)).values(deleted=True).returning(*t.c)
    ).all()
    ROLLUP.apply(conn, [c for r in gone for c in _contrib({**r._mapping, "deleted": False})], [])


def on_customer_unmerged(conn: sa.Connection, event: Event) -> None:
    msg = event.parse(customer_events_pb2.CustomerUnmerged)
    for c in [msg.survivor, *msg.restored]:
        _apply_customer(conn, c)


# What each handler reads of its event. The consumer checks it before the handler runs and
# dead-letters an event that lacks it (an empty body would otherwise count as a customer ''
# created in 1970).
CUSTOMER = ("customer.name", "customer.create_time")
REQUIRES = {
    "customer.created.v1": Requires(customer_events_pb2.CustomerCreated, CUSTOMER),
    "customer.updated.v1": Requires(customer_events_pb2.CustomerUpdated, CUSTOMER),
    "customer.deleted.v1": Requires(customer_events_pb2.CustomerDeleted, CUSTOMER),
    "customer.undeleted.v1": Requires(customer_events_pb2.CustomerDeleted, CUSTOMER),
    "customer.erased.v1": Requires(customer_events_pb2.CustomerErased, CUSTOMER),
    "customer.merged.v1": Requires(
        customer_events_pb2.CustomerMerged, ("survivor.name", "survivor.create_time", "merged")
    ),
    "customer.unmerged.v1": Requires(
        customer_events_pb2.CustomerUnmerged, ("survivor.name", "survivor.create_time", "restored")
    ),
}


PROJECTION = Projection(
    name="customers",
    domain="customer",
    handlers={
        "customer.created.v1": on_customer_created,
        "customer.updated.v1": on_customer_updated,
        "customer.deleted.v1": on_customer_deleted,
        "customer.undeleted.v1": on_customer_deleted,
        "customer.erased.v1": on_customer_erased,
        "customer.merged.v1": on_customer_merged,
        "customer.unmerged.v1": on_customer_unmerged,
    },
    requires=REQUIRES,
    tables=[customer_source_facts, acquisition_daily],
)


def subscriptions(rt=None):
    return [PROJECTION.subscription()]


def customers_by_source(
    conn: sa.Connection, start: dt.datetime | None, end: dt.datetime | None
) -> list[tuple[str, int]]:
    t = customer_source_facts
    q = (
        sa.select(t.c.acquisition_source, sa.func.count().label("n"))
        .where(t.c.deleted.is_(False))
        .group_by(t.c.acquisition_source)
    )
    if start is not None:
        q = q.where(t.c.created_at >= start)
    if end is not None:
        q = q.where(t.c.created_at < end)
    q = q.order_by(sa.text("n DESC"), t.c.acquisition_source)
    return [(r[0], int(r[1])) for r in conn.execute(q)]
