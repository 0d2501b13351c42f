"""Report 3: the pipeline now and forecast against actual (proto/crm/reporting/v1/pipeline_report.proto).

- The pipeline (GetPipelineReport) reads sales_pipeline_daily's open measures: open
  opportunities per expected close period (periods.py, Gregorian or Jalali) and any of stage,
  owner, team and forecast category, per currency: count, amount, weighted amount.
- Forecast against actual (GetForecastReport) reads forecast_snapshot_facts (sales-svc's
  snapshots of the calendar and unit asked for) and sales_pipeline_daily's won measures (revenue
  won per Tehran day and owner), per period, owner and currency. A snapshot's figures as
  forecasts of the period's revenue: commit = the manager's adjusted commit, else won so far +
  open in commit; best case = won so far + commit + best_case; pipeline = won so far + every
  open opportunity (omitted excluded); weighted = won so far + Σ amount x probability / 100.
  Accuracy = actual won / commit (0 for a zero commit). The row's `latest` is the newest
  snapshot taken before the period ended (its last Tehran day).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from decimal import Decimal

import sqlalchemy as sa

from crm.reporting.v1 import pipeline_report_pb2 as pb
from crm_chassis import dates, documents, money
from crm_chassis.errors import InvalidArgument

from . import periods
from .sales import NO_DATE
from .tables import forecast_snapshot_facts, sales_pipeline_daily

DIMENSIONS = ("stage", "owner", "team", "forecast_category")
FORECAST_UNITS = ("month", "quarter", "year")
NO_DATE_LABEL = ("No date", "بدون تاریخ")


def parse_pipeline(req) -> dict:
    return {**periods.parse_request(req), "dims": periods.dimensions(req.dimensions, DIMENSIONS)}


def _money(amount, currency: str):
    return money.to_money(Decimal(amount), currency)


def _number(m) -> Decimal:
    """A Money's amount for a file: 5000000, not 5000000.000000000."""
    d = money.to_decimal(m)
    return d.to_integral_value() if d == d.to_integral_value() else d.normalize()


def pipeline(conn: sa.Connection, q: dict) -> pb.GetPipelineReportResponse:
    t = sales_pipeline_daily
    where = periods.in_range(t.c.day, q)  # NO_DATE is before every start
    if q["end"]:
        where.append(t.c.day != NO_DATE)
    dims = [t.c[d] for d in q["dims"]]
    keys = list(dims)
    if q["period"] != "all":
        day_key = periods.key_expr(t.c.day, q["period"], q["calendar"])
        keys.insert(0, sa.case((t.c.day == NO_DATE, ""), else_=day_key).label("period_key"))
    measures = [
        sa.cast(sa.func.sum(t.c.open_opportunities), sa.BigInteger).label("n"),
        sa.func.sum(t.c.open_amount).label("amount"),
        sa.func.sum(t.c.weighted_amount).label("weighted"),
    ]
    names = [sa.func.max(t.c.stage_name).label("stage_name")] if "stage" in q["dims"] else []
    open_rows = sa.func.sum(t.c.open_opportunities) != 0
    rows_q = (
        sa.select(*keys, t.c.currency, *names, *measures)
        .where(*where)
        .group_by(*keys, t.c.currency)
        .having(open_rows)
        .order_by(*keys, t.c.currency)
    )
    totals_q = (
        sa.select(t.c.currency, *measures).where(*where).group_by(t.c.currency).having(open_rows).order_by(t.c.currency)
    )
    out = pb.GetPipelineReportResponse()
    lang = 1 if q["lang"] == "fa" else 0
    for r in conn.execute(rows_q):
        m = r._mapping
        k = m.get("period_key", "")
        if q["period"] == "all":
            label = periods.label("", "all", q["calendar"], q["lang"])
        else:
            label = periods.label(k, q["period"], q["calendar"], q["lang"]) if k else NO_DATE_LABEL[lang]
        out.rows.add(
            period_key=k,
            period_label=label,
            stage=m.get("stage", ""),
            stage_name=m.get("stage_name", "") or "",
            owner=m.get("owner", ""),
            team=m.get("team", ""),
            forecast_category=m.get("forecast_category", ""),
            opportunities=m["n"],
            amount=_money(m["amount"], m["currency"]),
            weighted_amount=_money(m["weighted"], m["currency"]),
        )
    for r in conn.execute(totals_q):
        out.totals.add(
            opportunities=r.n, amount=_money(r.amount, r.currency), weighted_amount=_money(r.weighted, r.currency)
        )
    return out


