"""Report 1's cost per acquisition on hand-computed figures: three campaigns (one costed in
tomans, one without leads), their leads from two sources in two Jalali months (one lead's
versions out of order, one replayed), customers per source; each campaign's cost shared by its
leads, per source and period, and divided by the customers."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest

from crm.reporting.v1 import reporting_service_pb2 as rs
from crm.reporting.v1 import reporting_service_pb2_grpc as rsg
from crm.sales.v1 import sales_events_pb2 as sev
from crm.type.v1 import date_pb2, money_pb2
from crm_chassis.money import to_decimal
from tests.support.harness import channel, md

from .conftest import Feed
from .test_acquisition_report import customer
from .test_campaign_report import campaign

ABAN = dt.datetime(2026, 11, 10, 8, 0, tzinfo=dt.UTC)  # 1405-08-19
AZAR = dt.datetime(2026, 11, 25, 8, 0, tzinfo=dt.UTC)  # 1405-09-04


def lead(ev, n: int, source: str, created: dt.datetime, campaign_id: str, version: int = 1):
    e = ev.lead(n, source, "new", created, version)
    msg = e.parse(sev.LeadEvent)
    msg.campaign_id = campaign_id
    return Feed.event("sales", "lead.created.v1" if version == 1 else "lead.updated.v1", msg, msg.lead, created)


@pytest.fixture(scope="module")
def stub(svc, feed, ev):
    irr = lambda units: money_pb2.Money(currency_code="IRR", units=units)  # noqa: E731
    feed.deliver(
        campaign(
            1, 1, "launched", "leads", money_pb2.Money(units=10), money_pb2.Money(currency_code="IRT", units=900_000)
        ),
        campaign(2, 1, "launched", "leads", money_pb2.Money(units=10), irr(1_000_000)),
        campaign(3, 1, "launched", "leads", money_pb2.Money(units=10), irr(500)),  # no lead: unallocated
        customer(feed, 1, "website", ABAN),
        customer(feed, 2, "website", ABAN),
        customer(feed, 3, "instagram", AZAR),
    )
    l3 = lead(ev, 3, "instagram", AZAR, "k1")
    feed.deliver(
        lead(ev, 1, "website", ABAN, "k1"),
        lead(ev, 2, "website", ABAN, "k1", version=2),  # version 2 first; its version 1 named no campaign
        Feed.event("sales", "lead.created.v1", sev.LeadEvent(
            lead="leads/l2", status="new", source="website", create_time=ev.ts(ABAN), version=1), "leads/l2", ABAN),
        l3,
        Feed.again(l3),  # replayed
        lead(ev, 4, "instagram", AZAR, "k2"),
        lead(ev, 5, "website", AZAR, ""),  # no campaign
    )  # fmt: skip
    with channel(svc) as ch:
        yield rsg.ReportingServiceStub(ch)


def cost(r) -> tuple:
    return (r.period_key, r.source, r.customers, r.leads, to_decimal(r.campaign_cost), to_decimal(r.cost_per_customer))


def test_cost_per_customer_per_jalali_month_and_source(stub):
    resp = stub.GetAcquisitionReport(rs.GetAcquisitionReportRequest(period="month", calendar="jalali"), metadata=md())
    # campaign 1: 9,000,000 rials over its 3 leads (3,000,000 each): 2 website leads in Aban, 1
    # instagram lead in Azar; campaign 2: 1,000,000 rials, its one instagram lead in Azar
    assert [cost(r) for r in resp.rows] == [
        ("1405-08", "website", 2, 2, 6_000_000, 3_000_000),
        ("1405-09", "instagram", 1, 2, 4_000_000, 4_000_000),
        ("1405-09", "website", 0, 1, 0, 0),  # a lead without campaign, no customer
    ]
    assert resp.rows[0].campaign_cost.currency_code == "IRR"
    assert to_decimal(resp.unallocated_campaign_cost) == 500


def test_a_range_keeps_each_campaigns_whole_lead_count(stub):
    req = rs.GetAcquisitionReportRequest(start_date=date_pb2.Date(year=2026, month=11, day=20), sources=["instagram"])
    (row,) = stub.GetAcquisitionReport(req, metadata=md()).rows
    assert cost(row) == ("", "instagram", 1, 2, Decimal(4_000_000), Decimal(4_000_000))  # 9M / 3 + 1M


def test_an_empty_range_and_the_export(stub):
    empty = stub.GetAcquisitionReport(
        rs.GetAcquisitionReportRequest(start_date=date_pb2.Date(year=2030, month=1, day=1)), metadata=md()
    )
    assert list(empty.rows) == [] and not empty.HasField("unallocated_campaign_cost")
    req = rs.ExportAcquisitionReportRequest(period="month", calendar="jalali", format="csv")
    lines = b"".join(c.data for c in stub.ExportAcquisitionReport(req, metadata=md())).decode("utf-8-sig").splitlines()
    assert lines[0].endswith(",Campaign cost (IRR),Cost per customer (IRR)")
    assert lines[1].endswith(",6000000,3000000") and lines[2].endswith(",4000000,4000000")
