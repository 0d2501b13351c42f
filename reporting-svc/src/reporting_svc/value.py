"""Customer value (issue 12, report 6): the invoice projection and the Pareto and RFM reports.

Projection (sales-svc's invoice events): an invoice counts on the Tehran day it was paid
(state paid), its net amount (total less tax, IRT kept as IRR); a credit note counts negative
on the day it was issued (invoice.credited.v1). The events carry no cost, so "profit" is this
revenue net of tax and credit notes. Facts are version-guarded by the event's time; the rollup
customer_value_daily keeps per day x customer x currency: revenue, purchases (paid invoices)
and credit notes. Reports read the rollup only, one SQL statement each with window functions.
"""

from __future__ import annotations

import datetime as dt
import functools
from decimal import Decimal

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from crm.sales.v1 import sales_events_pb2 as ev
from crm_chassis import dates, money
from crm_chassis.errors import FieldViolation, InvalidArgument
from crm_chassis.messaging.consumer import Requires
from crm_chassis.messaging.envelope import Event

from .projection import Facts, Projection, Rollup, execute_rows, per_event, rowset, tehran_day
from .value_tables import VALUE_MEASURES, customer_value_daily, customer_value_summary, invoice_value_facts

ROLLUP = Rollup(customer_value_daily, ("day", "customer_id", "currency"), VALUE_MEASURES)
INVOICE_KEYS = ["invoice.issued.v1", "invoice.paid.v1", "invoice.overdue.v1", "invoice.credited.v1"]
PROFIT_BASIS = "revenue net of tax and credit notes (the sales events carry no cost)"


def _contrib(f) -> list:
    m = f._mapping if hasattr(f, "_mapping") else f
    if m["value_time"] is None or not m["customer_id"]:
        return []
    key = {"day": tehran_day(m["value_time"]), "customer_id": m["customer_id"], "currency": m["currency"]}
    if m["kind"] == "credit_note":
        return [(key, {"revenue": -m["net_amount"], "credit_notes": 1})]
    if m["state"] == "paid":
        return [(key, {"revenue": m["net_amount"], "purchases": 1})]
    return []


def fact_invoice(event: Event):
    inv = event.parse(ev.InvoiceEvent)
    currency = inv.total.currency_code or "IRR"
    total = money.to_decimal(inv.total, "total") if inv.total.currency_code else Decimal(0)
    tax = money.to_decimal(inv.tax_total, "tax_total") if inv.tax_total.currency_code else Decimal(0)
    at = inv.event_time.ToDatetime(tzinfo=dt.UTC) if inv.HasField("event_time") else event.time
    kind = inv.kind or "invoice"
    counts = kind == "credit_note" or inv.state == "paid"
    values = {
        "version": at,
        "customer_id": inv.customer.removeprefix("customers/"),
        "kind": kind,
        "state": inv.state,
        "currency": "IRR" if currency == "IRT" else currency,
        "net_amount": money.rials(total - tax, currency),
        "value_time": at if counts else None,
    }
    return INVOICES, {"invoice_id": inv.invoice.removeprefix("invoices/")}, values


def _summary_keys(rows) -> list[tuple[str, str]]:
    return sorted({(k["customer_id"], k["currency"]) for r in rows for k, _ in _contrib(r)})


