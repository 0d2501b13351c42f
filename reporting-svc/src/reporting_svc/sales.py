"""The sales projection (sales-svc's events) for report 1: leads per acquisition source (and how
many of them converted) and won opportunities with their amounts, into acquisition_daily.

- A lead counts on its creation day under its source; it counts as converted while its status
  is "converted" (the cohort of leads created in a period, converted at any time since).
- An opportunity counts as won, with its amount (IRT kept as IRR, rials), on its closing day
  while its state is "won"; a reopened one stops counting.

For report 3 (pipeline_report.py) the same opportunity facts (their newest version) feed
sales_pipeline_daily: an open one on its expected close date (NO_DATE without one) with its
amount and amount x probability / 100, under its owner, team, stage and forecast category; a
won one on its closing day. And forecast_snapshot.created.v1 keeps sales-svc's forecast
snapshots in forecast_snapshot_facts.
"""

from __future__ import annotations

import datetime as dt
from decimal import ROUND_HALF_UP, Decimal

from crm.sales.v1 import sales_events_pb2 as ev
from crm_chassis import money
from crm_chassis.messaging.consumer import Requires
from crm_chassis.messaging.envelope import Event

from .projection import Facts, Projection, Rollup, per_event, tehran_day
from .projections import UNKNOWN_SOURCE
from .tables import (
    ACQUISITION_MEASURES,
    PIPELINE_MEASURES,
    SNAPSHOT_AMOUNTS,
    acquisition_daily,
    campaign_leads_daily,
    forecast_snapshot_facts,
    lead_facts,
    opportunity_facts,
    sales_pipeline_daily,
)

ROLLUP = Rollup(acquisition_daily, ("day", "source", "currency"), ACQUISITION_MEASURES)
PIPELINE_DIMS = ("owner", "team", "stage", "stage_name", "forecast_category", "currency")
PIPELINE = Rollup(sales_pipeline_daily, ("day", *PIPELINE_DIMS), PIPELINE_MEASURES)
CAMPAIGN_LEADS = Rollup(campaign_leads_daily, ("day", "source", "campaign_id"), ("leads",))
NO_DATE = dt.date(1, 1, 1)  # the `day` of open opportunities without an expected close date
NANO = Decimal("1e-9")
SNAPSHOT_KEY = "forecast_snapshot.created.v1"

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


def _campaign_lead_contrib(f) -> list:
    """A lead from a campaign, on its creation day under its source (report 1's cost share)."""
    if f is None:
        return []
    m = _m(f)
    if not m["campaign_id"]:
        return []
    return [
        ({"day": tehran_day(m["create_time"]), "source": m["source"], "campaign_id": m["campaign_id"]}, {"leads": 1})
    ]


def fact_lead(event: Event):
    lead = event.parse(ev.LeadEvent)
    values = {
        "version": lead.version,
        "source": lead.source or UNKNOWN_SOURCE,
        "status": lead.status,
        "create_time": lead.create_time.ToDatetime(tzinfo=dt.UTC),
        "campaign_id": lead.campaign_id.removeprefix("campaigns/"),
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


def weighted(amount, probability) -> Decimal:
    """amount x probability / 100 to 9 decimals (half away from zero, as SQL's round)."""
    return (Decimal(amount) * Decimal(probability) / 100).quantize(NANO, ROUND_HALF_UP)


def pipeline_contributions(f) -> list:
    """Report 3: an open opportunity on its expected close date, a won one on its closing day."""
    if f is None:
        return []
    m = _m(f)
    dims = {d: m[d] for d in PIPELINE_DIMS}
    if m["state"] == "open":
        day = m["expected_close_date"] or NO_DATE
        measures = {
            "open_opportunities": 1,
            "open_amount": m["amount"],
            "weighted_amount": weighted(m["amount"], m["probability"]),
        }
        return [({"day": day, **dims}, measures)]
    if m["state"] == "won" and m["close_time"] is not None:
        return [({"day": tehran_day(m["close_time"]), **dims}, {"won_opportunities": 1, "won_amount": m["amount"]})]
    return []


def _day(d) -> dt.date | None:
    try:
        return dt.date(d.year, d.month, d.day) if d.year else None
    except ValueError:
        return None  # not a calendar day: as if none was given


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
        "owner": o.owner,
        "team": o.team,
        "stage": o.stage,
        "stage_name": o.stage_name,
        "probability": Decimal(str(round(min(max(o.probability, 0.0), 100.0), 4))),
        "forecast_category": o.forecast_category,
        "expected_close_date": _day(o.expected_close_date) if o.HasField("expected_close_date") else None,
    }
    key = {"opportunity_id": o.opportunity.removeprefix("opportunities/")}
    return OPPORTUNITIES, key, values


