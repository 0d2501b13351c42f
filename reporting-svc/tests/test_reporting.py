"""reporting-svc: the customers-by-source projection and its report RPC."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest
from google.protobuf import timestamp_pb2

from crm.customer.v1 import customer_events_pb2, customer_pb2
from crm.reporting.v1 import reporting_service_pb2 as rs
from crm.reporting.v1 import reporting_service_pb2_grpc as rsg
from crm_chassis.errors import read_rpc_error
from crm_chassis.messaging.envelope import new_event
from reporting_svc import projections
from reporting_svc.__main__ import SPEC
from tests.support.harness import channel, md, start_service

T0 = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)


def ts(value: dt.datetime) -> timestamp_pb2.Timestamp:
    t = timestamp_pb2.Timestamp()
    t.FromDatetime(value)
    return t


def created_event(n: int, source: str, when: dt.datetime):
    c = customer_pb2.Customer(
        name=f"customers/00000000-0000-4000-8000-{n:012d}", acquisition_source=source, create_time=ts(when)
    )
    return new_event(
        domain="customer",
        source_service="customer-svc",
        routing_key="customer.created.v1",
        subject=c.name,
        message=customer_events_pb2.CustomerCreated(customer=c),
    )


@pytest.fixture(scope="module")
def svc(databases, broker):
    service = start_service(SPEC, databases.fresh("reporting"), broker.url, consumers=False)
    events = [
        created_event(i, src, T0 + dt.timedelta(days=i))
        for i, src in enumerate(["website", "website", "referral", "", "website", "exhibition"])
    ]
    with service.ctx.engine.begin() as conn:
        for e in events:
            projections.on_customer_created(conn, e)
        projections.on_customer_created(conn, events[0])  # a replay of the same customer counts once
    yield service
    service.stop(0)


@pytest.fixture(scope="module")
def stub(svc):
    with channel(svc) as ch:
        yield rsg.ReportingServiceStub(ch)


def rows(resp) -> dict[str, int]:
    return {r.acquisition_source: r.customer_count for r in resp.sources}


def test_counts_per_source_largest_first(stub):
    resp = stub.CountCustomersBySource(rs.CountCustomersBySourceRequest(), metadata=md("analyst"))
    assert rows(resp) == {"website": 3, "referral": 1, "unknown": 1, "exhibition": 1}
    assert resp.sources[0].acquisition_source == "website"
    assert resp.total_customers == 6


def test_date_range_is_start_inclusive_end_exclusive(stub):
    req = rs.CountCustomersBySourceRequest(
        start_time=ts(T0 + dt.timedelta(days=1)), end_time=ts(T0 + dt.timedelta(days=4))
    )
    resp = stub.CountCustomersBySource(req, metadata=md())
    assert rows(resp) == {"website": 1, "referral": 1, "unknown": 1}
    only_start = stub.CountCustomersBySource(
        rs.CountCustomersBySourceRequest(start_time=ts(T0 + dt.timedelta(days=4))), metadata=md()
    )
    assert rows(only_start) == {"website": 1, "exhibition": 1}


def test_end_before_start_is_invalid_argument_on_end_time(stub):
    req = rs.CountCustomersBySourceRequest(start_time=ts(T0), end_time=ts(T0 - dt.timedelta(days=1)))
    with pytest.raises(grpc.RpcError) as info:
        stub.CountCustomersBySource(req, metadata=md())
    err = read_rpc_error(info.value)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.field_violations[0].field == "end_time"


def test_reports_need_the_reports_permission(stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.CountCustomersBySource(rs.CountCustomersBySourceRequest(), metadata=md("sales_rep"))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_updates_deletes_and_out_of_order_events_keep_the_counts_right(svc, stub):
    def event(kind, version, source, deleted=False):
        c = customer_pb2.Customer(
            name="customers/00000000-0000-4000-8000-0000000000ff",
            acquisition_source=source,
            create_time=ts(T0 + dt.timedelta(days=100)),
            etag=f'"{version}"',
        )
        if deleted:
            c.delete_time.CopyFrom(ts(T0 + dt.timedelta(days=101)))
        msg = {
            "created": customer_events_pb2.CustomerCreated(customer=c),
            "updated": customer_events_pb2.CustomerUpdated(customer=c),
            "deleted": customer_events_pb2.CustomerDeleted(customer=c),
        }[kind]
        return new_event(
            domain="customer",
            source_service="customer-svc",
            routing_key=f"customer.{kind}.v1",
            subject=c.name,
            message=msg,
        )

    later = rs.CountCustomersBySourceRequest(start_time=ts(T0 + dt.timedelta(days=99)))

    def counts():
        return rows(stub.CountCustomersBySource(later, metadata=md()))

    handlers = projections.subscriptions()[0].handlers
    with svc.ctx.engine.begin() as conn:
        handlers["customer.updated.v1"](conn, event("updated", 2, "referral"))  # arrives before its create
        handlers["customer.created.v1"](conn, event("created", 1, "website"))  # older: ignored
    assert counts() == {"referral": 1}
    with svc.ctx.engine.begin() as conn:
        handlers["customer.deleted.v1"](conn, event("deleted", 3, "referral", deleted=True))
        handlers["customer.updated.v1"](conn, event("updated", 2, "referral"))  # a replay of an older one
    assert counts() == {}
    with svc.ctx.engine.begin() as conn:
        handlers["customer.undeleted.v1"](conn, event("deleted", 4, "phone"))
    assert counts() == {"phone": 1}
