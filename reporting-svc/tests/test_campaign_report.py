"""Report 5's campaign part on hand-computed figures: two campaigns (one with a revenue goal
and a cost in tomans, one with a responses goal and no cost), responses, and sales-svc's leads,
orders and invoices carrying their ids; an order cancelled, a credit note,
events redelivered, replayed and out of order."""

from __future__ import annotations

import datetime as dt

import pytest

from crm.campaign.v1 import campaign_events_pb2 as cev
from crm.reporting.v1 import reporting_service_pb2 as rs
from crm.reporting.v1 import reporting_service_pb2_grpc as rsg
from crm.sales.v1 import sales_events_pb2 as sev
from crm.type.v1 import money_pb2
from tests.support.harness import channel, md

from .conftest import Feed, ts

T = dt.datetime(2026, 11, 20, 8, 0, tzinfo=dt.UTC)
H = dt.timedelta(hours=1)


def campaign(n: int, version: int, state: str, goal_kind: str, goal: money_pb2.Money, cost: money_pb2.Money | None):
    msg = cev.CampaignEvent(
        campaign=f"campaigns/k{n}", display_name=f"Campaign {n}", channel="email", state=state, recipients=100,
        goal_kind=goal_kind, goal_target=goal, version=version, event_time=ts(T + version * H),
    )  # fmt: skip
    if cost is not None:
        msg.cost.CopyFrom(cost)
    return Feed.event("campaign", f"campaign.{state}.v1", msg, msg.campaign, T + version * H)


def response(n: int, k: int):
    msg = cev.ResponseEvent(response=f"responses/r{n}", campaign=f"campaigns/k{k}", kind="form", event_time=ts(T))
    return Feed.event("campaign", "response.recorded.v1", msg, msg.response, T)


def order(n: int, k: int, key: str, at: dt.datetime):
    msg = sev.OrderEvent(order=f"orders/o{n}", campaign_id=f"k{k}", state=key.split(".")[1], event_time=ts(at))
    return Feed.event("sales", key, msg, msg.order, at)


def invoice(n: int, k: int, state: str, units: int, at: dt.datetime, currency: str = "IRR"):
    msg = sev.InvoiceEvent(
        invoice=f"invoices/i{n}", customer=f"customers/c{n}", kind="invoice", campaign_id=f"k{k}", state=state, event_time=ts(at),
        total=money_pb2.Money(currency_code=currency, units=units),
    )  # fmt: skip
    key = {"paid": "invoice.paid.v1", "issued": "invoice.issued.v1", "credited": "invoice.credited.v1"}[state]
    return Feed.event("sales", key, msg, msg.invoice, at)


def irt(units):
    return money_pb2.Money(currency_code="IRT", units=units)


@pytest.fixture(scope="module")
def stub(svc, feed, ev):
    launched = campaign(1, 1, "launched", "revenue", irt(1_000_000), irt(200_000))  # goal 10M rials, cost 2M
    feed.deliver(campaign(1, 2, "completed", "revenue", irt(1_000_000), irt(300_000)), launched)  # newest first
    feed.deliver(campaign(2, 1, "launched", "responses", money_pb2.Money(units=4), None))
    first = response(1, 2)
    feed.deliver(first, response(2, 2), response(3, 1))
    assert feed.deliver(first) == [False]
    lead = ev.lead(1, "website", "new", T, 1)
    lead_msg = lead.parse(sev.LeadEvent)
    lead_msg.campaign_id = "k1"
    feed.deliver_batch(
        Feed.again(first),  # replayed: counted once
        Feed.event("sales", "lead.created.v1", lead_msg, lead_msg.lead, T),
        order(1, 1, "order.placed.v1", T),
        order(2, 1, "order.placed.v1", T),
        order(2, 1, "order.cancelled.v1", T + H),  # no longer counts
        invoice(1, 1, "issued", 4_000_000, T),  # not paid yet
        invoice(1, 1, "paid", 4_000_000, T + H),
        invoice(2, 1, "paid", 500_000, T + H, "IRT"),  # 5,000,000 rials
        invoice(3, 1, "paid", 7_000_000, T + H),
    )
    credit = invoice(9, 1, "credited", 7_000_000, T + 2 * H)  # a credit note reversing invoice 3
    msg = credit.parse(sev.InvoiceEvent)
    msg.kind, msg.credited_invoice = "credit_note", "invoices/i3"
    credit = Feed.event("sales", "invoice.credited.v1", msg, msg.invoice, T + 2 * H)
    feed.deliver(credit, Feed.again(credit), invoice(1, 1, "issued", 4_000_000, T))  # replayed; an older version
    with channel(svc) as ch:
        yield rsg.ReportingServiceStub(ch)


