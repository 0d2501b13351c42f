"""campaign-svc's web_activity.recorded.v1 and message.clicked.v1 through sales-svc's consumer
(the inbox, then the handler, on a real database): the hits become behaviour of the open leads
of the customer or contact, the behaviour scoring rules score them, each hit once (a
redelivered event and a replay with a new event id record nothing new), closed and other
people's leads are left alone."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
import sqlalchemy as sa

from crm.campaign.v1 import campaign_events_pb2 as ce
from crm.sales.v1 import lead_rules_pb2 as pb
from crm.sales.v1 import lead_rules_pb2_grpc
from crm.sales.v1 import sales_events_pb2 as se
from crm_chassis.messaging.consumer import EventConsumer
from crm_chassis.messaging.envelope import new_event
from sales_svc.__main__ import SPEC
from sales_svc.rules_tables import lead_behaviors, scoring_rules
from sales_svc.tables import leads
from sales_svc.web_behavior import event_kind

from .conftest import ADMIN, events


@pytest.fixture(scope="module")
def stub(ch):
    return lead_rules_pb2_grpc.LeadRuleServiceStub(ch)


@pytest.fixture(scope="module")
def consumer(svc, broker):
    (sub,) = [s for s in SPEC.subscriptions(svc.ctx) if s.domain == "campaign"]
    return EventConsumer(svc.ctx.engine, broker.url, "sales-svc", [sub]), sub


@pytest.fixture(scope="module", autouse=True)
def rules(svc, stub):
    with svc.ctx.engine.begin() as conn:
        conn.execute(scoring_rules.delete())

    def rule(name, points, **cond):
        r = pb.ScoringRule(display_name=name, points=points, behavior=pb.BehaviorCondition(**cond))
        stub.CreateScoringRule(pb.CreateScoringRuleRequest(scoring_rule=r), metadata=ADMIN)

    rule("Three site visits this month", 10, kind="website_visit", min_count=3, window_days=30)
    rule("Asked for a demo", 25, kind="web_event.demo_request")
    rule("Clicked a campaign e-mail", 5, kind="email_click", cap=2)
    yield


def new_lead(svc, **values) -> str:
    with svc.ctx.engine.begin() as conn:
        return str(conn.execute(leads.insert().values(**values).returning(leads.c.id)).scalar())


def score(svc, lid) -> int:
    with svc.ctx.engine.connect() as conn:
        return conn.execute(sa.select(leads.c.score).where(leads.c.id == lid)).scalar()


def kinds(svc, lid) -> list[str]:
    with svc.ctx.engine.connect() as conn:
        q = sa.select(lead_behaviors.c.kind).where(lead_behaviors.c.lead_id == lid).order_by(lead_behaviors.c.id)
        return list(conn.execute(q).scalars())


def web_event(hits, customer_id="", email="", phone=""):
    msg = ce.WebActivityEvent(
        visitor="visitors/v-1234567890",
        customer=f"customers/{customer_id}" if customer_id else "",
        email=email,
        phone=phone,
    )
    now = dt.datetime.now(dt.UTC)
    for hid, kind, name in hits:
        h = msg.hits.add(id=hid, kind=kind, name=name, url="https://shop.example.ir/pricing")
        h.event_time.FromDatetime(now - dt.timedelta(minutes=5))
    msg.event_time.FromDatetime(now)
    return new_event(
        domain="campaign",
        source_service="campaign-svc",
        routing_key="web_activity.recorded.v1",
        subject=msg.visitor,
        message=msg,
    )


def click_event(customer_id, channel="email"):
    msg = ce.MessageEvent(
        message=f"campaigns/{uuid.uuid4()}/messages/{uuid.uuid4()}",
        customer=f"customers/{customer_id}",
        channel=channel,
        state="sent",
        url="https://shop.example.ir/offer",
    )
    msg.event_time.GetCurrentTime()
    return new_event(
        domain="campaign",
        source_service="campaign-svc",
        routing_key="message.clicked.v1",
        subject=msg.message,
        message=msg,
    )


def test_site_visits_score_the_customers_open_leads_once_per_hit(svc, consumer):
    c, sub = consumer
    handle = sub.handlers["web_activity.recorded.v1"]
    cid = str(uuid.uuid4())
    mine = new_lead(svc, family_name="رضایی", customer_id=cid, status="contacted")
    closed = new_lead(svc, family_name="رضایی", customer_id=cid, status="disqualified")
    other = new_lead(svc, family_name="کریمی", customer_id=str(uuid.uuid4()))
    tag = uuid.uuid4().hex[:8]
    two = web_event([(f"{tag}-1", "page_view", ""), (f"{tag}-2", "page_view", "")], customer_id=cid)
    assert c.handle(two, handle) is True
    assert score(svc, mine) == 0  # two visits: below min_count 3
    assert c.handle(two, handle) is False  # redelivered: the inbox drops it
    # a replay with a new event id (inbox forgotten) of the same hits records nothing new
    c.handle(web_event([(f"{tag}-1", "page_view", ""), (f"{tag}-2", "page_view", "")], customer_id=cid), handle)
    assert kinds(svc, mine) == ["website_visit", "website_visit"]
    c.handle(web_event([(f"{tag}-3", "page_view", ""), (f"{tag}-4", "event", "Demo Request")], customer_id=cid), handle)
    assert kinds(svc, mine) == ["website_visit"] * 3 + ["web_event.demo_request"]
    assert score(svc, mine) == 35  # 3 visits (+10) and the demo request (+25)
    assert kinds(svc, closed) == [] and kinds(svc, other) == []
    assert score(svc, closed) == 0
    updated = [e for e in events(svc, "lead.updated.v1", se.LeadEvent) if e.lead == f"leads/{mine}"]
    assert updated and updated[-1].score == 35


def test_an_identified_visitor_scores_the_lead_with_that_email_or_mobile(svc, consumer):
    c, sub = consumer
    handle = sub.handlers["web_activity.recorded.v1"]
    tag = uuid.uuid4().hex[:8]
    by_mail = new_lead(svc, family_name="احمدی", email=f"sara.{tag}@example.ir")
    by_phone = new_lead(svc, family_name="احمدی", mobile="+98912" + str(uuid.uuid4().int)[:7])
    c.handle(web_event([(f"{tag}-d", "event", "demo_request")], email=f"Sara.{tag}@Example.ir"), handle)
    assert score(svc, by_mail) == 25
    with svc.ctx.engine.connect() as conn:
        phone = conn.execute(sa.select(leads.c.mobile).where(leads.c.id == by_phone)).scalar()
    c.handle(web_event([(f"{tag}-p", "event", "demo_request")], phone=phone), handle)
    assert score(svc, by_phone) == 25
    # no customer, no e-mail, no phone: nobody's lead
    c.handle(web_event([(f"{tag}-x", "event", "demo_request")]), handle)
    assert kinds(svc, by_mail) == ["web_event.demo_request"]


def test_campaign_clicks_are_channel_click_behaviour(svc, consumer):
    c, sub = consumer
    handle = sub.handlers["message.clicked.v1"]
    cid = str(uuid.uuid4())
    lid = new_lead(svc, family_name="موسوی", customer_id=cid)
    for _ in range(3):
        c.handle(click_event(cid), handle)
    c.handle(click_event(cid, channel="sms"), handle)
    assert sorted(kinds(svc, lid)) == ["email_click"] * 3 + ["sms_click"]
    assert score(svc, lid) == 10  # +5 a click, capped at 2


def test_event_names_become_behaviour_kinds():
    assert event_kind("Demo Request") == "web_event.demo_request"
    assert event_kind("download:price-list.pdf") == "web_event.download_price-list.pdf"
    assert event_kind("ثبت‌نام") == "web_event"  # nothing of the kind alphabet left
    assert len(event_kind("x" * 200)) == 60
