"""Report 2, sales by segment: read from sales_daily (orders, quantity, revenue),
sales_buyers_daily (distinct customers) and lead_purchase_daily (days from lead to first
purchase), grouped by period (periods.py) and any of the dimensions. Never from the facts."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import sqlalchemy as sa

from crm.reporting.v1 import sales_report_pb2 as pb
from crm_chassis import documents, money
from crm_chassis.errors import InvalidArgument
from crm_chassis.persian import to_persian_digits

from . import periods
from .sales_tables import CUSTOMER_DIMS, lead_purchase_daily, sales_buyers_daily, sales_daily
from .value import currency_of

DIMENSIONS = (*CUSTOMER_DIMS, "product", "product_line")
TABLES = ("sales", "lead_to_purchase")
# (label, first day, last day or None)
BUCKETS = (("0", 0, 0), ("1-7", 1, 7), ("8-30", 8, 30), ("31-90", 31, 90), ("91-180", 91, 180),
           ("181-365", 181, 365), ("366+", 366, None))  # fmt: skip
LABELS = {  # value: (English, Persian)
    "unknown": ("Unknown", "نامشخص"),
    "female": ("Female", "زن"),
    "male": ("Male", "مرد"),
    "other": ("Other", "دیگر"),
    "person": ("Person", "حقیقی"),
    "organization": ("Organization", "حقوقی"),
    "end_consumer": ("End consumer", "مصرف‌کننده نهایی"),
    "intermediary": ("Intermediary", "واسطه"),
    "internal": ("Internal", "داخلی"),
}


def parse(req, prefix: str = "") -> dict:
    q = periods.parse_request(req, prefix)
    dims = periods.dimensions(req.dimensions, DIMENSIONS, prefix)
    table = (getattr(req, "table", "") or "sales").strip().lower()
    if table not in TABLES:
        raise InvalidArgument.field(f"{prefix}table", "use sales or lead_to_purchase")
    return {**q, "dims": dims, "currency": currency_of(req.currency_code, f"{prefix}currency_code"), "table": table}


def grain(dims: list[str]) -> str:
    """Which rows of the rollups answer: one per order (no product dimension), per order and
    product line, or per order and product; so an order counts once per group."""
    return "product" if "product" in dims else "line" if "product_line" in dims else "order"


def label(value: str, lang: str) -> str:
    fa = lang == "fa"
    if value in LABELS:
        return LABELS[value][1 if fa else 0]
    return to_persian_digits(value) if fa else value  # age bands: "25-34", "65+"


def _period_label(key: str, q: dict) -> str:
    return periods.label(key, q["period"], q["calendar"], q["lang"])


def _dims_of(row: dict, dims, q) -> dict:
    out = {d: row[d] for d in dims}
    for d in LABELLED:
        if d in dims:
            out[f"{d}_label"] = label(row[d], q["lang"])
    return out


def _grouped(t, q: dict, dims: list[str], by_period: bool, where: list, *measures):
    """SELECT [period_key,] dims, measures FROM t WHERE where GROUP BY [period_key,] dims: the
    period keys from periods.keys_by_day (once per day)."""
    where = [*where, *periods.in_range(t.c.day, q)]
    cols, source = [t.c[d] for d in dims], t
    if by_period:
        keys = periods.keys_by_day(t.c.day, where, q["period"], q["calendar"])
        cols.insert(0, keys.c.period_key)
        source = t.join(keys, keys.c.day == t.c.day)
    return sa.select(*cols, *measures).select_from(source).where(*where).group_by(*cols)


def _sales(conn, q: dict, dims: list[str], by_period: bool) -> list[dict]:
    g, cur = grain(dims), q["currency"]
    t, b = sales_daily, sales_buyers_daily
    sums = _grouped(
        t, q, dims, by_period, [t.c.grain == g, t.c.currency == cur],
        sa.cast(sa.func.sum(t.c.orders), sa.BigInteger).label("orders"),
        sa.func.sum(t.c.quantity).label("quantity"),
        sa.func.sum(t.c.revenue).label("revenue"),
    ).having(sa.func.sum(t.c.orders) != 0)  # its facts all moved elsewhere: no row  # fmt: skip
    buyers = _grouped(
        b, q, dims, by_period, [b.c.grain == g, b.c.currency == cur, b.c.orders > 0],
        sa.func.count(sa.distinct(b.c.customer_id)).label("customers"),
    )  # fmt: skip
    group = (["period_key"] if by_period else []) + dims
    counted = {tuple(r._mapping[k] for k in group): r.customers for r in conn.execute(buyers)}
    rows = []
    for r in conn.execute(sums):
        m = dict(r._mapping)
        m["customers"] = counted.get(tuple(m[k] for k in group), 0)
        rows.append(m)
    rows.sort(key=lambda m: tuple(m[k] for k in group))
    return rows


def _sales_row(m: dict, dims, q: dict) -> pb.SalesRow:
    cur = q["currency"]
    revenue = Decimal(m["revenue"])
    key = m.get("period_key", "")
    return pb.SalesRow(
        period_key=key,
        period_label=_period_label(key, q),
        **_dims_of(m, dims, q),
        orders=m["orders"],
        customers=m["customers"],
        quantity=_decimal_text(Decimal(m["quantity"])),
        revenue=money.to_money(revenue, cur),
        average_order_value=money.to_money(money.round_minor(revenue / m["orders"], cur), cur),
    )


def _decimal_text(d: Decimal) -> str:
    text = format(d.normalize(), "f")
    return "0" if text in ("-0", "") else text


def _lead(conn, q: dict, dims: list[str], by_period: bool) -> list[dict]:
    t = lead_purchase_daily
    stmt = _grouped(
        t, q, [*dims, "days"], by_period, [], sa.cast(sa.func.sum(t.c.customers), sa.BigInteger).label("n")
    ).having(sa.func.sum(t.c.customers) != 0)
    group = (["period_key"] if by_period else []) + dims
    hist: dict[tuple, dict] = {}
    for r in conn.execute(stmt):
        m = r._mapping
        k = tuple(m[c] for c in group)
        h = hist.setdefault(k, {**{c: m[c] for c in group}, "days": {}})
        h["days"][m["days"]] = h["days"].get(m["days"], 0) + m["n"]
    return [hist[k] for k in sorted(hist)]


def median(hist: dict[int, int]) -> float:
    """The median of values given as {value: count}."""
    n = sum(hist.values())
    if n == 0:
        return 0.0
    lo_i, hi_i = (n - 1) // 2, n // 2  # 0-based ranks of the middle one or two
    lo = hi = None
    seen = 0
    for v in sorted(hist):
        seen += hist[v]
        if lo is None and seen > lo_i:
            lo = v
        if seen > hi_i:
            hi = v
            break
    return (lo + hi) / 2


def _lead_row(h: dict, dims, q: dict) -> pb.LeadToPurchaseRow:
    days = h["days"]
    n = sum(days.values())
    key = h.get("period_key", "")
    buckets = [
        pb.DayBucket(
            label=lbl, min_days=lo, max_days=hi or 0,
            customers=sum(c for d, c in days.items() if d >= lo and (hi is None or d <= hi)),
        )
        for lbl, lo, hi in BUCKETS
    ]  # fmt: skip
    return pb.LeadToPurchaseRow(
        period_key=key,
        period_label=_period_label(key, q),
        **_dims_of(h, dims, q),
        customers=n,
        average_days=sum(d * c for d, c in days.items()) / n,
        median_days=median(days),
        buckets=buckets,
    )


def report(conn: sa.Connection, q: dict) -> pb.GetSalesReportResponse:
    dims = q["dims"]
    by_period = q["period"] != "all"
    out = pb.GetSalesReportResponse(currency_code=q["currency"])
    total = _sales(conn, q, [], False)
    if total:
        out.rows.extend(_sales_row(m, dims, q) for m in _sales(conn, q, dims, by_period))
        out.total.CopyFrom(_sales_row(total[0], [], {**q, "period": "all"}))
    lead_dims = [d for d in dims if d in CUSTOMER_DIMS]  # product dimensions do not apply
    lead_total = _lead(conn, q, [], False)
    if lead_total:
        out.lead_to_purchase.extend(_lead_row(h, lead_dims, q) for h in _lead(conn, q, lead_dims, by_period))
        out.lead_to_purchase_total.CopyFrom(_lead_row(lead_total[0], [], {**q, "period": "all"}))
    return out


HEADERS = {  # field: (English, Persian)
    "period_label": ("Period", "دوره"),
    "age_band": ("Age band", "گروه سنی"),
    "province": ("Province", "استان"),
    "city": ("City", "شهر"),
    "gender": ("Gender", "جنسیت"),
    "customer_type": ("Customer type", "نوع شخصیت"),
    "customer_kind": ("Customer kind", "نوع مشتری"),
    "product": ("Product", "محصول"),
    "product_line": ("Product line", "خط محصول"),
    "orders": ("Orders", "سفارش‌ها"),
    "customers": ("Customers", "مشتریان"),
    "quantity": ("Quantity", "تعداد"),
    "revenue": ("Revenue", "درآمد"),
    "average_order_value": ("Average order value", "میانگین ارزش سفارش"),
    "average_days": ("Average days to purchase", "میانگین روز تا خرید"),
    "median_days": ("Median days to purchase", "میانه روز تا خرید"),
}
LABELLED = ("age_band", "gender", "customer_type", "customer_kind")


def export_rows(resp: pb.GetSalesReportResponse, q: dict) -> tuple[list[documents.Column], Iterator[dict]]:
    lang = 1 if q["lang"] == "fa" else 0
    fa = lang == 1
    if q["table"] == "lead_to_purchase":
        dims = [d for d in q["dims"] if d in CUSTOMER_DIMS]
        measures = ["customers", "average_days", "median_days"]
        buckets = [f"days_{b[0]}" for b in BUCKETS]
        columns = [documents.Column(f, HEADERS[f][lang]) for f in ["period_label", *dims, *measures]]
        columns += [
            documents.Column(k, f"{'روز' if fa else 'days'} {to_persian_digits(b[0]) if fa else b[0]}")
            for k, b in zip(buckets, BUCKETS, strict=True)
        ]

        def lead_rows():
            for r in resp.lead_to_purchase:
                row = {"period_label": r.period_label}
                row.update({d: getattr(r, f"{d}_label") if d in LABELLED else getattr(r, d) for d in dims})
                row.update(customers=r.customers, average_days=round(r.average_days, 2), median_days=r.median_days)
                row.update({k: b.customers for k, b in zip(buckets, r.buckets, strict=True)})
                yield row

        return columns, lead_rows()
    dims = q["dims"]
    fields = ["period_label", *dims, "orders", "customers", "quantity", "revenue", "average_order_value"]
    columns = [documents.Column(f, HEADERS[f][lang]) for f in fields]

    def amount(m) -> str:
        return money.format_amount(money.to_decimal(m), m.currency_code, persian_digits=fa)

    def rows():
        for r in resp.rows:
            row = {"period_label": r.period_label}
            row.update({d: getattr(r, f"{d}_label") if d in LABELLED else getattr(r, d) for d in dims})
            row.update(orders=r.orders, customers=r.customers, quantity=r.quantity,
                       revenue=amount(r.revenue), average_order_value=amount(r.average_order_value))  # fmt: skip
            yield row

    return columns, rows()