def test_goal_share_responses_attributed_revenue_and_roi(stub):
    rows = {r.campaign: r for r in stub.GetCampaignReport(rs.GetCampaignReportRequest(), metadata=md("analyst")).rows}
    one, two = rows["campaigns/k1"], rows["campaigns/k2"]
    assert (one.state, one.responses, one.leads, one.orders) == ("completed", 1, 1, 1)
    assert (one.revenue.currency_code, one.revenue.units) == ("IRR", 9_000_000)  # 4M + 5M + 7M - the 7M credit note
    assert one.cost.units == 3_000_000  # the newest version's cost, tomans as rials
    assert one.roi == pytest.approx((9_000_000 - 3_000_000) / 3_000_000)
    assert (one.goal_kind, one.goal_target, one.goal_achieved) == ("revenue", 10_000_000, 9_000_000)
    assert one.goal_share == pytest.approx(0.9)
    assert (two.responses, two.goal_kind, two.goal_target, two.goal_share, two.roi) == (2, "responses", 4, 0.5, 0.0)


def test_a_filter_and_an_unknown_campaign(stub):
    only = stub.GetCampaignReport(
        rs.GetCampaignReportRequest(campaigns=["campaigns/k2", "campaigns/zz"]), metadata=md()
    )
    assert [r.campaign for r in only.rows] == ["campaigns/k2"]


def test_a_cost_entered_after_completion_and_a_resume_reach_the_report(svc, feed):
    """campaign.updated.v1 (the cost entered afterwards) and campaign.resumed.v1 are the newest
    state too (the journey found the entered cost never reached the report)."""
    feed.deliver(campaign(3, 1, "launched", "revenue", irt(100_000), None))
    feed.deliver(campaign(3, 2, "completed", "revenue", irt(100_000), None))
    cost = campaign(3, 3, "completed", "revenue", irt(100_000), irt(50_000))
    msg = cost.parse(cev.CampaignEvent)
    feed.deliver(Feed.event("campaign", "campaign.updated.v1", msg, msg.campaign, T + 3 * H))
    feed.deliver(campaign(4, 1, "launched", "responses", money_pb2.Money(units=1), None))
    paused = campaign(4, 2, "paused", "responses", money_pb2.Money(units=1), None)
    resumed = campaign(4, 3, "running", "responses", money_pb2.Money(units=1), None)
    msg = resumed.parse(cev.CampaignEvent)
    feed.deliver(paused, Feed.event("campaign", "campaign.resumed.v1", msg, msg.campaign, T + 3 * H))
    with channel(svc) as ch:
        got = rsg.ReportingServiceStub(ch).GetCampaignReport(
            rs.GetCampaignReportRequest(campaigns=["campaigns/k3", "campaigns/k4"]), metadata=md("analyst")
        )
    rows = {r.campaign: r for r in got.rows}
    three, four = rows["campaigns/k3"], rows["campaigns/k4"]
    assert (three.state, three.cost.units, three.recipients) == ("completed", 500_000, 100)
    assert three.roi == pytest.approx(-1.0)  # nothing earned yet against the entered cost
    assert four.state == "running"
