"""Report 5, campaigns: per campaign its goal and how much of it is achieved, responses,
attributed leads, orders and revenue, cost and ROI.

- campaign.launched / updated / completed / paused / resumed / cancelled .v1 keep each
  campaign's newest state (CampaignEvent.version): name, channel, state, recipients, goal
  (leads, orders, revenue or responses, and its target) and cost (often entered afterwards: an
  update). A draft (created, never launched) is not reported.
- Attribution: a response.recorded.v1 counts for its campaign; sales-svc's leads, orders and
  invoices count for the campaign whose id they carry (`campaign_id`): a lead once, an order
  while it is not cancelled, an invoice's total as revenue while it is paid, less the credit
  notes (invoice.credited.v1, kind credit_note) carrying the campaign's id. Each is one fact
  (newest version: the lead's version, else the event time), summed per campaign in
  campaign_stats, moving when its state changes.
- Amounts in rials (IRT as IRR: tomans x 10); an amount in another currency is not added to a
  rial campaign's revenue (it is counted in `orders` only).
- ROI = (revenue - cost) / cost, when the campaign has a cost.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import sqlalchemy as sa

from crm.campaign.v1 import campaign_events_pb2 as cev
from crm.reporting.v1 import reporting_service_pb2 as pb
from crm.sales.v1 import sales_events_pb2 as sev
from crm_chassis import money
from crm_chassis.messaging.consumer import Requires
from crm_chassis.messaging.envelope import Event

from .projection import Facts, Projection, Rollup, per_event
from .sales import LEAD_KEYS
from .tables import CAMPAIGN_MEASURES, campaign_attribution_facts, campaign_facts, campaign_stats

ROLLUP = Rollup(campaign_stats, ("campaign_id",), CAMPAIGN_MEASURES)
# Every change of a launched campaign: a cost entered after it completed comes as updated.
CAMPAIGN_KEYS = [f"campaign.{k}.v1" for k in ("launched", "updated", "completed", "paused", "resumed", "cancelled")]
ORDER_KEYS = [f"order.{k}.v1" for k in ("placed", "delivered", "cancelled")]
INVOICE_KEYS = [f"invoice.{k}.v1" for k in ("issued", "paid", "overdue", "credited")]


def _id(name: str) -> str:
    return name.removeprefix("campaigns/")


def _rials(m) -> Decimal:
    """A Money in rials; 0 for none or for another currency."""
    if m.currency_code not in ("IRR", "IRT"):
        return Decimal(0)
    return money.rials(money.to_decimal(m, "amount"), m.currency_code)


def _micros(msg, event: Event) -> int:
    t = msg.event_time.ToDatetime(tzinfo=dt.UTC) if msg.HasField("event_time") else event.time
    return int(t.timestamp() * 1_000_000)


def fact_campaign(event: Event):
    c = event.parse(cev.CampaignEvent)
    currency = c.cost.currency_code or c.goal_target.currency_code or "IRR"
    goal = (
        money.to_decimal(c.goal_target, "goal_target") if c.goal_target.currency_code else Decimal(c.goal_target.units)
    )
    if c.goal_kind == "revenue":
        goal = money.rials(goal, currency)
    values = {
        "version": c.version, "display_name": c.display_name, "channel": c.channel, "state": c.state,
        "goal_kind": c.goal_kind, "goal_target": goal, "currency": "IRR" if currency == "IRT" else currency,
        "cost": _rials(c.cost) if c.cost.currency_code in ("IRR", "IRT") else Decimal(0), "recipients": c.recipients,
    }  # fmt: skip
    return CAMPAIGNS, {"campaign_id": _id(c.campaign)}, values


def _m(f):
    return f._mapping if hasattr(f, "_mapping") else f


def _attribution_contrib(f) -> list:
    m = _m(f)
    if not m["counts"]:
        return []
    measures = {"revenue": m["amount"]} if m["measure"] == "revenue" else {m["measure"]: 1}
    return [({"campaign_id": m["campaign_id"]}, measures)]


def _attribution(ref: str, campaign: str, version: int, measure: str, counts: bool, amount=Decimal(0)):
    if not campaign:
        return None
    values = {"version": version, "campaign_id": _id(campaign), "measure": measure, "counts": counts, "amount": amount}
    return ATTRIBUTED, {"ref": ref}, values


def fact_response(event: Event):
    r = event.parse(cev.ResponseEvent)
    return _attribution(r.response, r.campaign, _micros(r, event), "responses", True)


def fact_lead(event: Event):
    lead = event.parse(sev.LeadEvent)
    return _attribution(lead.lead, lead.campaign_id, lead.version, "leads", True)


def fact_order(event: Event):
    o = event.parse(sev.OrderEvent)
    cancelled = event.routing_key == "order.cancelled.v1" or o.state == "cancelled"
    return _attribution(o.order, o.campaign_id, _micros(o, event), "orders", not cancelled)


def fact_invoice(event: Event):
    i = event.parse(sev.InvoiceEvent)
    if i.kind == "credit_note":  # it reverses (part of) a paid invoice: its total comes off
        return _attribution(i.invoice, i.campaign_id, _micros(i, event), "revenue", True, -_rials(i.total))
    return _attribution(i.invoice, i.campaign_id, _micros(i, event), "revenue", i.state == "paid", _rials(i.total))


CAMPAIGNS = Facts(campaign_facts, ROLLUP, lambda f: [])
ATTRIBUTED = Facts(campaign_attribution_facts, ROLLUP, _attribution_contrib)

PROJECTIONS = [
    Projection(
        "campaigns",
        "campaign",
        {**dict.fromkeys(CAMPAIGN_KEYS, per_event(fact_campaign)), "response.recorded.v1": per_event(fact_response)},
        {
            **dict.fromkeys(CAMPAIGN_KEYS, Requires(cev.CampaignEvent, ("campaign", "version"))),
            "response.recorded.v1": Requires(cev.ResponseEvent, ("response",)),
        },
        [campaign_facts, campaign_stats, campaign_attribution_facts],
        tracks=False,  # the loyalty projection keeps campaign-svc's lag row
    ),
    Projection(
        "campaigns-sales",
        "sales",
        {
            **dict.fromkeys(LEAD_KEYS, per_event(fact_lead)),
            **dict.fromkeys(ORDER_KEYS, per_event(fact_order)),
            **dict.fromkeys(INVOICE_KEYS, per_event(fact_invoice)),
        },
        {
            **dict.fromkeys(LEAD_KEYS, Requires(sev.LeadEvent, ("lead",))),
            **dict.fromkeys(ORDER_KEYS, Requires(sev.OrderEvent, ("order",))),
            **dict.fromkeys(INVOICE_KEYS, Requires(sev.InvoiceEvent, ("invoice",))),
        },
        [campaign_stats, campaign_attribution_facts],
        tracks=False,
    ),
]


def subscriptions(rt=None):
    return [p.subscription() for p in PROJECTIONS]


# -- the report --------------------------------------------------------------------------------
def parse(req: pb.GetCampaignReportRequest) -> dict:
    return {"campaigns": sorted({_id(c.strip()) for c in req.campaigns if c.strip()})}


def report(conn: sa.Connection, q: dict) -> pb.GetCampaignReportResponse:
    c, s = campaign_facts, campaign_stats
    stmt = sa.select(c, *(s.c[m] for m in CAMPAIGN_MEASURES)).select_from(
        c.outerjoin(s, s.c.campaign_id == c.c.campaign_id)
    )
    if q["campaigns"]:
        stmt = stmt.where(c.c.campaign_id.in_(q["campaigns"]))
    out = pb.GetCampaignReportResponse()
    for r in conn.execute(stmt.order_by(c.c.campaign_id)):
        got = {m: r._mapping[m] or 0 for m in CAMPAIGN_MEASURES}
        achieved = Decimal(got.get(r.goal_kind, 0))
        row = out.rows.add(
            campaign=f"campaigns/{r.campaign_id}", display_name=r.display_name, channel=r.channel, state=r.state,
            recipients=r.recipients, responses=got["responses"], leads=got["leads"], orders=got["orders"],
            goal_kind=r.goal_kind, goal_achieved=float(achieved), goal_target=float(r.goal_target),
            goal_share=float(achieved / r.goal_target) if r.goal_kind and r.goal_target else 0.0,
            roi=float((got["revenue"] - r.cost) / r.cost) if r.cost else 0.0,
        )  # fmt: skip
        row.revenue.CopyFrom(money.to_money(Decimal(got["revenue"]), "IRR"))
        row.cost.CopyFrom(money.to_money(Decimal(r.cost), "IRR"))
    return out
