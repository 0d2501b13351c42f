"""Report 1, acquisition-source effectiveness: read from acquisition_daily, per period and
source (customers, leads, conversion, won opportunities and revenue per currency)."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import sqlalchemy as sa

from crm.reporting.v1 import reporting_service_pb2 as pb
from crm_chassis import documents, money

from . import periods
from .tables import acquisition_daily


def parse(req: pb.GetAcquisitionReportRequest, prefix: str = "") -> dict:
    return {**periods.parse_request(req, prefix), "sources": sorted({s.strip() for s in req.sources if s.strip()})}


ACQ_COUNTS = ("customers", "leads", "converted_leads", "won_opportunities")


def report(conn: sa.Connection, q: dict) -> pb.GetAcquisitionReportResponse:
    t = acquisition_daily
    where = []
    if q["start"]:
        where.append(t.c.day >= q["start"])
    if q["end"]:
        where.append(t.c.day <= q["end"])
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
    out = pb.GetAcquisitionReportResponse()
    for row in rows.values():
        if not (row.customers or row.leads or row.won_opportunities):
            continue  # everything it had moved away (deleted, reopened)
        row.conversion_rate = row.converted_leads / row.leads if row.leads else 0.0
        out.rows.append(row)
    return out


HEADERS = {
    "period_label": ("Period", "دوره"),
    "source": ("Acquisition source", "منبع جذب"),
    "customers": ("Customers", "مشتریان"),
    "leads": ("Leads", "سرنخ‌ها"),
    "converted_leads": ("Converted", "تبدیل‌شده"),
    "conversion_rate": ("Conversion rate", "نرخ تبدیل"),
    "won_opportunities": ("Won", "موفق"),
    "won_revenue": ("Won revenue", "درآمد"),
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
            }

    return columns, rows()