@functools.cache
def _summary_statements():
    s, d = customer_value_summary, customer_value_daily
    ks = sa.bindparam("ks", expanding=True)
    cids = sa.bindparam("cids", expanding=True)
    # 1. lock (or make) each summary row touched, in key order, and empty it: a second replica
    # waits here until the first commits, then reads the daily rows with what it wrote
    # (the keys as one row set, in key order: one statement compiled once, projection.execute_rows)
    v = rowset(s, ("customer_id", "currency"))
    ins = pg.insert(s).from_select(["customer_id", "currency"], sa.select(v.c.customer_id, v.c.currency))
    reset = ins.on_conflict_do_update(
        index_elements=["customer_id", "currency"],
        set_={"first_day": None, "last_day": None, "last_purchase_day": None, "purchase_days": 0, "purchases": 0,
              "revenue": 0, "credit_notes": 0},
    )  # fmt: skip
    # 2. its figures from the customer's daily rows (those with any non-zero measure)
    nonzero = sa.or_(d.c.revenue != 0, d.c.purchases != 0, d.c.credit_notes != 0)
    agg = (
        sa.select(
            d.c.customer_id, d.c.currency, sa.func.min(d.c.day).label("first_day"),
            sa.func.max(d.c.day).label("last_day"),
            sa.func.max(d.c.day).filter(d.c.purchases > 0).label("last_purchase_day"),
            sa.func.count().filter(d.c.purchases > 0).label("purchase_days"),
            sa.func.sum(d.c.purchases).label("purchases"), sa.func.sum(d.c.revenue).label("revenue"),
            sa.func.sum(d.c.credit_notes).label("credit_notes"),
        )
        .where(d.c.customer_id.in_(cids), sa.tuple_(d.c.customer_id, d.c.currency).in_(ks), nonzero)
        .group_by(d.c.customer_id, d.c.currency)
        .subquery("agg")
    )  # fmt: skip
    fill = (
        s.update()
        .where(s.c.customer_id == agg.c.customer_id, s.c.currency == agg.c.currency)
        .values({c: agg.c[c] for c in SUMMARY_FIGURES})
    )
    # 3. a customer left with no non-zero row (an invoice moved to another customer) has none
    drop = s.delete().where(sa.tuple_(s.c.customer_id, s.c.currency).in_(ks), s.c.first_day.is_(None))
    return reset, fill, drop


SUMMARY_FIGURES = (
    "first_day",
    "last_day",
    "last_purchase_day",
    "purchase_days",
    "purchases",
    "revenue",
    "credit_notes",
)


def refresh_summary(conn: sa.Connection, rows: list) -> None:
    """customer_value_summary's rows of the customers x currencies these invoice facts (old and
    new versions) count for, recomputed from customer_value_daily after its rollup was written
    (the Facts' `then`): the summary stays what a GROUP BY of the daily rollup gives, whatever
    order the events came in."""
    keys = _summary_keys(rows)
    if not keys:
        return
    reset, fill, drop = _summary_statements()
    execute_rows(conn, reset, [{"customer_id": c, "currency": cur} for c, cur in keys])
    params = {"ks": keys, "cids": sorted({c for c, _ in keys})}
    conn.execute(fill, params)
    conn.execute(drop, {"ks": keys})


INVOICES = Facts(invoice_value_facts, ROLLUP, _contrib, then=(refresh_summary,))
on_invoice = per_event(fact_invoice)
INVOICE = Requires(ev.InvoiceEvent, ("invoice", "customer"))

PROJECTION = Projection(
    name="value",
    domain="sales",
    handlers=dict.fromkeys(INVOICE_KEYS, on_invoice),
    requires=dict.fromkeys(INVOICE_KEYS, INVOICE),
    tables=[invoice_value_facts, customer_value_daily, customer_value_summary],
)


def subscriptions(rt=None):
    return [PROJECTION.subscription()]


# -- requests --------------------------------------------------------------------------------


def currency_of(value: str, field: str = "currency_code") -> str:
    code = (value or "IRR").strip().upper()
    if len(code) != 3 or not code.isalpha():
        raise InvalidArgument.field(field, "must be an ISO 4217 code such as IRR")
    return "IRR" if code == "IRT" else code


def period_of(
    req, start_field: str = "start_date", end_field: str = "end_date"
) -> tuple[dt.date | None, dt.date | None]:
    bad: list[FieldViolation] = []
    start = dates.from_proto(getattr(req, start_field), start_field, bad) if req.HasField(start_field) else None
    end = dates.from_proto(getattr(req, end_field), end_field, bad) if req.HasField(end_field) else None
    if bad:
        raise InvalidArgument(bad)
    if start and end and end < start:
        raise InvalidArgument.field(end_field, f"must not be before {start_field}")
    return start, end


# -- Pareto ----------------------------------------------------------------------------------


