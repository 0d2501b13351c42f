"""Every report as a file: one registry (REPORTS) says, per report, how its answer is computed
from the Export request, which columns and rows its table has and which chart pictures it.
`export(engine, key, request)` then serves any format of EXPORT_FORMATS:

- csv: the table (crm_chassis.documents.stream_table);
- xlsx, pdf: a Document: the report's title, its filters as key/value lines, the chart (PDF:
  above the table; XLSX: on a second sheet), the table and its totals;
- png, svg: the chart alone (crm_chassis.charts).

Adding a report is one `register(ReportFile(...))` entry here (or in its own module, imported
by this one) plus its chart function; its Export RPC is `yield from export(self.engine, key,
request)`. See docs/reports.md, "Exports and charts".
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from crm.reporting.v1 import reporting_service_pb2 as pb
from crm.reporting.v1 import value_pb2 as vpb
from crm_chassis import charts, dates, documents, money
from crm_chassis.charts import Chart, Series
from crm_chassis.documents import Column
from crm_chassis.errors import InvalidArgument
from crm_chassis.persian import format_jalali, to_persian_digits

from . import (
    acquisition_report,
    campaigns,
    loyalty,
    periods,
    pipeline_report,
    projections,
    sales_report,
    support_report,
    timeline,
    value_api,
)
from .tables import LOYALTY_MEASURES

EXPORT_FORMATS = ("csv", "xlsx", "pdf", "png", "svg")
CHART_FORMATS = ("png", "svg")
MAX_SERIES = 8  # a chart keeps its largest series; the rest is summed as "Other"


@dataclass(frozen=True)
class ReportFile:
    """One report's files. ``query(request) -> q`` validates the Export request (raising
    InvalidArgument on the field) and returns the parsed query, with at least ``lang``;
    ``load(engine, q)`` computes the answer (usually the Get response); ``table(answer, q)``
    gives the columns and the rows (an iterator: it may stream); ``chart(answer, q)`` the
    Chart; ``fields(q)`` the key/value lines under the PDF/XLSX heading (the filters) and
    ``totals(answer, q)`` the lines under the table."""

    key: str  # file name stem and registry key: "acquisition"
    title: tuple[str, str]  # (English, Persian)
    query: Callable[[Any], dict]
    load: Callable[[sa.Engine, dict], Any]
    table: Callable[[Any, dict], tuple[Sequence[Column], Iterable[Mapping[str, Any]]]]
    chart: Callable[[Any, dict], Chart]
    fields: Callable[[dict], list[tuple[str, Any]]] | None = None
    totals: Callable[[Any, dict], list[tuple[str, Any]]] | None = None


REPORTS: dict[str, ReportFile] = {}


def register(report: ReportFile) -> ReportFile:
    if report.key in REPORTS:
        raise ValueError(f"report file {report.key!r} registered twice")
    REPORTS[report.key] = report
    return report


def check_format(value: str) -> str:
    fmt = value.strip().lower()
    if fmt not in EXPORT_FORMATS:
        raise InvalidArgument.field("format", f"choose one of {', '.join(EXPORT_FORMATS)}")
    return fmt


def stamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")


def export(engine: sa.Engine, key: str, request, message=pb.ExportReportResponse) -> Iterator:
    """The streamed file of report ``key`` for an Export request (its ``format`` and fields).
    Everything is validated and computed before the first message, so a bad request fails
    before any byte (the gateway reads the head first)."""
    fmt = check_format(request.format)
    report = REPORTS[key]
    q = report.query(request)
    fa = q.get("lang") == "fa"
    answer = report.load(engine, q)
    filename = f"{key}-{stamp()}"
    if fmt in CHART_FORMATS:
        return charts.stream_chart(message, fmt, report.chart(answer, q), filename=filename)
    title = report.title[1 if fa else 0]
    columns, rows = report.table(answer, q)
    if fmt == "csv":
        return documents.stream_table(message, fmt, columns, rows, filename=filename, title=title)
    doc = documents.Document(
        title,
        columns,
        rows,
        fields=(report.fields or period_fields)(q),
        totals=report.totals(answer, q) if report.totals else (),
        chart=charts.render("png", report.chart(answer, q)),
        rtl=fa,
    )
    return documents.stream_document(message, fmt, doc, filename=filename)


def render_file(engine: sa.Engine, key: str, request) -> tuple[str, str, bytes]:
    """A report's whole file at once (a mail attachment, a scheduled report): its content type,
    file name and bytes, as ``export`` would stream them."""
    chunks = list(export(engine, key, request))
    return chunks[0].content_type, chunks[0].filename, b"".join(c.data for c in chunks[1:])


# --------------------------------------------------------------------------- shared pieces


def tr(q: dict, en: str, fa: str) -> str:
    return fa if q.get("lang") == "fa" else en


def digits(q: dict, text: Any) -> str:
    return to_persian_digits(text) if q.get("lang") == "fa" else str(text)


PERIOD_NAMES = {
    "all": ("whole range", "کل بازه"), "day": ("day", "روز"), "week": ("week", "هفته"), "month": ("month", "ماه"),
    "quarter": ("quarter", "فصل"), "year": ("year", "سال"), "weekday": ("weekday", "روز هفته"),
    "day_of_month": ("day of month", "روز ماه"),
}  # fmt: skip


def day_text(q: dict, day: dt.date | None) -> str:
    if day is None:
        return ""
    if q.get("calendar") == "jalali":
        return format_jalali(day, persian_digits=q.get("lang") == "fa")
    return digits(q, day.isoformat())


def period_fields(q: dict) -> list[tuple[str, Any]]:
    """The filters of a period report as key/value lines (From, To, Grouping, Calendar)."""
    out: list[tuple[str, Any]] = []
    if q.get("start"):
        out.append((tr(q, "From", "از"), day_text(q, q["start"])))
    if q.get("end"):
        out.append((tr(q, "To", "تا"), day_text(q, q["end"])))
    if q.get("period"):
        out.append((tr(q, "Grouping", "گروه‌بندی"), PERIOD_NAMES[q["period"]][1 if q.get("lang") == "fa" else 0]))
    if q.get("calendar"):
        out.append(
            (
                tr(q, "Calendar", "تقویم"),
                tr(q, q["calendar"].capitalize(), {"jalali": "جلالی"}.get(q["calendar"], "میلادی")),
            )
        )
    return out


def pivot(
    rows: Iterable[Any],
    category: Callable[[Any], str],
    series: Callable[[Any], str],
    value: Callable[[Any], float],
    *,
    other: str = "Other",
    max_series: int = MAX_SERIES,
) -> tuple[list[str], list[Series]]:
    """Long rows (category, series, value) as the chart's categories (in first-seen order: the
    rows come in period order) and series (largest total first; beyond ``max_series`` the
    rest summed as ``other``)."""
    cats: dict[str, int] = {}
    cells: dict[str, dict[str, float]] = {}
    for r in rows:
        c, s = category(r), series(r)
        cats.setdefault(c, len(cats))
        cell = cells.setdefault(s, {})
        cell[c] = cell.get(c, 0.0) + float(value(r))
    ranked = sorted(cells, key=lambda s: (-sum(abs(v) for v in cells[s].values()), s))
    if len(ranked) > max_series:
        keep, rest = ranked[: max_series - 1], ranked[max_series - 1 :]
        merged: dict[str, float] = {}
        for s in rest:
            for c, v in cells[s].items():
                merged[c] = merged.get(c, 0.0) + v
        cells = {**{s: cells[s] for s in keep}, other: merged}
        ranked = [*keep, other]
    categories = list(cats)
    return categories, [Series(s, [cells[s].get(c, 0.0) for c in categories]) for s in ranked]


def _chart(q: dict, kind: str, categories, series, title: tuple[str, str], **kw) -> Chart:
    fa = q.get("lang") == "fa"
    return Chart(kind, categories, series, title=title[1 if fa else 0], rtl=fa, persian_digits=fa, **kw)


def _time_kind(q: dict, n_categories: int) -> str:
    """A line over ordered periods; bars for one category or for weekday / day of month."""
    return "line" if q.get("period") in ("day", "week", "month", "quarter", "year") and n_categories > 1 else "bar"


def _money_value(values: Iterable) -> float:
    """The rial (or only) amount of a list of Money, as a float for a chart."""
    total = 0.0
    for m in values:
        total += float(money.to_decimal(m))
    return total


# --------------------------------------------------------------------------- customers by source


def by_source_query(req) -> dict:
    def when(field: str) -> dt.datetime | None:
        if not req.HasField(field):
            return None
        try:
            return getattr(req, field).ToDatetime(tzinfo=dt.UTC)
        except (ValueError, OverflowError):
            raise InvalidArgument.field(field, "is not a valid timestamp") from None

    start, end = when("start_time"), when("end_time")
    if start and end and end < start:
        raise InvalidArgument.field("end_time", "must not be before start_time")
    lang = "fa" if getattr(req, "language_code", "").lower().startswith("fa") else "en"
    return {"start_time": start, "end_time": end, "lang": lang}


def by_source_load(engine: sa.Engine, q: dict) -> list[tuple[str, int]]:
    with engine.connect() as conn:
        return projections.customers_by_source(conn, q["start_time"], q["end_time"])


def _by_source_table(rows, q):
    columns = [
        Column("acquisition_source", tr(q, "Acquisition source", "منبع جذب"), 2.0),
        Column("customer_count", tr(q, "Customers", "مشتریان")),
    ]
    return columns, ({"acquisition_source": s, "customer_count": n} for s, n in rows)


def _by_source_fields(q: dict) -> list[tuple[str, Any]]:
    out = []
    for key, en, fa in (("start_time", "From", "از"), ("end_time", "Before", "پیش از")):
        if q[key]:
            out.append((tr(q, en, fa), digits(q, q[key].strftime("%Y-%m-%d %H:%M UTC"))))
    return out


register(
    ReportFile(
        "customers-by-source",
        ("Customers by source", "مشتریان به تفکیک منبع جذب"),
        by_source_query,
        by_source_load,
        _by_source_table,
        lambda rows, q: _chart(
            q,
            "bar",
            [s for s, _ in rows],
            [Series(tr(q, "Customers", "مشتریان"), [n for _, n in rows])],
            ("Customers by acquisition source", "مشتریان به تفکیک منبع جذب"),
        ),  # fmt: skip
        fields=_by_source_fields,
        totals=lambda rows, q: [(tr(q, "Total customers", "جمع مشتریان"), sum(n for _, n in rows))],
    )
)


# --------------------------------------------------------------------------- report 1: acquisition


def _read(report: Callable[[sa.Connection, dict], Any]) -> Callable[[sa.Engine, dict], Any]:
    def load(engine: sa.Engine, q: dict) -> Any:
        with engine.connect() as conn:
            return report(conn, q)

    return load


def _acquisition_chart(resp: pb.GetAcquisitionReportResponse, q: dict) -> Chart:
    title = ("New customers per acquisition source", "مشتریان جدید به تفکیک منبع جذب")
    if q["period"] == "all":
        cats = [r.source for r in resp.rows]
        series = [
            Series(tr(q, "Customers", "مشتریان"), [r.customers for r in resp.rows]),
            Series(tr(q, "Leads", "سرنخ‌ها"), [r.leads for r in resp.rows]),
            Series(tr(q, "Won", "موفق"), [r.won_opportunities for r in resp.rows]),
        ]
        return _chart(q, "grouped_bar", cats, series, ("Acquisition sources", "اثربخشی منابع جذب"))
    cats, series = pivot(
        resp.rows, lambda r: r.period_label, lambda r: r.source, lambda r: r.customers, other=tr(q, "Other", "سایر")
    )
    return _chart(q, "stacked_bar", cats, series, title)


register(
    ReportFile(
        "acquisition",
        ("Acquisition sources", "اثربخشی منابع جذب"),
        acquisition_report.parse,
        _read(acquisition_report.report),
        acquisition_report.export_rows,
        _acquisition_chart,
    )
)


# --------------------------------------------------------------------------- report 3: pipeline and forecast


def _pipeline_chart(resp, q: dict) -> Chart:
    title = ("Pipeline", "قیف فروش")
    amount = tr(q, "Amount", "مبلغ")
    weighted = tr(q, "Weighted", "وزنی")
    named = (lambda r: " / ".join(getattr(r, "stage_name" if d == "stage" else d) or getattr(r, d) or "-"
                                  for d in q["dims"])) if q["dims"] else (lambda r: amount)  # fmt: skip
    # rows of several currencies are never added up: each currency is a group of its own
    several = len({r.amount.currency_code for r in resp.rows}) > 1
    group = (lambda r: f"{named(r)} ({r.amount.currency_code})") if several else named
    if q["period"] == "all":
        cats = [group(r) for r in resp.rows]
        series = [
            Series(amount, [_money_value([r.amount]) for r in resp.rows]),
            Series(weighted, [_money_value([r.weighted_amount]) for r in resp.rows]),
        ]
        return _chart(q, "grouped_bar", cats, series, title)
    rows = list(resp.rows)
    if several:  # a stacked bar (and its "Other") would add currencies: the one most rows have
        counts: dict[str, int] = {}
        for r in rows:
            counts[r.amount.currency_code] = counts.get(r.amount.currency_code, 0) + 1
        shown = max(counts, key=lambda c: (counts[c], c == "IRR"))
        rows, group = [r for r in rows if r.amount.currency_code == shown], named
        title = (f"{title[0]} ({shown})", f"{title[1]} ({shown})")
    cats, series = pivot(rows, lambda r: r.period_label, group, lambda r: _money_value([r.amount]),
                         other=tr(q, "Other", "سایر"))  # fmt: skip
    return _chart(q, "stacked_bar", cats, series, title, y_label=amount)


register(
    ReportFile(
        "pipeline",
        ("Pipeline", "قیف فروش"),
        pipeline_report.parse_pipeline,
        _read(pipeline_report.pipeline),
        pipeline_report.pipeline_export,
        _pipeline_chart,
    )
)


def _forecast_chart(resp, q: dict) -> Chart:
    """Actual won beside the commit per period, summed over owners; per currency (a pair of
    series each) when the rows have several, never added across currencies."""
    per: dict[str, dict[str, list[float]]] = {}
    currencies: list[str] = []
    for r in resp.rows:
        if r.currency_code not in currencies:
            currencies.append(r.currency_code)
        cell = per.setdefault(r.period_label, {}).setdefault(r.currency_code, [0.0, 0.0])
        cell[0] += _money_value([r.actual_won])
        if r.HasField("latest"):
            cell[1] += _money_value([r.latest.commit])
    cats = list(per)
    series = []
    for cur in currencies:
        tag = f" ({cur})" if len(currencies) > 1 else ""
        series += [
            Series(tr(q, "Actual won", "فروش واقعی") + tag, [per[c].get(cur, [0.0, 0.0])[0] for c in cats]),
            Series(tr(q, "Commit", "تعهد") + tag, [per[c].get(cur, [0.0, 0.0])[1] for c in cats]),
        ]
    return _chart(q, "grouped_bar", cats, series, ("Forecast vs actual", "پیش‌بینی در برابر واقعی"))


register(
    ReportFile(
        "forecast",
        ("Forecast vs actual", "پیش‌بینی در برابر واقعی"),
        pipeline_report.parse_forecast,
        _read(pipeline_report.forecast),
        pipeline_report.forecast_export,
        _forecast_chart,
    )
)


# --------------------------------------------------------------------------- report 2: sales by segment


def _sales_chart(resp, q: dict) -> Chart:
    """Revenue by period (stacked by the dimensions' values), or per value over the range; for
    table=lead_to_purchase, the customers per day bucket from lead to first purchase."""
    if q["table"] == "lead_to_purchase":
        total = resp.lead_to_purchase_total
        cats = [digits(q, b.label) for b in total.buckets]
        series = [Series(tr(q, "Customers", "مشتریان"), [b.customers for b in total.buckets])]
        return _chart(q, "bar", cats, series, ("Days from lead to purchase", "روز از سرنخ تا خرید"))
    title = ("Sales by segment", "فروش به تفکیک بخش")
    revenue = tr(q, "Revenue", "درآمد")
    group = (  # noqa: E731
        (lambda r: " / ".join(
            getattr(r, f"{d}_label") if d in sales_report.LABELLED else (getattr(r, d) or "-") for d in q["dims"]))
        if q["dims"] else (lambda r: revenue)
    )  # fmt: skip
    if q["period"] == "all":
        cats = [group(r) for r in resp.rows]
        return _chart(q, "bar", cats, [Series(revenue, [_money_value([r.revenue]) for r in resp.rows])], title)
    cats, series = pivot(resp.rows, lambda r: r.period_label, group, lambda r: _money_value([r.revenue]),
                         other=tr(q, "Other", "سایر"))  # fmt: skip
    return _chart(q, "stacked_bar", cats, series, title, y_label=revenue)


def _sales_totals(resp, q: dict) -> list[tuple[str, Any]]:
    if q["table"] == "lead_to_purchase" or not resp.HasField("total"):
        return []
    t = resp.total
    return [(tr(q, "Orders", "سفارش‌ها"), t.orders), (tr(q, "Customers", "مشتریان"), t.customers)]


register(
    ReportFile(
        "sales",
        ("Sales by segment", "فروش به تفکیک بخش"),
        sales_report.parse,
        _read(sales_report.report),
        sales_report.export_rows,
        _sales_chart,
        totals=_sales_totals,
    )
)


# --------------------------------------------------------------------------- report 4: support


def _expectation_chart(resp: pb.GetSupportReportResponse, q: dict) -> Chart:
    """The zone of tolerance per service-quality dimension (and period, agent or team when asked):
    the adequate, perceived and desired means side by side; perceived between the other two is
    inside the zone."""
    h = support_report.EXPECTATION_HEADERS
    fa = 1 if q.get("lang") == "fa" else 0
    dims = [d for d in q["dims"] if d != "channel"]
    several = len({r.period_label for r in resp.expectations}) > 1

    def name(r) -> str:
        parts = [r.period_label] if several else []
        return " / ".join([*parts, *(getattr(r, d) or "-" for d in dims), r.dimension])

    rows = list(resp.expectations)
    series = [
        Series(h[f][fa], [getattr(r, f) for r in rows]) for f in ("adequate_mean", "perceived_mean", "desired_mean")
    ]
    return _chart(q, "grouped_bar", [name(r) for r in rows], series, ("Zone of tolerance", "محدوده تحمل"))


def _support_chart(resp: pb.GetSupportReportResponse, q: dict) -> Chart:
    if q.get("part") == "expectations":
        return _expectation_chart(resp, q)
    title = ("Support requests", "درخواست‌های پشتیبانی")
    other = tr(q, "Other", "سایر")
    if q["dims"]:
        group = lambda r: " / ".join(getattr(r, d) or "-" for d in q["dims"])  # noqa: E731
        if q["period"] == "all":
            cats = [group(r) for r in resp.rows]
            series = [
                Series(tr(q, "Requests", "درخواست‌ها"), [r.requests for r in resp.rows]),
                Series(tr(q, "Closed", "بسته‌شده"), [r.closed for r in resp.rows]),
            ]
            return _chart(q, "grouped_bar", cats, series, title)
        cats, series = pivot(resp.rows, lambda r: r.period_label, group, lambda r: r.requests, other=other)
        return _chart(q, _time_kind(q, len(cats)), cats, series, title, y_label=tr(q, "Requests", "درخواست‌ها"))
    cats = [r.period_label for r in resp.rows]
    series = [
        Series(tr(q, "Requests", "درخواست‌ها"), [r.requests for r in resp.rows]),
        Series(tr(q, "Closed", "بسته‌شده"), [r.closed for r in resp.rows]),
    ]
    return _chart(q, "line" if _time_kind(q, len(cats)) == "line" else "grouped_bar", cats, series, title)


def _support_totals(resp: pb.GetSupportReportResponse, q: dict) -> list[tuple[str, Any]]:
    if not resp.HasField("total"):
        return []
    t = resp.total
    return [
        (tr(q, "Requests", "درخواست‌ها"), t.requests),
        (tr(q, "Closed", "بسته‌شده"), t.closed),
        (tr(q, "SLA attainment", "تحقق SLA"), round(t.sla_attainment, 4)),
        (tr(q, "CSAT", "رضایت"), round(t.csat_average, 2)),
    ]


register(
    ReportFile(
        "support",
        ("Support desk", "گزارش پشتیبانی"),
        support_report.parse,
        _read(support_report.report),
        support_report.export_rows,
        _support_chart,
        totals=_support_totals,
    )
)


# --------------------------------------------------------------------------- report 5: loyalty

LOYALTY_HEADERS = {
    "period_label": ("Period", "دوره"),
    "programme": ("Programme", "برنامه"),
    "earned": ("Earned", "کسب‌شده"),
    "redeemed": ("Redeemed", "استفاده‌شده"),
    "expired": ("Expired", "منقضی"),
    "adjusted": ("Adjusted", "اصلاح"),
    "reversed": ("Reversed", "برگشتی"),
    "net": ("Net", "خالص"),
}


def _loyalty_table(resp: pb.GetLoyaltyReportResponse, q: dict):
    columns = [
        Column(f, tr(q, *h), 1.5 if f in ("period_label", "programme") else 1.0) for f, h in LOYALTY_HEADERS.items()
    ]
    return columns, ({f: getattr(r, f) for f in LOYALTY_HEADERS} for r in resp.rows)


def _loyalty_chart(resp: pb.GetLoyaltyReportResponse, q: dict) -> Chart:
    per: dict[str, dict[str, int]] = {}
    for r in resp.rows:
        cell = per.setdefault(r.period_label, dict.fromkeys(LOYALTY_MEASURES, 0))
        for m in LOYALTY_MEASURES:
            cell[m] += getattr(r, m)
    cats = list(per)
    series = [Series(tr(q, *LOYALTY_HEADERS[m]), [per[c][m] for c in cats]) for m in LOYALTY_MEASURES]
    series = [s for s in series if any(s.values)]
    return _chart(q, "stacked_bar", cats, series, ("Loyalty points moved", "جابه‌جایی امتیازهای وفاداری"),
                  y_label=tr(q, "Points", "امتیاز"))  # fmt: skip


def _loyalty_totals(resp: pb.GetLoyaltyReportResponse, q: dict) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = [
        (tr(q, f"Outstanding, {b.programme}", f"مانده، {b.programme}"), b.outstanding_points) for b in resp.outstanding
    ]
    out += [
        (tr(q, f"Members, {t.programme} {t.tier}", f"اعضا، {t.programme} {t.tier}"), t.accounts) for t in resp.tiers
    ]
    return out


register(
    ReportFile(
        "loyalty",
        ("Loyalty points", "امتیازهای وفاداری"),
        loyalty.parse,
        _read(loyalty.report),
        _loyalty_table,
        _loyalty_chart,
        totals=_loyalty_totals,
    )
)


# --------------------------------------------------------------------------- report 5: campaigns

CAMPAIGN_HEADERS = {
    "campaign": ("Campaign", "کمپین"),
    "display_name": ("Name", "نام"),
    "channel": ("Channel", "کانال"),
    "state": ("State", "وضعیت"),
    "recipients": ("Recipients", "گیرندگان"),
    "responses": ("Responses", "پاسخ‌ها"),
    "leads": ("Leads", "سرنخ‌ها"),
    "orders": ("Orders", "سفارش‌ها"),
    "revenue": ("Revenue (IRR)", "درآمد (ریال)"),
    "cost": ("Cost (IRR)", "هزینه (ریال)"),
    "roi": ("ROI", "بازگشت سرمایه"),
    "goal_kind": ("Goal", "هدف"),
    "goal_target": ("Goal target", "مقدار هدف"),
    "goal_achieved": ("Achieved", "محقق‌شده"),
    "goal_share": ("Goal share", "سهم تحقق هدف"),
}


def _campaign_query(req) -> dict:
    lang = "fa" if req.language_code.lower().startswith("fa") else "en"
    return {**campaigns.parse(req), "lang": lang}


def _campaign_table(resp: pb.GetCampaignReportResponse, q: dict):
    columns = [
        Column(f, tr(q, *h), 2.0 if f in ("campaign", "display_name") else 1.0) for f, h in CAMPAIGN_HEADERS.items()
    ]

    def rows():
        for r in resp.rows:
            row = {f: getattr(r, f) for f in CAMPAIGN_HEADERS if f not in ("revenue", "cost")}
            row["revenue"], row["cost"] = money.to_decimal(r.revenue), money.to_decimal(r.cost)
            row["roi"], row["goal_share"] = round(r.roi, 4), round(r.goal_share, 4)
            yield row

    return columns, rows()


def _campaign_chart(resp: pb.GetCampaignReportResponse, q: dict) -> Chart:
    cats = [r.display_name or r.campaign for r in resp.rows]
    series = [
        Series(tr(q, "Revenue (IRR)", "درآمد (ریال)"), [_money_value([r.revenue]) for r in resp.rows]),
        Series(tr(q, "Cost (IRR)", "هزینه (ریال)"), [_money_value([r.cost]) for r in resp.rows]),
    ]
    return _chart(q, "grouped_bar", cats, series, ("Campaign revenue and cost", "درآمد و هزینهٔ کمپین‌ها"))


register(
    ReportFile(
        "campaigns",
        ("Campaigns", "کمپین‌ها"),
        _campaign_query,
        _read(campaigns.report),
        _campaign_table,
        _campaign_chart,
        fields=lambda q: [(tr(q, "Campaigns", "کمپین‌ها"), ", ".join(q["campaigns"]) or tr(q, "all", "همه"))],
    )
)


# --------------------------------------------------------------------------- report 6: customer value


def _value_query(req) -> dict:
    currency = value_api.value.currency_of(req.currency_code)
    start, end = value_api.value.period_of(req)
    lang = "fa" if req.language_code.lower().startswith("fa") else "en"
    return {"request": req, "currency": currency, "start": start, "end": end, "lang": lang}


def _value_period(req) -> dict:
    return {"start_date": req.start_date if req.HasField("start_date") else None,
            "end_date": req.end_date if req.HasField("end_date") else None, "currency_code": req.currency_code}  # fmt: skip


def _value_fields(q: dict) -> list[tuple[str, Any]]:
    return [*period_fields({**q, "calendar": None}), (tr(q, "Currency", "ارز"), q["currency"])]


def _decile(q: dict, n: int) -> str:
    return tr(q, f"Decile {n}", f"دهک {to_persian_digits(n)}")


def _pareto_table(resp: vpb.GetParetoReportResponse, q: dict):
    cols = [("decile", "Decile", "دهک"), ("customers", "Customers", "مشتریان"), ("revenue", "Revenue", "درآمد"),
            ("customer_share", "Cumulative customers", "سهم تجمعی مشتریان"),
            ("revenue_share", "Cumulative revenue", "سهم تجمعی درآمد")]  # fmt: skip
    rows = ({"decile": c.decile, "customers": c.customers, "revenue": value_api.amount_text(c.revenue),
             "customer_share": round(c.cumulative_customer_share, 4),
             "revenue_share": round(c.cumulative_revenue_share, 4)} for c in resp.curve)  # fmt: skip
    return [Column(f, tr(q, en, fa)) for f, en, fa in cols], rows


def _pareto_chart(resp: vpb.GetParetoReportResponse, q: dict) -> Chart:
    return _chart(
        q, "pareto", [_decile(q, c.decile) for c in resp.curve],
        [Series(tr(q, "Revenue", "درآمد"), [_money_value([c.revenue]) for c in resp.curve])],
        ("Pareto: revenue per customer decile", "پارتو: درآمد هر دهک مشتریان"),
        y_label=tr(q, f"Revenue ({q['currency']})", f"درآمد ({q['currency']})"),
    )  # fmt: skip


def _pareto_totals(resp: vpb.GetParetoReportResponse, q: dict) -> list[tuple[str, Any]]:
    if not resp.customers:
        return []
    return [(tr(q, "Customers", "مشتریان"), resp.customers),
            (tr(q, "Share of revenue from the top 20%", "سهم ۲۰٪ برتر از درآمد"), round(resp.top_revenue_share, 4))]  # fmt: skip


register(
    ReportFile(
        "value-pareto",
        ("Customer value: Pareto", "ارزش مشتری: پارتو"),
        _value_query,
        lambda engine, q: value_api.pareto_report(engine, vpb.GetParetoReportRequest(**_value_period(q["request"]))),
        _pareto_table,
        _pareto_chart,
        fields=_value_fields,
        totals=_pareto_totals,
    )
)

SEGMENT_NAMES = {
    "champions": ("Champions", "قهرمانان"), "potential_loyalists": ("Potential loyalists", "وفاداران بالقوه"),
    "new": ("New", "تازه‌واردها"), "loyal": ("Loyal", "وفادار"), "needs_attention": ("Needs attention", "نیازمند توجه"),
    "about_to_sleep": ("About to sleep", "در آستانهٔ خواب"), "cannot_lose": ("Cannot lose", "نباید از دست داد"),
    "at_risk": ("At risk", "در خطر"), "hibernating": ("Hibernating", "خفته"),
}  # fmt: skip


def _segment(q: dict, s: str) -> str:
    return tr(q, *SEGMENT_NAMES.get(s, (s, s)))


def _rfm_table(resp: vpb.GetRfmReportResponse, q: dict):
    columns = [Column("segment", tr(q, "Segment", "بخش"), 1.5), Column("customers", tr(q, "Customers", "مشتریان")),
               Column("revenue", tr(q, "Revenue", "درآمد"))]  # fmt: skip
    rows = ({"segment": s.segment, "customers": s.customers, "revenue": value_api.amount_text(s.revenue)}
            for s in resp.segments)  # fmt: skip
    return columns, rows


register(
    ReportFile(
        "value-rfm",
        ("Customer value: RFM segments", "ارزش مشتری: بخش‌های RFM"),
        _value_query,
        lambda engine, q: value_api.rfm_report(engine, vpb.GetRfmReportRequest(**_value_period(q["request"]))),
        _rfm_table,
        lambda resp, q: _chart(
            q,
            "bar",
            [_segment(q, s.segment) for s in resp.segments],
            [Series(tr(q, "Customers", "مشتریان"), [s.customers for s in resp.segments])],
            ("Customers per RFM segment", "مشتریان در هر بخش RFM"),
        ),  # fmt: skip
        fields=_value_fields,
        totals=lambda resp, q: [(tr(q, "Customers", "مشتریان"), resp.customers)] if resp.customers else [],
    )
)

RISK_BANDS = (0.2, 0.4, 0.6, 0.8, 1.0)


def _risks_load(engine: sa.Engine, q: dict):
    req = vpb.ListChurnRisksRequest(currency_code=q["request"].currency_code)
    if q["request"].HasField("end_date"):
        req.as_of_date.CopyFrom(q["request"].end_date)
    rows, _, _ = value_api.risks(engine, req, 100_000)
    return rows


def _risks_table(scores, q: dict):
    cols = [("customer", "Customer", "مشتری"), ("churn_risk", "Churn risk", "ریسک ریزش"),
            ("purchases", "Purchases", "خریدها"), ("historic_clv", "Historic CLV", "ارزش تاکنون"),
            ("predicted_clv", "Predicted CLV", "ارزش پیش‌بینی‌شده"), ("reasons", "Reasons", "دلایل")]  # fmt: skip
    rows = ({"customer": "customers/" + s.customer_id, "churn_risk": round(s.churn_risk, 4), "purchases": s.purchases,
             "historic_clv": format(s.historic_clv.normalize(), "f"), "predicted_clv": round(s.predicted_clv, 2),
             "reasons": "; ".join(value_api.value_model.reason_text(r, q["lang"]) for r in s.reasons)}
            for s in scores)  # fmt: skip
    widths = {"customer": 2.0, "reasons": 3.0}
    return [Column(f, tr(q, en, fa), widths.get(f, 1.0)) for f, en, fa in cols], rows


def _risks_chart(scores, q: dict) -> Chart:
    counts = [0] * len(RISK_BANDS)
    for s in scores:
        counts[next(i for i, top in enumerate(RISK_BANDS) if s.churn_risk <= top or top == 1.0)] += 1
    lows = (0.0, *RISK_BANDS[:-1])
    cats = [digits(q, f"{round(lo * 100)}-{round(hi * 100)}%") for lo, hi in zip(lows, RISK_BANDS, strict=True)]
    return _chart(q, "bar", cats, [Series(tr(q, "Customers", "مشتریان"), counts)],
                  ("Customers per churn risk", "مشتریان بر پایهٔ ریسک ریزش"),
                  x_label=tr(q, "Churn risk", "ریسک ریزش"))  # fmt: skip


register(
    ReportFile(
        "value-churn-risks",
        ("Customer value: churn risks", "ارزش مشتری: ریسک ریزش"),
        _value_query,
        _risks_load,
        _risks_table,
        _risks_chart,
        fields=lambda q: [
            (tr(q, "As of", "تا تاریخ"), day_text(q, q["end"] or dates.today())),
            (tr(q, "Currency", "ارز"), q["currency"]),
        ],  # fmt: skip
    )
)


# --------------------------------------------------------------------------- report 7: Customer 360

TIMELINE_HEADERS = {
    "occur_time": ("Time (Tehran)", "زمان (تهران)"),
    "source": ("Source", "منبع"),
    "kind": ("Kind", "نوع"),
    "title": ("Title", "عنوان"),
    "ref": ("Resource", "منبع داده"),
    "detail": ("Detail", "جزئیات"),
}
SOURCE_NAMES = {"customer": "مشتری", "sales": "فروش", "support": "پشتیبانی", "campaign": "کمپین"}


def _timeline_query(req) -> dict:
    q = timeline.parse(pb.GetCustomerTimelineRequest(customer=req.customer, kinds=req.kinds))
    _, calendar = periods.check("month", req.calendar)
    return {**q, "calendar": calendar, "lang": "fa" if req.language_code.lower().startswith("fa") else "en"}


@dataclass
class _Timeline:
    engine: sa.Engine
    counts: list[tuple[str, str, int]]


def _timeline_load(engine: sa.Engine, q: dict) -> _Timeline:
    with engine.connect() as conn:
        return _Timeline(engine, timeline.counts(conn, q, "month", q["calendar"]))


def _tehran_text(q: dict, at: dt.datetime) -> Any:
    local = at.astimezone(dates.TEHRAN)
    if q["calendar"] == "jalali":
        return (
            f"{format_jalali(local.date(), persian_digits=q['lang'] == 'fa')} {digits(q, local.strftime('%H:%M:%S'))}"
        )
    return local.replace(tzinfo=None)


def _timeline_table(data: _Timeline, q: dict):
    columns = [
        Column(f, tr(q, *h), {"title": 3.0, "detail": 3.0, "occur_time": 1.6}.get(f, 1.0))
        for f, h in TIMELINE_HEADERS.items()
    ]

    def rows():
        for r in timeline.all_rows(data.engine, q):
            yield {
                "occur_time": _tehran_text(q, r.occurred_at),
                "source": r.source,
                "kind": r.kind,
                "title": timeline.title_in(r, q["lang"]),
                "ref": r.ref,
                "detail": json.dumps(r.detail, ensure_ascii=False, sort_keys=True, separators=(", ", ": "))
                if r.detail
                else "",
            }

    return columns, rows()


def _timeline_chart(data: _Timeline, q: dict) -> Chart:
    fa = q["lang"] == "fa"
    cats, series = pivot(
        data.counts,
        lambda r: periods.label(r[0], "month", q["calendar"], q["lang"]),
        lambda r: SOURCE_NAMES.get(r[1], r[1]) if fa else r[1],
        lambda r: r[2],
    )
    return _chart(
        q, "stacked_bar", cats, series, ("Customer 360: entries per month", "نمای ۳۶۰ مشتری: رویدادها در هر ماه")
    )


register(
    ReportFile(
        "customer-timeline",
        ("Customer 360", "نمای ۳۶۰ مشتری"),
        _timeline_query,
        _timeline_load,
        _timeline_table,
        _timeline_chart,
        fields=lambda q: [
            (tr(q, "Customer", "مشتری"), timeline.CUSTOMER + q["customer"]),
            *([(tr(q, "Kinds", "انواع"), ", ".join(q["kinds"] + q["sources"]))] if q["kinds"] or q["sources"] else []),
        ],
        totals=lambda data, q: [(tr(q, "Entries", "رویدادها"), sum(n for _, _, n in data.counts))],
    )
)
