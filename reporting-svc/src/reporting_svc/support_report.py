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
from .tables import EXPECTATION_MEASURES, SUPPORT_MEASURES, expectation_daily, support_daily, support_monthly

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


COARSE = ("month", "quarter", "year", "all")


_HAS_MONTHLY = sa.select(sa.func.to_regclass("support_monthly").is_not(None))


def _source(conn: sa.Connection, q: dict, monthly: bool = True) -> tuple[sa.FromClause, sa.ColumnElement, list]:
    """What the desk report aggregates: support_daily over the range, or, by month, quarter,
    year or all when the range holds a whole month, support_monthly's whole months of the
    calendar (for all: Gregorian) with the ragged edges' days from support_daily, as one
    subquery of (period_key, team, agent, channel, measures). The sums per group are the same
    (a month's row is the sum of its days' rows), so are the report's rows."""
    d = support_daily
    cols = ["team", "agent", "channel", *SUPPORT_MEASURES]
    calendar = q["calendar"] if q["period"] != "all" else "gregorian"
    months = periods.whole_months(q["start"], q["end"], calendar) if monthly and q["period"] in COARSE else None
    if months is not None and not conn.execute(_HAS_MONTHLY).scalar():
        months = None  # a database before migration 0016
    if months is None:
        return d, periods.key_expr(d.c.day, q["period"], q["calendar"]), periods.in_range(d.c.day, q)
    lo, hi = months
    m = support_monthly
    where = [m.c.calendar == calendar]
    if lo is not None:
        where.append(m.c.month >= lo)
    if hi is not None:
        where.append(m.c.month < hi)
    parts = [sa.select(periods.key_expr(m.c.month, q["period"], q["calendar"]).label("period_key"),
                       *(m.c[c] for c in cols)).where(*where)]  # fmt: skip
    edges = []
    if lo is not None and q["start"] is not None and q["start"] < lo:
        edges.append(sa.and_(d.c.day >= q["start"], d.c.day < lo))
    if hi is not None and q["end"] is not None and hi <= q["end"]:
        edges.append(sa.and_(d.c.day >= hi, d.c.day <= q["end"]))
    if edges:
        key = periods.key_expr(d.c.day, q["period"], q["calendar"]).label("period_key")
        parts.append(sa.select(key, *(d.c[c] for c in cols)).where(sa.or_(*edges)))
    u = sa.union_all(*parts).subquery("support_rows") if len(parts) > 1 else parts[0].subquery("support_rows")
    return u, u.c.period_key, []


def report(conn: sa.Connection, q: dict, monthly: bool = True) -> pb.GetSupportReportResponse:
    """The desk report (and the expectations part); monthly=False reads support_daily alone
    (the tests compare both, the scale bench times both)."""
    t, key, where = _source(conn, q, monthly)
    sums = [sa.cast(sa.func.coalesce(sa.func.sum(t.c[m]), 0), sa.BigInteger).label(m) for m in SUPPORT_MEASURES]
    key = key.label("period_key")
    dims = [t.c[d] for d in q["dims"]]
    # a group whose facts all moved elsewhere (a ticket reassigned, a call's agent corrected)
    # sums to zero: not a row of the report, however its events arrived
    nonzero = sa.or_(*(sa.func.sum(t.c[m]) != 0 for m in SUPPORT_MEASURES))
    rows_q = sa.select(key, *dims, *sums).where(*where).group_by(key, *dims).having(nonzero).order_by(key, *dims)
    if q["period"] == "all":
        rows_q = sa.select(*dims, *sums).where(*where).group_by(*dims).having(nonzero).order_by(*dims)
    total_q = sa.select(*sums).where(*where)
    # whether the range holds any support_daily row (the total is shown then, even all zero)
    any_q = sa.select(sa.exists(sa.select(support_daily.c.day).where(*periods.in_range(support_daily.c.day, q))))
    rows = []
    for r in conn.execute(rows_q):
        m = dict(r._mapping)
        rows.append(_row(m, m.pop("period_key", ""), q))
    out = pb.GetSupportReportResponse(expectations=expectations(conn, q))
    if conn.execute(any_q).scalar():
        tot = conn.execute(total_q).one()._mapping
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
