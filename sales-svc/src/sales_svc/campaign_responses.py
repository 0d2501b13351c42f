"""campaign-svc's response.recorded.v1 consumed by sales-svc: a recipient who answered a campaign
(a reply, a form, an SMS answer) becomes a new lead with source "campaign", the campaign id, the
UTM parameters and the contact they gave.

Once per response: the consumer's inbox drops a redelivered event, and the lead's request_id is
"campaign-response:<response name>", so even a replay of the stream (inbox forgotten) opens no
second lead. The lead goes through the assignment and scoring rules as a lead created by hand
(`lead_rules.on_lead_saved`) and publishes lead.created.v1.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from crm.campaign.v1 import campaign_events_pb2 as ce
from crm_chassis import audit
from crm_chassis.messaging.consumer import Subscription
from crm_chassis.messaging.envelope import Event

from . import lead_rules
from .leads_model import LEAD, LEAD_COLUMNS, search_key, to_event
from .runtime import Sales
from .tables import leads

ACTOR = "campaign-svc"  # who the audit trail says opened the lead
SOURCE = "campaign"


def _id(name: str) -> str:
    return name.rsplit("/", 1)[-1] if name else ""


def lead_values(e: ce.ResponseEvent) -> dict:
    """The lead of a response: the name given (else the e-mail or phone as its name)."""
    given, _, family = (e.contact_name or "").strip().rpartition(" ")
    if not family:
        family = e.email or e.phone or "campaign response"
    return {
        "given_name": given,
        "family_name": family,
        "email": e.email.lower(),
        "mobile": e.phone,
        "source": SOURCE,
        "campaign_id": _id(e.campaign),
        "utm_source": e.utm_source,
        "utm_medium": e.utm_medium,
        "utm_campaign": e.utm_campaign,
        "customer_id": _id(e.customer),
        "description": e.text[:4000],
        "request_id": f"campaign-response:{e.response}",
    }


class Handlers:
    def __init__(self, sales: Sales):
        self.sales = sales

    def on_response(self, conn: sa.Connection, event: Event) -> None:
        e = event.parse(ce.ResponseEvent)
        if not e.response or not e.campaign:
            return
        v = lead_values(e)
        inserted = conn.execute(
            pg_insert(leads)
            .values(**v, search_text=search_key(v))
            .on_conflict_do_nothing(index_elements=["request_id"])
            .returning(*leads.c)
        ).one_or_none()
        if inserted is None:  # this response's lead exists
            return
        with self.sales.uow.joined(conn) as tx:
            lead_rules.on_lead_saved(tx, inserted.id, True, None, row=inserted)
            row = conn.execute(sa.select(*LEAD_COLUMNS).where(leads.c.id == inserted.id)).one()
            name = LEAD.format(inserted.id)
            tx.publish("lead.created.v1", to_event(row), name)
            changes = [audit.change(k, "null", audit.value(x)) for k, x in v.items() if x and k != "request_id"]
            tx.audit_many([(name, "create", changes)], ACTOR)


def subscriptions(sales: Sales) -> list[Subscription]:
    return [Subscription(domain="campaign", handlers={"response.recorded.v1": Handlers(sales).on_response})]
