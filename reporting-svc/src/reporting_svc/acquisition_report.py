"""Report 1, acquisition-source effectiveness: read from acquisition_daily, per period and
source (customers, leads, conversion, won opportunities and revenue per currency); and the cost
per acquisition from campaign_leads_daily and campaign_facts.

Cost allocation: a campaign's cost (its newest, in rials) is shared equally among the leads
attributed to it (LeadEvent.campaign_id; all of them, of any period), and each lead's share
counts on the lead's creation day (Tehran) under the lead's source: the source and period get
Σ over campaigns of cost x (its leads there) / (all its leads), rounded to the rial at the end.
cost_per_customer = that / the customers of the source and period. A campaign no lead is
attributed to has no source to go to: its cost is the response's unallocated_campaign_cost."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import sqlalchemy as sa

from crm.reporting.v1 import reporting_service_pb2 as pb
from crm_chassis import documents, money

from . import periods
from .tables import acquisition_daily, campaign_facts, campaign_leads_daily


def parse(req: pb.GetAcquisitionReportRequest, prefix: str = "") -> dict:
    return {**periods.parse_request(req, prefix), "sources": sorted({s.strip() for s in req.sources if s.strip()})}


ACQ_COUNTS = ("customers", "leads", "converted_leads", "won_opportunities")


def report(conn: sa.Connection, q: dict) -> pb.GetAcquisitionReportResponse:
    t = acquisition_daily
    where = periods.in_range(t.c.day, q)
    if q["sources"]:
        where.append(t.c.source.in_(q["sources"]))
    key = periods.key_expr(t.c.day, q["period"], q["calendar"]).label("period_key")
    counts = [sa.cast(sa.func.sum(t.c[m]), sa.BigInteger).label(m) for m in ACQ_COUNTS]
    q_rows = (
        sa.select(key, t.c.source, t.c.currency, *counts, sa.func.sum(t.c.won_amount).label("won_amount"))
        .where(*where)
        .group_by(key, t.c.source, t.c.currency)
        .having(sa.or_(*(sa.func.sum(t.c[m]) != 0 for m in (*ACQ_COUNTS, "won_amount"))))  # facts moved away: no row
        .order_by(key, t.c.source, t.c.currency)
    )
    rows: dict[tuple[str, str], pb.AcquisitionRow] = {}
    for r in conn.execute(q_rows):
        row = rows.get((r.period_key, r.source))
        if row is None:
            row = rows[(r.period_key, r.source)] = pb.AcquisitionRow(
                period_key=r.period_key,
                period_label=periods.label(r.period_key, q["period"], q["calendar"], q["lang"]),
                source=r.source,
            )
        row.customers += r.customers
        row.leads += r.leads
        row.converted_leads += r.converted_leads
        row.won_opportunities += r.won_opportunities
        if r.currency and r.won_amount:
            row.won_revenue.append(money.to_money(Decimal(r.won_amount), r.currency))
    costs = allocated_costs(conn, q)
    out = pb.GetAcquisitionReportResponse()
    for row in rows.values():
        if not (row.customers or row.leads or row.won_opportunities):
            continue  # everything it had moved away (deleted, reopened)
        row.conversion_rate = row.converted_leads / row.leads if row.leads else 0.0
        cost = costs.get((row.period_key, row.source), Decimal(0))
        row.campaign_cost.CopyFrom(money.to_money(cost, "IRR"))
        per = (cost / row.customers).quantize(Decimal(1)) if row.customers else Decimal(0)
        row.cost_per_customer.CopyFrom(money.to_money(per, "IRR"))
        out.rows.append(row)
    if out.rows:
        out.unallocated_campaign_cost.CopyFrom(money.to_money(unallocated_cost(conn), "IRR"))
    return out


def _lead_totals():
    c = campaign_leads_daily
    return (
        sa.select(c.c.campaign_id, sa.func.sum(c.c.leads).label("n"))
        .group_by(c.c.campaign_id)
        .having(sa.func.sum(c.c.leads) > 0)
        .subquery("campaign_leads")
    )


def allocated_costs(conn: sa.Connection, q: dict) -> dict[tuple[str, str], Decimal]:
    """(period key, source) -> the campaign cost allocated to it, in rials (module docstring)."""
    d, f, totals = campaign_leads_daily, campaign_facts, _lead_totals()
    where = [f.c.cost != 0, d.c.leads != 0, *periods.in_range(d.c.day, q)]
    if q["sources"]:
        where.append(d.c.source.in_(q["sources"]))
    key = periods.key_expr(d.c.day, q["period"], q["calendar"]).label("period_key")
    share = sa.func.round(sa.func.sum(f.c.cost * d.c.leads / totals.c.n), 0).label("cost")
    stmt = (
        sa.select(key, d.c.source, share)
        .select_from(
            d.join(totals, totals.c.campaign_id == d.c.campaign_id).join(f, f.c.campaign_id == d.c.campaign_id)
        )
        .where(*where)
        .group_by(key, d.c.source)
    )
    return {(r.period_key, r.source): Decimal(r.cost) for r in conn.execute(stmt)}


def unallocated_cost(conn: sa.Connection) -> Decimal:
    f, totals = campaign_facts, _lead_totals()
    stmt = (
        sa.select(sa.func.coalesce(sa.func.sum(f.c.cost), 0))
        .select_from(f.outerjoin(totals, totals.c.campaign_id == f.c.campaign_id))
        .where(totals.c.campaign_id.is_(None))
    )
    return Decimal(conn.execute(stmt).scalar())


HEADERS = {
    "period_label": ("Period", "دوره"),
    "source": ("Acquisition source", "منبع جذب"),
    "customers": ("Customers", "مشتریان"),
    "leads": ("Leads", "سرنخ‌ها"),
    "converted_leads": ("Converted", "تبدیل‌شده"),
    "conversion_rate": ("Conversion rate", "نرخ تبدیل"),
    "won_opportunities": ("Won", "موفق"),
    "won_revenue": ("Won revenue", "درآمد"),
    "campaign_cost": ("Campaign cost (IRR)", "هزینه کمپین (ریال)"),
    "cost_per_customer": ("Cost per customer (IRR)", "هزینه هر مشتری (ریال)"),
}


def export_rows(resp: pb.GetAcquisitionReportResponse, q: dict) -> tuple[list[documents.Column], Iterator[dict]]:
    lang = 1 if q["lang"] == "fa" else 0
    columns = [documents.Column(f, h[lang]) for f, h in HEADERS.items()]

    def rows():
        for r in resp.rows:
            yield {
                "period_label": r.period_label,
                "source": r.source,
                "customers": r.customers,
                "leads": r.leads,
                "converted_leads": r.converted_leads,
                "conversion_rate": round(r.conversion_rate, 4),
                "won_opportunities": r.won_opportunities,
                "won_revenue": "; ".join(
                    money.format_amount(money.to_decimal(m), m.currency_code, persian_digits=lang == 1)
                    for m in r.won_revenue
                ),
                "campaign_cost": money.to_decimal(r.campaign_cost).to_integral_value(),
                "cost_per_customer": money.to_decimal(r.cost_per_customer).to_integral_value(),
            }

    return columns, rows()
