"""customer-svc's events as a consumer receives them, for the tests of every service that keeps
the customer projection (crm_chassis.customer_refs)."""

from __future__ import annotations

import datetime as dt
import uuid

from crm.customer.v1 import customer_events_pb2 as ce
from crm.customer.v1 import customer_pb2
from crm_chassis.messaging.envelope import Event, new_event

_CLASSES = {
    "customer.created.v1": ce.CustomerCreated,
    "customer.updated.v1": ce.CustomerUpdated,
    "customer.deleted.v1": ce.CustomerDeleted,
    "customer.undeleted.v1": ce.CustomerDeleted,
    "customer.erased.v1": ce.CustomerErased,
}


def customer(cid: str, version: int = 1, **fields) -> customer_pb2.Customer:
    c = customer_pb2.Customer(name=f"customers/{cid}", etag=f'"{version}"', **fields)
    c.create_time.FromDatetime(dt.datetime(2026, 1, 5, tzinfo=dt.UTC))
    return c


def customer_message(routing_key: str, cid: str | None = None, version: int = 1, **fields) -> Event:
    """customer.created/updated/deleted/undeleted/erased.v1 carrying this customer."""
    cid = cid or str(uuid.uuid4())
    msg = _CLASSES[routing_key](customer=customer(cid, version, **fields))
    return new_event(
        domain="customer",
        source_service="customer-svc",
        routing_key=routing_key,
        subject=f"customers/{cid}",
        message=msg,
    )


def merged_message(survivor: customer_pb2.Customer, merged: list[str]) -> Event:
    msg = ce.CustomerMerged(survivor=survivor, merged=[f"customers/{m}" for m in merged])
    return new_event(
        domain="customer",
        source_service="customer-svc",
        routing_key="customer.merged.v1",
        subject=survivor.name,
        message=msg,
    )
