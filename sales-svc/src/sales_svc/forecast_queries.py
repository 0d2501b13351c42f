"""The forecast's SQL: set-based, date-bucketed in the database, converted to the reporting
currency with the stored rates. Nothing here loops over opportunity rows in Python.

Each figure query has two levels: the inner one sums the rows per (period bucket, group,
currency, day), the outer one multiplies each such sum by the rate of its currency on its day
(the latest stored rate on or before it; 1 for the reporting currency, 10 for IRT to IRR) and
sums per (bucket, group). A stored rate is looked up once per currency and day, not per
opportunity; the fixed ones need no lookup.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from crm_chassis.errors import FailedPrecondition
from crm_chassis.money import RIALS_PER_TOMAN

from .forecast_periods import Period, start_of_day
from .forecast_tables import AMOUNTS, COUNTS, exchange_rates
from .tables import invoices, leads, opportunities, opportunity_lines, product_lines, products, teams

o = opportunities.c
GROUP_BY = ("owner", "team", "product", "product_line", "none")
ZERO = Decimal(0)


def fixed_rate(currency: str, reporting: str) -> Decimal | None:
    """The rate that needs no table: 1 to itself, and rial/toman (1 IRT = 10 IRR)."""
    if currency == reporting:
        return Decimal(1)
    if (currency, reporting) == ("IRT", "IRR"):
        return Decimal(RIALS_PER_TOMAN)
    if (currency, reporting) == ("IRR", "IRT"):
        return Decimal(1) / RIALS_PER_TOMAN
    return None


def fixed_rate_expr(currency: sa.ColumnElement, reporting: str) -> sa.ColumnElement:
    """The fixed rate of `currency` (NULL when it has none)."""
    whens = []
    for cur in sorted({reporting, "IRR", "IRT"}):
        rate = fixed_rate(cur, reporting)
        if rate is not None:
            whens.append((currency == cur, sa.cast(sa.literal(str(rate)), sa.Numeric)))
    return sa.case(*whens, else_=sa.null())


def stored_rate(currency: sa.ColumnElement, day: sa.ColumnElement, reporting: str) -> sa.ScalarSelect:
    """The latest stored rate of `currency` to `reporting` on or before `day` (an index probe)."""
    r = exchange_rates.c
    return (
        sa.select(r.rate)
        .where(r.currency_code == currency, r.to_currency == reporting, r.rate_date <= day)
        .order_by(r.rate_date.desc())
        .limit(1)
        .scalar_subquery()
    )


def missing_rate(currencies: Sequence[str] | None, day: dt.date | None, reporting: str) -> FailedPrecondition:
    cur = ", ".join(sorted(set(currencies or [])))
    return FailedPrecondition(
        f"no exchange rate from {cur} to {reporting} on or before {day}: set one (SetExchangeRate) to convert "
        f"amounts in {cur}",
        reason="EXCHANGE_RATE_MISSING",
        metadata={"currency_code": cur, "reporting_currency_code": reporting, "date": str(day)},
    )


def converted_sums(
    conn: sa.Connection, base: sa.Select, amounts: Sequence[str], counts: Sequence[str], reporting: str
) -> list[sa.Row]:
    """Rows (bucket, grp, *amounts converted, *counts) of `base`, whose columns are bucket, grp,
    currency_code, day and the named sums; FAILED_PRECONDITION naming the currency when a rate
    is missing."""
    # The stored rates are looked up once per distinct (currency, day) among the rows that need
    # one (at most the currencies × the days of the range, whatever the number of opportunities),
    # then joined back; the fixed ones (day NULL, see rate_day) need no lookup. This keeps the
    # planner's estimate small too (a high one turns on JIT compilation, slower than the query).
    b = base.cte("b")
    pairs = sa.select(b.c.currency_code, b.c.day).where(b.c.day.is_not(None)).distinct().subquery("p")
    looked = sa.select(
        pairs.c.currency_code, pairs.c.day, stored_rate(pairs.c.currency_code, pairs.c.day, reporting).label("rate")
    ).subquery("k")
    rate = sa.case(
        (b.c.day.is_(None), fixed_rate_expr(b.c.currency_code, reporting)),
        else_=looked.c.rate,
    )
    rated = (
        sa.select(b, rate.label("rate"))
        .select_from(b.outerjoin(looked, sa.and_(looked.c.currency_code == b.c.currency_code, looked.c.day == b.c.day)))
        .subquery("r")
    )
    q = (
        sa.select(
            rated.c.bucket,
            rated.c.grp,
            *(sa.func.coalesce(sa.func.sum(rated.c[a] * rated.c.rate), 0).label(a) for a in amounts),
            *(sa.func.coalesce(sa.func.sum(rated.c[c]), 0).label(c) for c in counts),
            sa.func.array_agg(sa.distinct(rated.c.currency_code))
            .filter(rated.c.rate.is_(None))
            .label("missing_currencies"),
            sa.func.min(rated.c.day).filter(rated.c.rate.is_(None)).label("missing_day"),
        )
        .group_by(rated.c.bucket, rated.c.grp)
        .order_by(rated.c.bucket, rated.c.grp)
    )
    rows = conn.execute(q).all()
    missing = [r for r in rows if r.missing_currencies]
    if missing:
        currencies = {c for r in missing for c in r.missing_currencies}
        raise missing_rate(sorted(currencies), min(r.missing_day for r in missing), reporting)
    return rows


def _bounds(periods: Sequence[Period]) -> sa.BindParameter:
    return sa.bindparam("bounds", [p.start for p in periods] + [periods[-1].end], type_=pg.ARRAY(sa.Date))


def tehran_day(ts: sa.ColumnElement) -> sa.ColumnElement:
    return sa.cast(sa.func.timezone("Asia/Tehran", ts), sa.Date)


@dataclass(frozen=True)
class Cell:
    bucket: int  # 1-based index of the period
    group: str
    amounts: dict[str, Decimal]
    counts: dict[str, int]


def _group_column(group_by: str, src, line=None) -> sa.ColumnElement:
    if group_by == "owner":
        return src.c.owner_id
    if group_by == "team":
        return sa.func.coalesce(sa.cast(src.c.team_id, sa.Text), "")
    if group_by == "product_line":
        return sa.func.coalesce(sa.cast(src.c.product_line_id, sa.Text), "")
    if group_by == "product":
        return sa.func.coalesce(sa.cast(line.c.product_id, sa.Text), "")
    return sa.literal("")


_SOURCE_COLUMNS = (
    o.id,
    o.owner_id,
    o.team_id,
    o.product_line_id,
    o.currency_code,
    o.amount,
    o.probability,
    o.forecast_category,
)


def rate_day(currency: sa.ColumnElement, day: sa.ColumnElement, reporting: str) -> sa.ColumnElement:
    """The day whose rate applies; NULL for a currency with a fixed rate (its rows then share
    one group per bucket and owner instead of one per day)."""
    fixed = sorted(c for c in {reporting, "IRR", "IRT"} if fixed_rate(c, reporting) is not None)
    return sa.case((currency.in_(fixed), sa.null()), else_=day)


def forecast_cells(
    conn: sa.Connection,
    periods: Sequence[Period],
    group_by: str,
    visible: sa.ColumnElement[bool],
    reporting: str,
    owner: str | None = None,
) -> list[Cell]:
    """The forecast figures per (period, group) of the opportunities `visible` selects: open ones
    by expected close date, won ones by their close time's Tehran day."""
    start, end = periods[0].start, periods[-1].end
    mine = [o.delete_time.is_(None), visible] + ([o.owner_id == owner] if owner is not None else [])
    # Two arms, each served by its partial covering index (migration 0010): the open ones
    # closing in the range, the won ones won in it.
    src = sa.union_all(
        sa.select(*_SOURCE_COLUMNS, sa.literal("open").label("state"), o.expected_close_date.label("day")).where(
            o.state == "open", o.expected_close_date >= start, o.expected_close_date < end, *mine
        ),
        sa.select(*_SOURCE_COLUMNS, sa.literal("won").label("state"), tehran_day(o.close_time).label("day")).where(
            o.state == "won", o.close_time >= start_of_day(start), o.close_time < start_of_day(end), *mine
        ),
    ).subquery("src")
    frm = src
    amount = src.c.amount
    if group_by == "product":  # the lines' amounts; an opportunity without lines in group ""
        line = opportunity_lines.alias("l")
        frm = src.outerjoin(line, line.c.opportunity_id == src.c.id)
        amount = sa.func.coalesce(line.c.amount, src.c.amount)
        grp = _group_column(group_by, src, line)
    else:
        grp = _group_column(group_by, src)
    is_open = src.c.state == "open"
    is_won = src.c.state == "won"
    category = src.c.forecast_category
    kept = category != "omitted"

    def total(expr, cond):
        return sa.func.coalesce(sa.func.sum(expr).filter(cond), 0)

    def how_many(cond):
        # An opportunity has several lines of one product at most once in a count.
        return (sa.func.count(sa.distinct(src.c.id)) if group_by == "product" else sa.func.count()).filter(cond)

    base = (
        sa.select(
            sa.func.width_bucket(src.c.day, _bounds(periods)).label("bucket"),
            grp.label("grp"),
            src.c.currency_code.label("currency_code"),
            rate_day(src.c.currency_code, src.c.day, reporting).label("day"),
            total(amount, is_open & kept).label("open_amount"),
            total(amount * src.c.probability / 100, is_open & kept).label("weighted_amount"),
            total(amount, is_open & (category == "pipeline")).label("pipeline_amount"),
            total(amount, is_open & (category == "best_case")).label("best_case_amount"),
            total(amount, is_open & category.in_(("commit", "closed"))).label("commit_amount"),
            total(amount, is_won & kept).label("closed_amount"),
            total(amount, is_open & ~kept).label("omitted_amount"),
            total(amount, is_won).label("won_amount"),
            how_many(is_open & kept).label("open_count"),
            how_many(is_won).label("won_count"),
            how_many(is_open & ~kept).label("omitted_count"),
        )
        .select_from(frm)
        .group_by(sa.text("1"), sa.text("2"), sa.text("3"), sa.text("4"))
    )
    rows = converted_sums(conn, base, AMOUNTS, COUNTS, reporting)
    return [
        Cell(r.bucket, r.grp, {a: Decimal(r._mapping[a]) for a in AMOUNTS}, {c: int(r._mapping[c]) for c in COUNTS})
        for r in rows
        if 1 <= r.bucket <= len(periods)
    ]