PIPELINE_HEADERS = {
    "period_label": ("Expected close", "موعد بستن"),
    "stage": ("Stage", "مرحله"),
    "owner": ("Owner", "مسئول"),
    "team": ("Team", "تیم"),
    "forecast_category": ("Forecast category", "دسته پیش‌بینی"),
    "currency": ("Currency", "ارز"),
    "opportunities": ("Opportunities", "فرصت‌ها"),
    "amount": ("Amount", "مبلغ"),
    "weighted_amount": ("Weighted amount", "مبلغ وزنی"),
}


def pipeline_export(resp: pb.GetPipelineReportResponse, q: dict) -> tuple[list[documents.Column], Iterator[dict]]:
    lang = 1 if q["lang"] == "fa" else 0
    fields = ["period_label", *q["dims"], "currency", "opportunities", "amount", "weighted_amount"]
    columns = [documents.Column(f, PIPELINE_HEADERS[f][lang]) for f in fields]

    def rows():
        for r in resp.rows:
            row = {
                "period_label": r.period_label,
                "stage": r.stage_name or r.stage,
                "owner": r.owner,
                "team": r.team,
                "forecast_category": r.forecast_category,
                "currency": r.amount.currency_code,
                "opportunities": r.opportunities,
                "amount": _number(r.amount),
                "weighted_amount": _number(r.weighted_amount),
            }
            yield {f: row[f] for f in fields}

    return columns, rows()


# -- forecast against actual -------------------------------------------------------------------
def parse_forecast(req) -> dict:
    q = periods.parse_request(req)
    unit, calendar = periods.check(req.period or "quarter", req.calendar or "jalali")
    if unit not in FORECAST_UNITS:
        raise InvalidArgument.field("period", f"unknown period {unit!r}; use month, quarter or year")
    owners = sorted({o.strip() for o in req.owners if o.strip()})
    return {**q, "period": unit, "calendar": calendar, "owners": owners}


def _key_of(conn: sa.Connection, day: dt.date | None, q: dict) -> str | None:
    if day is None:
        return None
    return conn.execute(sa.select(periods.key_expr(sa.literal(day, sa.Date), q["period"], q["calendar"]))).scalar()


def _figures(s, actual: Decimal) -> pb.ForecastSnapshotFigures:
    closed = Decimal(s.closed_amount)
    commit = Decimal(s.adjusted_commit) if s.adjusted_commit is not None else closed + Decimal(s.commit_amount)
    best = closed + Decimal(s.commit_amount) + Decimal(s.best_case_amount)
    out = pb.ForecastSnapshotFigures(
        snapshot=f"forecastSnapshots/{s.snapshot_id}",
        kind=s.kind,
        commit=_money(commit, s.currency),
        best_case=_money(best, s.currency),
        pipeline=_money(closed + Decimal(s.open_amount), s.currency),
        weighted=_money(closed + Decimal(s.weighted_amount), s.currency),
        accuracy=float(actual / commit) if commit else 0.0,
    )
    out.create_time.FromDatetime(s.create_time)
    return out


