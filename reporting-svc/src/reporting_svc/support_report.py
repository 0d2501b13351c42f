"""Report 4, the support desk: read from support_daily (never from the facts), grouped by
period (periods.py) and any of agent, team, channel."""

from __future__ import annotations

from collections.abc import Iterator

import sqlalchemy as sa

from crm.reporting.v1 import reporting_service_pb2 as pb
from crm_chassis import documents
from crm_chassis.errors import InvalidArgument

from . import periods
from .tables import SUPPORT_MEASURES, support_daily

DIMENSIONS = ("agent", "team", "channel")


def parse(req: pb.GetSupportReportRequest, prefix: str = "") -> dict:
    q = periods.parse_request(req, prefix)
    dims = []
    for i, d in enumerate(req.dimensions):
        d = d.strip().lower()
        if d not in DIMENSIONS:
            raise InvalidArgument.field(
                f"{prefix}dimensions[{i}]", f"unknown dimension {d!r}; use agent, team or channel"
            )
        if d not in dims:
            dims.append(d)
    return {**q, "dims": dims}


def _row(m, key: str, q: dict) -> pb.SupportRow:
    def ratio(a, b):
        return float(m[a]) / m[b] if m[b] else 0.0

    return pb.SupportRow(
        period_key=key,
        period_label=periods.label(key, q["period"], q["calendar"], q["lang"]) if key or q["period"] == "all" else "",
        agent=m.get("agent", ""),
        team=m.get("team", ""),
        channel=m.get("channel", ""),
        requests=m["requests"],
        closed=m["closed"],
        complaints=m["complaints"],
        complaint_rate=ratio("complaints", "requests"),
        avg_first_response_seconds=ratio("first_response_seconds", "first_responses"),
        avg_resolution_seconds=ratio("resolution_seconds", "resolutions"),
        avg_exchanges=ratio("exchanges", "requests"),
        sla_attainment=ratio("sla_met", "sla_targets"),
        sla_targets=m["sla_targets"],
        sla_breaches=m["sla_breaches"],
        csat_average=ratio("csat_sum", "csat_count"),
        csat_count=m["csat_count"],
        calls=m["calls"],
    )


def report(conn: sa.Connection, q: dict) -> pb.GetSupportReportResponse:
    t = support_daily
    sums = [sa.cast(sa.func.coalesce(sa.func.sum(t.c[m]), 0), sa.BigInteger).label(m) for m in SUPPORT_MEASURES]
    where = []
    if q["start"]:
        where.append(t.c.day >= q["start"])
    if q["end"]:
        where.append(t.c.day <= q["end"])
    key = periods.key_expr(t.c.day, q["period"], q["calendar"]).label("period_key")
    dims = [t.c[d] for d in q["dims"]]
    # a group whose facts all moved elsewhere (a ticket reassigned, a call's agent corrected)
    # sums to zero: not a row of the report, however its events arrived
    nonzero = sa.or_(*(sa.func.sum(t.c[m]) != 0 for m in SUPPORT_MEASURES))
    rows_q = sa.select(key, *dims, *sums).where(*where).group_by(key, *dims).having(nonzero).order_by(key, *dims)
    if q["period"] == "all":
        rows_q = sa.select(*dims, *sums).where(*where).group_by(*dims).having(nonzero).order_by(*dims)
    total_q = sa.select(sa.func.count().label("n"), *sums).where(*where)
    rows = []
    for r in conn.execute(rows_q):
        m = dict(r._mapping)
        rows.append(_row(m, m.pop("period_key", ""), q))
    tot = conn.execute(total_q).one()._mapping
    if not tot["n"]:
        return pb.GetSupportReportResponse()
    return pb.GetSupportReportResponse(rows=rows, total=_row(dict(tot), "", {**q, "period": "all"}))


HEADERS = {  # field: (English, Persian)
    "period_label": ("Period", "دوره"),
    "agent": ("Agent", "کارشناس"),
    "team": ("Team", "تیم"),
    "channel": ("Channel", "کانال"),
    "requests": ("Requests", "درخواست‌ها"),
    "closed": ("Closed", "بسته‌شده"),
    "complaints": ("Complaints", "شکایت‌ها"),
    "complaint_rate": ("Complaint rate", "نرخ شکایت"),
    "avg_first_response_seconds": ("Avg first response (s)", "میانگین اولین پاسخ (ثانیه)"),
    "avg_resolution_seconds": ("Avg resolution (s)", "میانگین زمان حل (ثانیه)"),
    "avg_exchanges": ("Avg exchanges", "میانگین تبادل"),
    "sla_attainment": ("SLA attainment", "تحقق SLA"),
    "sla_breaches": ("SLA breaches", "نقض SLA"),
    "csat_average": ("CSAT", "رضایت"),
    "csat_count": ("Surveys", "نظرسنجی‌ها"),
    "calls": ("Calls", "تماس‌ها"),
}


def export_rows(resp: pb.GetSupportReportResponse, q: dict) -> tuple[list[documents.Column], Iterator[dict]]:
    lang = 1 if q["lang"] == "fa" else 0
    fields = ["period_label", *q["dims"], *[f for f in HEADERS if f not in ("period_label", *DIMENSIONS)]]
    columns = [documents.Column(f, HEADERS[f][lang]) for f in fields]

    def rows():
        for r in resp.rows:
            yield {f: round(v, 4) if isinstance(v := getattr(r, f), float) else v for f in fields}

    return columns, rows()