def fact_snapshot(event: Event):
    """A forecast snapshot (immutable: its create time is its version; a redelivery or replay
    changes nothing)."""
    f = event.parse(ev.ForecastSnapshotEvent)
    created = f.create_time.ToDatetime(tzinfo=dt.UTC)
    cur = f.currency_code or "IRR"

    def amount(name: str) -> Decimal:
        m = getattr(f, name)
        return money.rials(money.to_decimal(m, name), m.currency_code) if m.currency_code else Decimal(0)

    values = {
        "version": int(created.timestamp() * 1_000_000),
        "period": f.period,
        "calendar": f.calendar,
        "unit": f.unit,
        "period_start": _day(f.period_start_date),
        "period_end": _day(f.period_end_date),
        "owner": f.owner,
        "currency": "IRR" if cur == "IRT" else cur,
        **{a: amount(a) for a in SNAPSHOT_AMOUNTS},
        "adjusted_commit": amount("adjusted_commit") if f.HasField("adjusted_commit") else None,
        "kind": f.kind,
        "create_time": created,
    }
    if values["period_start"] is None or values["period_end"] is None:
        raise ValueError(f"{f.forecast_snapshot}: its period has no valid start and end day")
    return SNAPSHOTS, {"snapshot_id": f.forecast_snapshot.removeprefix("forecastSnapshots/")}, values


LEADS = Facts(lead_facts, ROLLUP, _lead_contrib, more=((CAMPAIGN_LEADS, _campaign_lead_contrib),))
OPPORTUNITIES = Facts(opportunity_facts, ROLLUP, _opp_contrib, more=((PIPELINE, pipeline_contributions),))
SNAPSHOTS = Facts(forecast_snapshot_facts, PIPELINE, lambda f: [])  # read as they are: no rollup
on_lead = per_event(fact_lead)
on_opportunity = per_event(fact_opportunity)
on_snapshot = per_event(fact_snapshot)


LEAD = Requires(ev.LeadEvent, ("lead", "create_time", "version"))
OPPORTUNITY = Requires(ev.OpportunityEvent, ("opportunity", "version"))
SNAPSHOT = Requires(ev.ForecastSnapshotEvent, ("forecast_snapshot", "period_start_date", "create_time"))

PROJECTION = Projection(
    name="sales",
    domain="sales",
    handlers={
        **dict.fromkeys(LEAD_KEYS, on_lead),
        **dict.fromkeys(OPPORTUNITY_KEYS, on_opportunity),
        SNAPSHOT_KEY: on_snapshot,
    },
    requires={
        **dict.fromkeys(LEAD_KEYS, LEAD),
        **dict.fromkeys(OPPORTUNITY_KEYS, OPPORTUNITY),
        SNAPSHOT_KEY: SNAPSHOT,
    },
    tables=[
        lead_facts,
        opportunity_facts,
        acquisition_daily,
        campaign_leads_daily,
        sales_pipeline_daily,
        forecast_snapshot_facts,
    ],
)


def subscriptions(rt=None):
    return [PROJECTION.subscription()]
