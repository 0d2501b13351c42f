"""Projections: event handlers that keep the read models, and the queries over them."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from crm.customer.v1 import customer_events_pb2
from crm_chassis.messaging.consumer import Subscription
from crm_chassis.messaging.envelope import Event

metadata = sa.MetaData()

customer_source_facts = sa.Table(
    "customer_source_facts",
    metadata,
    sa.Column("customer_id", sa.Text, primary_key=True),
    sa.Column("acquisition_source", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

UNKNOWN_SOURCE = "unknown"


def on_customer_created(conn: sa.Connection, event: Event) -> None:
    msg = event.parse(customer_events_pb2.CustomerCreated)
    c = msg.customer
    conn.execute(
        pg_insert(customer_source_facts)
        .values(
            customer_id=c.name.removeprefix("customers/"),
            acquisition_source=c.acquisition_source or UNKNOWN_SOURCE,
            created_at=c.create_time.ToDatetime(tzinfo=dt.UTC),
        )
        # The inbox already makes a redelivery a no-op; this also covers a replay from the stream.
        .on_conflict_do_nothing(index_elements=["customer_id"])
    )


def subscriptions() -> list[Subscription]:
    return [Subscription(domain="customer", handlers={"customer.created.v1": on_customer_created})]


def customers_by_source(
    conn: sa.Connection, start: dt.datetime | None, end: dt.datetime | None
) -> list[tuple[str, int]]:
    t = customer_source_facts
    q = sa.select(t.c.acquisition_source, sa.func.count().label("n")).group_by(t.c.acquisition_source)
    if start is not None:
        q = q.where(t.c.created_at >= start)
    if end is not None:
        q = q.where(t.c.created_at < end)
    q = q.order_by(sa.text("n DESC"), t.c.acquisition_source)
    return [(r[0], int(r[1])) for r in conn.execute(q)]