def group_names(conn: sa.Connection, group_by: str, keys: set[str]) -> dict[str, tuple[str, str]]:
    """{key: (group resource name, display name)} for the keys of a forecast's rows."""
    ids = sorted(k for k in keys if k)
    if group_by == "owner":
        return {k: (k, k) for k in keys}
    table, collection = {
        "team": (teams, "teams"),
        "product": (products, "products"),
        "product_line": (product_lines, "productLines"),
    }.get(group_by, (None, ""))
    out = {k: ("", "") for k in keys}
    if table is None or not ids:
        return out
    for row in conn.execute(sa.select(table.c.id, table.c.name).where(table.c.id.in_(ids))):
        out[str(row.id)] = (f"{collection}/{row.id}", row.name)
    for k in ids:
        if out[k] == ("", ""):
            out[k] = (f"{collection}/{k}", "")
    return out


def actual_revenue(
    conn: sa.Connection,
    periods: Sequence[Period],
    visible_opportunities: sa.ColumnElement[bool],
    visible_invoices: sa.ColumnElement[bool],
    reporting: str,
    owner: str | None = None,
) -> dict[tuple[int, str], dict[str, Decimal]]:
    """{(bucket, owner): {"won": ..., "invoiced": ...}}: revenue won (opportunities won in the
    period) and invoiced (invoices issued in it, net of tax, minus credit notes)."""
    start, end = periods[0].start, periods[-1].end
    day = tehran_day(o.close_time)
    won = (
        sa.select(
            sa.func.width_bucket(day, _bounds(periods)).label("bucket"),
            o.owner_id.label("grp"),
            o.currency_code.label("currency_code"),
            rate_day(o.currency_code, day, reporting).label("day"),
            sa.func.sum(o.amount).label("won"),
        )
        .where(
            o.state == "won",
            o.delete_time.is_(None),
            o.close_time >= start_of_day(start),
            o.close_time < start_of_day(end),
            visible_opportunities,
        )
        .group_by(sa.text("1"), sa.text("2"), sa.text("3"), sa.text("4"))
    )
    i = invoices.c
    sign = sa.case((i.kind == "credit_note", -1), else_=1)
    billed = (
        sa.select(
            sa.func.width_bucket(i.issue_date, _bounds(periods)).label("bucket"),
            i.owner_id.label("grp"),
            i.currency_code.label("currency_code"),
            rate_day(i.currency_code, i.issue_date, reporting).label("day"),
            sa.func.sum(sign * (i.total - i.tax_total)).label("invoiced"),
        )
        .where(
            i.issue_date >= start,
            i.issue_date < end,
            i.state.not_in(("draft", "cancelled")),
            visible_invoices,
        )
        .group_by(sa.text("1"), sa.text("2"), sa.text("3"), sa.text("4"))
    )
    if owner is not None:
        won = won.where(o.owner_id == owner)
        billed = billed.where(i.owner_id == owner)
    out: dict[tuple[int, str], dict[str, Decimal]] = {}
    for r in converted_sums(conn, won, ["won"], [], reporting):
        out.setdefault((r.bucket, r.grp), {"won": ZERO, "invoiced": ZERO})["won"] = Decimal(r.won)
    for r in converted_sums(conn, billed, ["invoiced"], [], reporting):
        out.setdefault((r.bucket, r.grp), {"won": ZERO, "invoiced": ZERO})["invoiced"] = Decimal(r.invoiced)
    return out


