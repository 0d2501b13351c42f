"""Report 4, the support desk: read from support_daily (never from the facts), grouped by
period (periods.py) and any of agent, team, channel; and the expectation surveys' zone of
tolerance per dimension from expectation_daily (adequate, desired and perceived means, MSA =
perceived - adequate, MSS = perceived - desired, below / within / above the zone)."""

from __future__ import annotations

from collections.abc import Iterator

import sqlalchemy as sa

from crm.reporting.v1 import reporting_service_pb2 as pb
from crm_chassis import documents
from crm_chassis.errors import InvalidArgument

from . import periods
from .tables import EXPECTATION_MEASURES, SUPPORT_MEASURES, expectation_daily, support_daily

DIMENSIONS = ("agent", "team", "channel")
PARTS = ("desk", "expectations")


def parse(req: pb.GetSupportReportRequest, prefix: str = "") -> dict:
    q = periods.parse_request(req, prefix)
    dims = periods.dimensions(req.dimensions, DIMENSIONS, prefix)
    part = (getattr(req, "part", "") or "desk").strip().lower()  # ExportSupportReportRequest's
    if part not in PARTS:
        raise InvalidArgument.field(f"{prefix}part", f"unknown part {part!r}; use desk or expectations")
    return {**q, "dims": dims, "part": part}


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
    where = periods.in_range(t.c.day, q)
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
    out = pb.GetSupportReportResponse(expectations=expectations(conn, q))
    if tot["n"]:
        out.rows.extend(rows)
        out.total.CopyFrom(_row(dict(tot), "", {**q, "period": "all"}))
    return out


def zone_position(perceived: float, adequate: float, desired: float) -> str:
    if perceived < adequate:
        return "below"
    return "above" if perceived > desired else "within"


def expectations(conn: sa.Connection, q: dict) -> list[pb.ExpectationRow]:
    """The zone of tolerance per period, agent / team (as asked) and dimension, from
    expectation_daily: mean adequate, desired and perceived levels, MSA and MSS."""
    t = expectation_daily
    where = periods.in_range(t.c.day, q)
    keys = [t.c[d] for d in q["dims"] if d in ("agent", "team")]
    if q["period"] != "all":
        keys.insert(0, periods.key_expr(t.c.day, q["period"], q["calendar"]).label("period_key"))
    keys.append(t.c.dimension)
    sums = [sa.cast(sa.func.sum(t.c[m]), sa.BigInteger).label(m) for m in EXPECTATION_MEASURES]
    stmt = sa.select(*keys, *sums).where(*where).group_by(*keys).having(sa.func.sum(t.c.answers) != 0).order_by(*keys)
    out = []
    for r in conn.execute(stmt):
        m = r._mapping
        n = m["answers"]
        adequate, desired, perceived = m["adequate_sum"] / n, m["desired_sum"] / n, m["perceived_sum"] / n
        key = m.get("period_key", "")
        out.append(
            pb.ExpectationRow(
                period_key=key,
                period_label=periods.label(key, q["period"], q["calendar"], q["lang"]),
                agent=m.get("agent", ""),
                team=m.get("team", ""),
                dimension=m["dimension"],
                answers=n,
                adequate_mean=adequate,
                desired_mean=desired,
                perceived_mean=perceived,
                # from the sums (exact integers) rather than the rounded means
                adequacy=(m["perceived_sum"] - m["adequate_sum"]) / n,
                superiority=(m["perceived_sum"] - m["desired_sum"]) / n,
                zone_position=zone_position(m["perceived_sum"], m["adequate_sum"], m["desired_sum"]),
            )
        )
    return out


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


EXPECTATION_HEADERS = {  # field: (English, Persian)
    "period_label": ("Period", "دوره"),
    "agent": ("Agent", "کارشناس"),
    "team": ("Team", "تیم"),
    "dimension": ("Dimension", "بُعد"),
    "answers": ("Answers", "پاسخ‌ها"),
    "adequate_mean": ("Adequate (mean)", "کافی (میانگین)"),
    "desired_mean": ("Desired (mean)", "مطلوب (میانگین)"),
    "perceived_mean": ("Perceived (mean)", "دریافت‌شده (میانگین)"),
    "adequacy": ("Adequacy (MSA)", "کفایت (MSA)"),
    "superiority": ("Superiority (MSS)", "برتری (MSS)"),
    "zone_position": ("Against the zone", "نسبت به محدوده تحمل"),
}


def export_rows(resp: pb.GetSupportReportResponse, q: dict) -> tuple[list[documents.Column], Iterator[dict]]:
    lang = 1 if q["lang"] == "fa" else 0
    if q.get("part") == "expectations":
        fields = ["period_label", *(d for d in q["dims"] if d != "channel"), *list(EXPECTATION_HEADERS)[3:]]
        columns = [documents.Column(f, EXPECTATION_HEADERS[f][lang]) for f in fields]
        return columns, (
            {f: round(v, 4) if isinstance(v := getattr(r, f), float) else v for f in fields} for r in resp.expectations
        )
    fields = ["period_label", *q["dims"], *[f for f in HEADERS if f not in ("period_label", *DIMENSIONS)]]
    columns = [documents.Column(f, HEADERS[f][lang]) for f in fields]

    def rows():
        for r in resp.rows:
            yield {f: round(v, 4) if isinstance(v := getattr(r, f), float) else v for f in fields}

    return columns, rows()
