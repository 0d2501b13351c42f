"""The sales projection (sales-svc's events) for report 1: leads per acquisition source (and how
many of them converted) and won opportunities with their amounts, into acquisition_daily.

- A lead counts on its creation day under its source; it counts as converted while its status
  is "converted" (the cohort of leads created in a period, converted at any time since).
- An opportunity counts as won, with its amount (IRT kept as IRR, rials), on its closing day
  while its state is "won"; a reopened one stops counting.
"""

from __future__ import annotations

import datetime as dt

from crm.sales.v1 import sales_events_pb2 as ev
from crm_chassis import money
from crm_chassis.messaging.consumer import Requires
from crm_chassis.messaging.envelope import Event

from .projection import Facts, Projection, Rollup, per_event, tehran_day
from .projections import UNKNOWN_SOURCE
from .tables import ACQUISITION_MEASURES, acquisition_daily, lead_facts, opportunity_facts

ROLLUP = Rollup(acquisition_daily, ("day", "source", "currency"), ACQUISITION_MEASURES)

LEAD_KEYS = [
    "lead.created.v1",
    "lead.updated.v1",
    "lead.assigned.v1",
    "lead.qualified.v1",
    "lead.disqualified.v1",
    "lead.converted.v1",
]
OPPORTUNITY_KEYS = [
    "opportunity.created.v1",
    "opportunity.updated.v1",
    "opportunity.stage_changed.v1",
    "opportunity.won.v1",
    "opportunity.lost.v1",
    "opportunity.reopened.v1",
]


def _m(f):
    return f._mapping if hasattr(f, "_mapping") else f


def _lead_contrib(f) -> list:
    if f is None:
        return []
    m = _m(f)
    key = {"day": tehran_day(m["create_time"]), "source": m["source"], "currency": ""}
    return [(key, {"leads": 1, "converted_leads": int(m["status"] == "converted")})]


def fact_lead(event: Event):
    lead = event.parse(ev.LeadEvent)
    values = {
        "version": lead.version,
        "source": lead.source or UNKNOWN_SOURCE,
        "status": lead.status,
        "create_time": lead.create_time.ToDatetime(tzinfo=dt.UTC),
    }
    return LEADS, {"lead_id": lead.lead.removeprefix("leads/")}, values


def _opp_contrib(f) -> list:
    if f is None:
        return []
    m = _m(f)
    if m["state"] != "won" or m["close_time"] is None:
        return []
    key = {"day": tehran_day(m["close_time"]), "source": m["source"], "currency": m["currency"]}
    return [(key, {"won_opportunities": 1, "won_amount": m["amount"]})]


def fact_opportunity(event: Event):
    o = event.parse(ev.OpportunityEvent)
    currency = o.amount.currency_code or "IRR"
    amount = money.to_decimal(o.amount, "amount") if o.amount.currency_code else 0
    values = {
        "version": o.version,
        "source": o.source or UNKNOWN_SOURCE,
        "state": o.state,
        "currency": "IRR" if currency == "IRT" else currency,
        "amount": money.rials(amount, currency),
        "close_time": o.close_time.ToDatetime(tzinfo=dt.UTC) if o.HasField("close_time") else None,
    }
    key = {"opportunity_id": o.opportunity.removeprefix("opportunities/")}
    return OPPORTUNITIES, key, values


LEADS = Facts(lead_facts, ROLLUP, _lead_contrib)
OPPORTUNITIES = Facts(opportunity_facts, ROLLUP, _opp_contrib)
on_lead = per_event(fact_lead)
on_opportunity = per_event(fact_opportunity)


LEAD = Requires(ev.LeadEvent, ("lead", "create_time", "version"))
OPPORTUNITY = Requires(ev.OpportunityEvent, ("opportunity", "version"))

PROJECTION = Projection(
    name="sales",
    domain="sales",
    handlers={**dict.fromkeys(LEAD_KEYS, on_lead), **dict.fromkeys(OPPORTUNITY_KEYS, on_opportunity)},
    requires={**dict.fromkeys(LEAD_KEYS, LEAD), **dict.fromkeys(OPPORTUNITY_KEYS, OPPORTUNITY)},
    tables=[lead_facts, opportunity_facts, acquisition_daily],
)


def subscriptions(rt=None):
    return [PROJECTION.subscription()]
