"""ExportOpportunities: a filtered list or a search result as CSV or XLSX, in the caller's access
scope (the rows come from the same queries as ListOpportunities and SearchOpportunities).
This module chooses the columns (English and Persian headers) and the cells;
crm_chassis.documents renders the file and streams it in chunks."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from decimal import Decimal

from crm.sales.v1 import opportunities_pb2 as pb
from crm_chassis import dates, documents, persian
from crm_chassis.auth import Principal
from crm_chassis.errors import FieldViolation, InvalidArgument
from crm_chassis.money import round_minor

BATCH = 1000
MAX_ROWS = 1_000_000
FORMATS = {pb.OPPORTUNITY_EXPORT_FORMAT_CSV: "csv", pb.OPPORTUNITY_EXPORT_FORMAT_XLSX: "xlsx"}
HEADERS = {
    "name": ("Id", "شناسه"),
    "display_name": ("Name", "نام"),
    "customer": ("Customer", "مشتری"),
    "contact_name": ("Contact", "رابط"),
    "stage": ("Stage", "مرحله"),
    "state": ("State", "وضعیت"),
    "amount": ("Amount", "مبلغ"),
    "currency_code": ("Currency", "ارز"),
    "probability": ("Probability %", "احتمال ٪"),
    "weighted_amount": ("Weighted amount", "مبلغ وزنی"),
    "forecast_category": ("Forecast category", "دسته پیش‌بینی"),
    "expected_close_date": ("Expected close", "تاریخ بستن"),
    "expected_close_date_jalali": ("Expected close (Jalali)", "تاریخ بستن (شمسی)"),
    "owner": ("Owner", "مسئول"),
    "team": ("Team", "تیم"),
    "product_line": ("Product line", "خط محصول"),
    "competitors": ("Competitors", "رقبا"),
    "next_step": ("Next step", "گام بعدی"),
    "source": ("Source", "منبع"),
    "campaign_id": ("Campaign", "کمپین"),
    "close_reason": ("Close reason", "دلیل"),
    "rotting": ("Rotting", "راکد"),
    "create_time": ("Created (UTC)", "تاریخ ایجاد (UTC)"),
    "close_time": ("Closed (UTC)", "تاریخ بستن واقعی (UTC)"),
}
DEFAULT_FIELDS = [
    "display_name",
    "customer",
    "stage",
    "state",
    "amount",
    "currency_code",
    "probability",
    "weighted_amount",
    "forecast_category",
    "expected_close_date",
    "owner",
    "next_step",
    "create_time",
]
WIDTHS = {"display_name": 2.0, "next_step": 2.0, "customer": 1.5}


def _minute(t: dt.datetime | None):
    return t.astimezone(dt.UTC).replace(tzinfo=None, second=0, microsecond=0) if t is not None else None


def _cell(r, f: str):
    m = r._mapping
    if f == "name":
        return f"opportunities/{m['id']}"
    if f == "display_name":
        return m["name"]
    if f == "customer":
        return f"customers/{m['customer_id']}" if m["customer_id"] else ""
    if f == "stage":
        return m["stage_name"]
    if f == "owner":
        return m["owner_id"]
    if f == "team":
        return f"teams/{m['team_id']}" if m["team_id"] else ""
    if f == "product_line":
        return f"productLines/{m['product_line_id']}" if m["product_line_id"] else ""
    if f == "amount":
        return round_minor(m["amount"], m["currency_code"])
    if f == "probability":
        p = Decimal(m["probability"]).normalize()
        return p if p != p.to_integral_value() else p.quantize(Decimal(1))  # 100, not 1E+2
    if f == "weighted_amount":
        return round_minor(m["amount"] * m["probability"] / 100, m["currency_code"])
    if f == "competitors":
        return ", ".join(m["competitors"] or [])
    if f == "expected_close_date_jalali":
        d = m["expected_close_date"]
        return persian.format_jalali(d) if d is not None and dates.in_range(d) else ""  # rows stored before the check
    if f in ("create_time", "close_time"):
        return _minute(m[f])
    if f == "rotting":
        return bool(m["rotting"])
    return m[f]


def export(uc, req: pb.ExportOpportunitiesRequest, principal: Principal) -> Iterator[pb.ExportOpportunitiesResponse]:
    fmt = FORMATS.get(req.format)
    if fmt is None:
        raise InvalidArgument.field("format", "choose OPPORTUNITY_EXPORT_FORMAT_CSV or OPPORTUNITY_EXPORT_FORMAT_XLSX")
    fields = list(req.fields) or DEFAULT_FIELDS
    unknown = [f for f in fields if f not in HEADERS]
    if unknown:
        raise InvalidArgument([FieldViolation("fields", f"cannot export {f!r}") for f in unknown])
    lang = 1 if req.language_code.lower().startswith("fa") else 0
    columns = [documents.Column(f, HEADERS[f][lang], WIDTHS.get(f, 1.0)) for f in fields]

    def rows() -> Iterator[dict]:
        token, n = "", 0
        while True:
            if req.query:
                page, token = uc.search(
                    pb.SearchOpportunitiesRequest(query=req.query, page_size=100, page_token=token, filter=req.filter),
                    principal,
                    rows_only=True,
                )
            else:
                page, token = uc.list(
                    pb.ListOpportunitiesRequest(
                        page_size=BATCH, page_token=token, filter=req.filter, order_by=req.order_by
                    ),
                    principal,
                    rows_only=True,
                )
            for r in page:
                n += 1
                if n > MAX_ROWS:
                    raise InvalidArgument.field(
                        "filter", f"more than {MAX_ROWS} opportunities match; narrow the filter"
                    )
                yield {f: _cell(r, f) for f in fields}
            if not token:
                return

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    yield from documents.stream_table(
        pb.ExportOpportunitiesResponse,
        fmt,
        columns,
        rows(),
        filename=f"opportunities-{stamp}",
        title=req.title or "Opportunities",
    )