# The per-customer figures of a range, from customer_value_daily (per_daily), or, for a range
# with no start, from customer_value_summary (per_summary): every customer with no daily row
# after the end (`late`) as summarised; those with one (the end is before their last day) from
# their daily rows up to the end. The same figures either way: the summary is the GROUP BY of
# the daily rows. Pareto reads revenue; RFM the purchase days and the last of them.
PER_DAILY = """
    SELECT customer_id, sum(revenue) AS revenue, count(*) FILTER (WHERE purchases > 0) AS purchase_days,
           max(day) FILTER (WHERE purchases > 0) AS last_purchase_day
    FROM customer_value_daily
    WHERE currency = :currency AND (CAST(:start AS date) IS NULL OR day >= :start)
      AND (CAST(:end AS date) IS NULL OR day <= :end)
    GROUP BY customer_id
"""
PER_SUMMARY = """
    SELECT customer_id, revenue, purchase_days, last_purchase_day
    FROM customer_value_summary s
    WHERE currency = :currency AND NOT EXISTS (SELECT 1 FROM late WHERE late.customer_id = s.customer_id)
    UNION ALL
    SELECT customer_id, sum(revenue), count(*) FILTER (WHERE purchases > 0), max(day) FILTER (WHERE purchases > 0)
    FROM customer_value_daily
    WHERE currency = :currency AND day <= :end AND customer_id IN (SELECT customer_id FROM late)
    GROUP BY customer_id
"""
LATE = """late AS MATERIALIZED (
    SELECT DISTINCT customer_id FROM customer_value_daily
    WHERE currency = :currency AND CAST(:end AS date) IS NOT NULL AND day > :end
)"""
# RFM sorts every customer of a currency (209,582 at 10,000,000 events) three times: in memory
# rather than in temporary files (the default 4 MB spilled each window's sort to disk): 418 ms
# against 449 ms at 4 MB over the summary (median of 5, 10M events). Pareto is left at the
# server's setting: its hash of a year's customers took longer with 64 MB (337 against 240 ms).
WORK_MEM = "64MB"


def _per(start, summary: bool = True) -> tuple[str, str]:
    """(the WITH items before `per`, per's SELECT) for a range starting at `start`; summary=False:
    from the daily rollup whatever the range (the tests compare both, the scale bench times both)."""
    if start is None and summary:
        return LATE + ",", PER_SUMMARY
    return "", PER_DAILY


# The summary is read once the daily rollup is large (ANALYZE's estimate of its rows; -1 before
# the first ANALYZE): below that the daily rollup answers as fast (33,103 rows at 1,000,000
# events: RFM in 142 ms), and it stays the one source small databases read.
SUMMARY_FROM_ROWS = 50_000
_USE_SUMMARY = sa.text(
    "SELECT to_regclass('customer_value_summary') IS NOT NULL AND coalesce((SELECT reltuples FROM pg_class"
    " WHERE oid = to_regclass('customer_value_daily')), 0) >= :n"
)


def _summary(conn: sa.Connection, summary: bool | None) -> bool:
    """summary=None: by the daily rollup's size (SUMMARY_FROM_ROWS); True / False: as given."""
    if summary is None:
        return bool(conn.execute(_USE_SUMMARY, {"n": SUMMARY_FROM_ROWS}).scalar())
    return summary


def _work_mem(conn: sa.Connection, work_mem: str | None) -> None:
    if work_mem:
        conn.exec_driver_sql(f"SET LOCAL work_mem = '{work_mem}'")


def pareto(conn: sa.Connection, currency: str, start: dt.date | None, end: dt.date | None, summary: bool | None = None,
           work_mem: str | None = None) -> dict:  # fmt: skip
    """Customers with a positive net revenue in the period, ordered by it (highest first, then by
    id): the top ceil(20%) and their share; ntile(10) deciles with cumulative shares."""
    before, per = _per(start, _summary(conn, summary))
    q = f"""
    WITH {before} per AS MATERIALIZED (
        SELECT customer_id, revenue AS rev FROM ({per}) p WHERE revenue > 0
    ), tot AS (
        SELECT count(*) AS n, sum(rev) AS total, ceil(count(*) * 0.2) AS top_k FROM per
    ), ranked AS (
        SELECT rev, row_number() OVER w AS rn, ntile(10) OVER w AS decile
        FROM per WINDOW w AS (ORDER BY rev DESC, customer_id)
    )
    SELECT decile, count(*) AS customers, sum(rev) AS revenue, max(rn) AS last_rn, max(n) AS n,
           max(total) AS total, coalesce(sum(rev) FILTER (WHERE rn <= top_k), 0) AS top, max(top_k) AS top_k
    FROM ranked CROSS JOIN tot GROUP BY decile ORDER BY decile
    """
    _work_mem(conn, work_mem)
    rows = conn.execute(sa.text(q), {"currency": currency, "start": start, "end": end}).all()
    if not rows:
        return {"customers": 0, "total": Decimal(0), "top_customers": 0, "top_share": 0.0, "curve": []}
    total, n = Decimal(rows[0].total), rows[0].n
    cum, curve = Decimal(0), []
    for r in rows:
        cum += r.revenue
        curve.append(
            {"decile": r.decile, "customers": r.customers, "revenue": Decimal(r.revenue),
             "customer_share": r.last_rn / n, "revenue_share": float(cum / total)}
        )  # fmt: skip
    top = sum(Decimal(r.top) for r in rows)
    return {
        "customers": n,
        "total": total,
        "top_customers": int(rows[0].top_k),
        "top_share": float(top / total),
        "curve": curve,
    }


