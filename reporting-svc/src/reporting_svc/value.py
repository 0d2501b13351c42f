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
from decimal import Decimal

import sqlalchemy as sa

from crm.sales.v1 import sales_events_pb2 as ev
from crm_chassis import dates, money
from crm_chassis.errors import FieldViolation, InvalidArgument
from crm_chassis.messaging.consumer import Requires
from crm_chassis.messaging.envelope import Event

from .projection import Facts, Projection, Rollup, per_event, tehran_day
from .value_tables import VALUE_MEASURES, customer_value_daily, invoice_value_facts

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


INVOICES = Facts(invoice_value_facts, ROLLUP, _contrib)
on_invoice = per_event(fact_invoice)
INVOICE = Requires(ev.InvoiceEvent, ("invoice", "customer"))

PROJECTION = Projection(
    name="value",
    domain="sales",
    handlers=dict.fromkeys(INVOICE_KEYS, on_invoice),
    requires=dict.fromkeys(INVOICE_KEYS, INVOICE),
    tables=[invoice_value_facts, customer_value_daily],
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


def _range(t, start, end):
    where = []
    if start:
        where.append(t.c.day >= start)
    if end:
        where.append(t.c.day <= end)
    return where


# -- Pareto ----------------------------------------------------------------------------------


def pareto(conn: sa.Connection, currency: str, start: dt.date | None, end: dt.date | None) -> dict:
    """Customers with a positive net revenue in the period, ordered by it (highest first, then by
    id): the top ceil(20%) and their share; ntile(10) deciles with cumulative shares."""
    t = customer_value_daily
    per = (
        sa.select(t.c.customer_id, sa.func.sum(t.c.revenue).label("rev"))
        .where(t.c.currency == currency, *_range(t, start, end))
        .group_by(t.c.customer_id)
        .having(sa.func.sum(t.c.revenue) > 0)
        .cte("per")
    )
    order = (per.c.rev.desc(), per.c.customer_id)
    ranked = sa.select(
        per.c.rev,
        sa.func.row_number().over(order_by=order).label("rn"),
        sa.func.count().over().label("n"),
        sa.func.sum(per.c.rev).over().label("total"),
        sa.func.ntile(10).over(order_by=order).label("decile"),
    ).cte("ranked")
    top_k = sa.func.ceil(ranked.c.n * 0.2)
    q = (
        sa.select(
            ranked.c.decile,
            sa.func.count().label("customers"),
            sa.func.sum(ranked.c.rev).label("revenue"),
            sa.func.max(ranked.c.rn).label("last_rn"),
            sa.func.max(ranked.c.n).label("n"),
            sa.func.max(ranked.c.total).label("total"),
            sa.func.coalesce(sa.func.sum(ranked.c.rev).filter(ranked.c.rn <= top_k), 0).label("top"),
            sa.func.max(top_k).label("top_k"),
        )
        .group_by(ranked.c.decile)
        .order_by(ranked.c.decile)
    )
    rows = conn.execute(q).all()
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

RFM_SQL = f"""
WITH per AS (
    SELECT customer_id,
           :as_of - max(day) FILTER (WHERE purchases > 0) AS recency_days,
           count(*) FILTER (WHERE purchases > 0) AS frequency,
           sum(revenue) AS monetary
    FROM customer_value_daily
    WHERE currency = :currency AND (CAST(:start AS date) IS NULL OR day >= :start) AND day <= :as_of
    GROUP BY customer_id
    HAVING count(*) FILTER (WHERE purchases > 0) > 0
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


def rfm_counts(conn: sa.Connection, currency: str, start, end) -> list:
    q = sa.text(f"SELECT segment, count(*) AS customers, sum(monetary) AS revenue FROM ({RFM_SQL}) s GROUP BY segment")
    got = {r.segment: r for r in conn.execute(q, _rfm_params(currency, start, end))}
    return [(s, got[s].customers, Decimal(got[s].revenue)) for s in SEGMENT_IDS if s in got]


def rfm_page(conn: sa.Connection, currency: str, start, end, segment: str | None, after: list | None, limit: int,
             customer: str | None = None) -> list:  # fmt: skip
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
    q = sa.text(f"SELECT * FROM ({RFM_SQL}) s {cond} ORDER BY monetary DESC, customer_id LIMIT :limit")
    return conn.execute(q, {**params, "limit": limit}).all()
