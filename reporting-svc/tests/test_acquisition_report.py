"""Report 1, acquisition-source effectiveness, on hand-computed figures: customers, leads and
their conversion, won opportunities and revenue per source and Jalali month, from customer and
sales events delivered out of order and replayed."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest

from crm.customer.v1 import customer_events_pb2, customer_pb2
from crm.reporting.v1 import reporting_service_pb2 as rs
from crm.reporting.v1 import reporting_service_pb2_grpc as rsg
from crm_chassis.errors import read_rpc_error
from tests.support.harness import channel, md

UTC = dt.UTC
ABAN = dt.datetime(2026, 11, 10, 8, 0, tzinfo=UTC)  # 1405-08-19
AZAR = dt.datetime(2026, 11, 25, 8, 0, tzinfo=UTC)  # 1405-09-04


def customer(feed, n: int, source: str, created: dt.datetime, version: int = 1, deleted: bool = False):
    c = customer_pb2.Customer(name=f"customers/c{n}", acquisition_source=source, etag=f'"{version}"')
    c.create_time.FromDatetime(created)
    if deleted:
        c.delete_time.FromDatetime(created + dt.timedelta(days=1))
    key, cls = (
        ("customer.deleted.v1", customer_events_pb2.CustomerDeleted)
        if deleted
        else ("customer.created.v1", customer_events_pb2.CustomerCreated)
    )
    return feed.event("customer", key, cls(customer=c), c.name)


@pytest.fixture(scope="module")
def stub(svc, feed, ev):
    feed.deliver(
        customer(feed, 1, "website", ABAN),
        customer(feed, 2, "website", AZAR),
        customer(feed, 3, "referral", AZAR),
        customer(feed, 4, "referral", AZAR, version=2, deleted=True),  # its delete before its create
        customer(feed, 4, "referral", AZAR, version=1),
    )
    converted = ev.lead(1, "website", "converted", ABAN, 2, at=AZAR)
    feed.deliver(converted)
    # one consumer batch: a run of three lead.created.v1 goes to the batch handler (set-based),
    # the first older than the stored version
    assert (
        feed.deliver_batch(
            ev.again(converted),  # a replay, then an older version in a run of three
            ev.lead(1, "website", "new", ABAN, 1),  # older: ignored
            ev.lead(2, "website", "new", ABAN, 1),
            ev.lead(3, "website", "new", AZAR, 1),
            ev.lead(4, "referral", "converted", AZAR, 2),
        )
        == 5
    )
    won = ev.opportunity(1, "website", "won", "IRT", 2_000_000, AZAR, 3)
    feed.deliver(
        won,
        ev.again(won),
        ev.opportunity(2, "website", "won", "IRR", 5_000_000, AZAR, 2),
        ev.opportunity(3, "referral", "won", "USD", 100, ABAN, 2),
        ev.opportunity(3, "referral", "open", "USD", 100, None, 3),  # reopened: no longer won
    )
    with channel(svc) as ch:
        yield rsg.ReportingServiceStub(ch)


def get(stub, **kw):
    return stub.GetAcquisitionReport(rs.GetAcquisitionReportRequest(**kw), metadata=md("analyst"))


def test_per_jalali_month_and_source(stub):
    rows = {(r.period_key, r.source): r for r in get(stub, period="month", calendar="jalali").rows}
    assert set(rows) == {("1405-08", "website"), ("1405-09", "website"), ("1405-09", "referral")}
    aban = rows[("1405-08", "website")]
    assert (aban.period_label, aban.customers, aban.leads, aban.converted_leads) == ("Aban 1405", 1, 2, 1)
    assert aban.conversion_rate == pytest.approx(0.5) and aban.won_opportunities == 0
    azar = rows[("1405-09", "website")]
    assert (azar.customers, azar.leads, azar.converted_leads, azar.won_opportunities) == (1, 1, 0, 2)
    assert [(m.currency_code, m.units) for m in azar.won_revenue] == [("IRR", 25_000_000)]  # 2M tomans + 5M rials
    ref = rows[("1405-09", "referral")]
    assert (ref.customers, ref.leads, ref.converted_leads, ref.conversion_rate) == (1, 1, 1, 1.0)
    assert ref.won_opportunities == 0 and list(ref.won_revenue) == []


def test_whole_range_and_a_source_filter(stub):
    rows = {r.source: r for r in get(stub).rows}
    assert (rows["website"].customers, rows["website"].leads, rows["website"].converted_leads) == (2, 3, 1)
    only = get(stub, sources=["referral"])
    assert [r.source for r in only.rows] == ["referral"]
    assert list(get(stub, period="year", sources=["nowhere"]).rows) == []


def test_bad_period_names_the_field(stub):
    with pytest.raises(grpc.RpcError) as info:
        get(stub, period="decade")
    assert read_rpc_error(info.value).field_violations[0].field == "period"


def test_export_csv(stub):
    req = rs.ExportAcquisitionReportRequest(period="month", calendar="jalali", language_code="fa", format="csv")
    chunks = list(stub.ExportAcquisitionReport(req, metadata=md()))
    lines = b"".join(c.data for c in chunks).decode("utf-8-sig").strip().splitlines()
    assert lines[0].startswith("دوره,منبع جذب,مشتریان") and len(lines) == 4
    assert lines[1].startswith("آبان ۱۴۰۵,website,1,2,1,0.5,0")