def forecast(conn: sa.Connection, q: dict) -> pb.GetForecastReportResponse:
    lo, hi = _key_of(conn, q["start"], q), _key_of(conn, q["end"], q)
    sf = forecast_snapshot_facts
    skey = periods.key_expr(sf.c.period_start, q["period"], q["calendar"])
    snaps_q = sa.select(skey.label("period_key"), sf).where(sf.c.calendar == q["calendar"], sf.c.unit == q["period"])
    t = sales_pipeline_daily
    akey = periods.key_expr(t.c.day, q["period"], q["calendar"])
    won_q = sa.select(
        akey.label("period_key"),
        t.c.owner,
        t.c.currency,
        sa.cast(sa.func.sum(t.c.won_opportunities), sa.BigInteger).label("n"),
        sa.func.sum(t.c.won_amount).label("amount"),
    ).where(t.c.won_opportunities != 0, t.c.day != NO_DATE)
    if q["owners"]:
        snaps_q = snaps_q.where(sf.c.owner.in_(q["owners"]))
        won_q = won_q.where(t.c.owner.in_(q["owners"]))
    if lo is not None:
        snaps_q, won_q = snaps_q.where(skey >= lo), won_q.where(akey >= lo)
    if hi is not None:
        snaps_q, won_q = snaps_q.where(skey <= hi), won_q.where(akey <= hi)
    won_q = won_q.group_by(akey, t.c.owner, t.c.currency).having(sa.func.sum(t.c.won_opportunities) != 0)
    won = {(r.period_key, r.owner, r.currency): (r.n, Decimal(r.amount)) for r in conn.execute(won_q)}
    snaps: dict[tuple, list] = {}
    for s in conn.execute(snaps_q.order_by(skey, sf.c.owner, sf.c.create_time, sf.c.snapshot_id)):
        snaps.setdefault((s.period_key, s.owner, s.currency), []).append(s)
    out = pb.GetForecastReportResponse()
    for key in sorted(set(won) | set(snaps)):
        n, actual = won.get(key, (0, Decimal(0)))
        period_key, owner, currency = key
        row = out.rows.add(
            period_key=period_key,
            period_label=periods.label(period_key, q["period"], q["calendar"], q["lang"]),
            owner=owner,
            currency_code=currency,
            actual_won=_money(actual, currency),
            won_opportunities=n,
        )
        latest = None
        for s in snaps.get(key, []):
            fig = _figures(s, actual)
            row.snapshots.append(fig)
            if s.create_time < dt.datetime.combine(s.period_end, dt.time(), dates.TEHRAN):
                latest = fig
        if latest is not None:
            row.latest.CopyFrom(latest)
            row.accuracy = latest.accuracy
    return out


FORECAST_HEADERS = {
    "period_label": ("Period", "دوره"),
    "owner": ("Owner", "مسئول"),
    "currency": ("Currency", "ارز"),
    "actual_won": ("Actual won", "فروش واقعی"),
    "won_opportunities": ("Won", "موفق"),
    "commit": ("Commit", "تعهد"),
    "best_case": ("Best case", "بهترین حالت"),
    "pipeline": ("Pipeline", "قیف فروش"),
    "weighted": ("Weighted", "وزنی"),
    "accuracy": ("Accuracy (actual / commit)", "دقت (واقعی / تعهد)"),
    "snapshots": ("Snapshots", "عکس‌های پیش‌بینی"),
    "snapshot": ("Latest snapshot", "آخرین عکس پیش‌بینی"),
}


def forecast_export(resp: pb.GetForecastReportResponse, q: dict) -> tuple[list[documents.Column], Iterator[dict]]:
    """One line per period, owner and currency, with the latest snapshot before the period's end."""
    lang = 1 if q["lang"] == "fa" else 0
    columns = [documents.Column(f, h[lang]) for f, h in FORECAST_HEADERS.items()]

    def amount(r, name):
        return _number(getattr(r.latest, name)) if r.HasField("latest") else None

    def rows():
        for r in resp.rows:
            yield {
                "period_label": r.period_label,
                "owner": r.owner,
                "currency": r.currency_code,
                "actual_won": _number(r.actual_won),
                "won_opportunities": r.won_opportunities,
                **{f: amount(r, f) for f in ("commit", "best_case", "pipeline", "weighted")},
                "accuracy": round(r.accuracy, 4),
                "snapshots": len(r.snapshots),
                "snapshot": r.latest.snapshot,
            }

    return columns, rows()