@dataclass(frozen=True)
class CycleRow:
    group: str
    count: int
    mean: float
    median: float
    p90: float


def sales_cycle(
    conn: sa.Connection, start: dt.date, end: dt.date, group_by: str, visible: sa.ColumnElement[bool]
) -> tuple[list[CycleRow], CycleRow]:
    """Days from lead creation to win, per group and overall, for opportunities won in
    [start, end) that came from a lead."""
    days = sa.extract("epoch", o.close_time - leads.c.create_time) / 86400
    if group_by == "product_line":
        grp = sa.func.coalesce(sa.cast(sa.func.coalesce(o.product_line_id, leads.c.product_line_id), sa.Text), "")
    else:
        grp = sa.func.coalesce(sa.func.nullif(leads.c.source, ""), o.source)
    stats = (
        sa.func.count(),
        sa.func.avg(days),
        sa.func.percentile_cont(0.5).within_group(days),
        sa.func.percentile_cont(0.9).within_group(days),
    )
    where = (
        o.state == "won",
        o.delete_time.is_(None),
        o.close_time >= start_of_day(start),
        o.close_time < start_of_day(end),
        visible,
    )
    frm = opportunities.join(leads, leads.c.id == o.lead_id)
    grouped = conn.execute(
        sa.select(grp.label("grp"), *stats)
        .select_from(frm)
        .where(*where)
        .group_by(sa.text("1"))
        .order_by(sa.text("2 DESC"), sa.text("1"))
    ).all()
    total = conn.execute(sa.select(sa.literal(""), *stats).select_from(frm).where(*where)).one()

    def row(r) -> CycleRow:
        return CycleRow(r[0], int(r[1]), float(r[2] or 0), float(r[3] or 0), float(r[4] or 0))

    return [row(r) for r in grouped], row(total)