# -- RFM -------------------------------------------------------------------------------------

# (segment, condition on the recency score r and frequency score f), first match wins.
SEGMENTS = (
    ("champions", "r >= 4 AND f >= 4"),
    ("potential_loyalists", "r >= 4 AND f >= 2"),
    ("new", "r >= 4"),
    ("loyal", "r = 3 AND f >= 4"),
    ("needs_attention", "r = 3 AND f >= 2"),
    ("about_to_sleep", "r = 3"),
    ("cannot_lose", "r = 1 AND f = 5"),
    ("at_risk", "f >= 3"),
    ("hibernating", "TRUE"),
)
SEGMENT_IDS = tuple(s for s, _ in SEGMENTS)
SEGMENT_CASE = "CASE " + " ".join(f"WHEN {c} THEN '{s}'" for s, c in SEGMENTS) + " END"


def rfm_sql(start, summary: bool = True) -> str:
    """RFM over [start, as_of] (no start: from the first day), one row per customer with a
    purchase day in it."""
    before, per = (part.replace(":end", ":as_of") for part in _per(start, summary))
    return f"""
WITH {before} per AS (
    SELECT customer_id, CAST(:as_of AS date) - last_purchase_day AS recency_days, purchase_days AS frequency,
           revenue AS monetary
    FROM ({per}) p
    WHERE purchase_days > 0
), scored AS (
    SELECT per.*,
           ntile(5) OVER (ORDER BY recency_days DESC, customer_id) AS r,
           ntile(5) OVER (ORDER BY frequency, customer_id) AS f,
           ntile(5) OVER (ORDER BY monetary, customer_id) AS m
    FROM per
)
SELECT scored.*, {SEGMENT_CASE} AS segment FROM scored
"""


def _rfm_params(currency, start, end):
    return {"currency": currency, "start": start, "as_of": end or dates.today()}


def rfm_counts(conn: sa.Connection, currency: str, start, end, summary: bool | None = None,
               work_mem: str | None = WORK_MEM) -> list:  # fmt: skip
    q = sa.text(
        f"SELECT segment, count(*) AS customers, sum(monetary) AS revenue FROM ({rfm_sql(start, _summary(conn, summary))}) s GROUP BY segment"
    )
    _work_mem(conn, work_mem)
    got = {r.segment: r for r in conn.execute(q, _rfm_params(currency, start, end))}
    return [(s, got[s].customers, Decimal(got[s].revenue)) for s in SEGMENT_IDS if s in got]


def rfm_page(conn: sa.Connection, currency: str, start, end, segment: str | None, after: list | None, limit: int,
             customer: str | None = None, summary: bool | None = None, work_mem: str | None = WORK_MEM) -> list:  # fmt: skip
    """A segment's customers by monetary (highest first, then id), after the keyset `after`."""
    where, params = [], _rfm_params(currency, start, end)
    if segment:
        where.append("segment = :segment")
        params["segment"] = segment
    if customer:
        where.append("customer_id = :customer")
        params["customer"] = customer
    if after:
        where.append("(monetary < :k_m OR (monetary = :k_m AND customer_id > :k_id))")
        params.update(k_m=Decimal(after[0]), k_id=after[1])
    cond = ("WHERE " + " AND ".join(where)) if where else ""
    q = sa.text(
        f"SELECT * FROM ({rfm_sql(start, _summary(conn, summary))}) s {cond} ORDER BY monetary DESC, customer_id LIMIT :limit"
    )
    _work_mem(conn, work_mem)
    return conn.execute(q, {**params, "limit": limit}).all()
