"""campaign-svc's response.recorded.v1 through sales-svc's consumer (the inbox, then the handler,
on a real database): a lead opened once with source "campaign", the campaign id, UTM and the
contact given; the redelivered event, and a second event for the same response, open no second
lead."""

from __future__ import annotations

import uuid

import sqlalchemy as sa

from crm.campaign.v1 import campaign_events_pb2 as ce
from crm.sales.v1 import sales_events_pb2 as se
from crm_chassis.messaging.consumer import EventConsumer
from crm_chassis.messaging.envelope import new_event
from sales_svc.__main__ import SPEC
from sales_svc.tables import leads

from .conftest import events


def response_event(response: str, campaign_id: str, customer_id: str):
    msg = ce.ResponseEvent(
        response=response,
        campaign=f"campaigns/{campaign_id}",
        message=f"campaigns/{campaign_id}/messages/{uuid.uuid4()}",
        customer=f"customers/{customer_id}",
        kind="reply",
        channel="email",
        contact_name="سارا احمدی",
        email="sara@example.ir",
        phone="+989121234567",
        text="لطفاً با من تماس بگیرید",
        utm_source="crm",
        utm_medium="email",
        utm_campaign=campaign_id,
    )
    msg.event_time.GetCurrentTime()
    return new_event(
        domain="campaign",
        source_service="campaign-svc",
        routing_key="response.recorded.v1",
        subject=response,
        message=msg,
    )


def test_a_campaign_response_opens_one_lead_with_its_attribution(svc, broker):
    (sub,) = [s for s in SPEC.subscriptions(svc.ctx) if s.domain == "campaign"]
    handler = sub.handlers["response.recorded.v1"]
    consumer = EventConsumer(svc.ctx.engine, broker.url, "sales-svc", [sub])
    campaign_id, customer_id = str(uuid.uuid4()), str(uuid.uuid4())
    response = f"responses/{uuid.uuid4()}"
    e = response_event(response, campaign_id, customer_id)
    assert consumer.handle(e, handler) is True
    assert consumer.handle(e, handler) is False  # redelivered: the inbox drops it
    consumer.handle(response_event(response, campaign_id, customer_id), handler)  # a replay with a new event id
    with svc.ctx.engine.connect() as conn:
        rows = conn.execute(sa.select(leads).where(leads.c.campaign_id == campaign_id)).all()
    (lead,) = rows
    assert (lead.source, lead.customer_id, lead.utm_medium, lead.utm_campaign) == (
        "campaign",
        customer_id,
        "email",
        campaign_id,
    )
    assert (lead.given_name, lead.family_name, lead.email, lead.mobile) == (
        "سارا",
        "احمدی",
        "sara@example.ir",
        "+989121234567",
    )
    assert lead.status == "new" and "تماس" in lead.description
    created = [x for x in events(svc, "lead.created.v1", se.LeadEvent) if x.lead == f"leads/{lead.id}"]
    assert len(created) == 1
