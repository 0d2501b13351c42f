"""ExportTickets: a filtered list or a search's hits as CSV or XLSX, streamed in chunks
(crm_chassis.documents renders the file; the rows are read in keyset pages of BATCH, so a
large export never holds more than a page of rows)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

from crm.support.v1 import tickets_pb2 as pb
from crm_chassis import documents
from crm_chassis.errors import FieldViolation, InvalidArgument

from .ticketing import number_text

BATCH = 1000
MAX_ROWS = 1_000_000
FORMATS = {pb.TICKET_EXPORT_FORMAT_CSV: "csv", pb.TICKET_EXPORT_FORMAT_XLSX: "xlsx"}
DEFAULT_FIELDS = [
    "number",
    "subject",
    "state",
    "channel",
    "priority",
    "category",
    "complaint",
    "contact_address",
    "team",
    "assignee",
    "exchange_count",
    "create_time",
    "first_response_time",
    "resolve_time",
]
HEADERS = {
    "name": ("Ticket", "تیکت"),
    "number": ("Number", "شماره"),
    "subject": ("Subject", "موضوع"),
    "state": ("State", "وضعیت"),
    "channel": ("Channel", "کانال"),
    "priority": ("Priority", "اولویت"),
    "category": ("Category", "دسته"),
    "complaint": ("Complaint", "شکایت"),
    "customer": ("Customer", "مشتری"),
    "contact_address": ("Contact", "نشانی تماس"),
    "contact_name": ("Contact name", "نام تماس‌گیرنده"),
    "product": ("Product", "محصول"),
    "order": ("Order", "سفارش"),
    "team": ("Team", "تیم"),
    "assignee": ("Assignee", "کارشناس"),
    "tags": ("Tags", "برچسب‌ها"),
    "language": ("Language", "زبان"),
    "exchange_count": ("Exchanges", "تعداد تبادل"),
    "message_count": ("Messages", "تعداد پیام"),
    "create_time": ("Created (UTC)", "تاریخ ایجاد (UTC)"),
    "update_time": ("Updated (UTC)", "تاریخ ویرایش (UTC)"),
    "first_response_time": ("First response (UTC)", "اولین پاسخ (UTC)"),
    "resolve_time": ("Resolved (UTC)", "تاریخ حل (UTC)"),
    "close_time": ("Closed (UTC)", "تاریخ بستن (UTC)"),
}
WIDTHS = {"subject": 3.0, "contact_address": 2.0, "name": 2.5, "contact_name": 1.5}
TIMES = ("create_time", "update_time", "first_response_time", "resolve_time", "close_time")


def _cell(m, f: str):
    if f == "name":
        return f"tickets/{m['id']}"
    if f == "number":
        return number_text(m["number"])
    if f in TIMES:  # UTC to the minute: what a person reads in a report (the headers say UTC)
        v = m[f]
        return v.astimezone(dt.UTC).replace(second=0, microsecond=0, tzinfo=None) if v else None
    if f == "category":
        return m["category_key"] or ""
    if f == "customer":
        return f"customers/{m['customer_id']}" if m["customer_id"] else ""
    if f == "team":
        return f"teams/{m['team_id']}" if m["team_id"] else ""
    if f == "assignee":
        return m["assignee_id"]
    if f == "order":
        return m["order_ref"]
    if f == "tags":
        return list(m["tags"])
    return m[f]


def export(api, req: pb.ExportTicketsRequest) -> Iterator[pb.ExportTicketsResponse]:
    fmt = FORMATS.get(req.format)
    if fmt is None:
        raise InvalidArgument.field("format", "choose TICKET_EXPORT_FORMAT_CSV or TICKET_EXPORT_FORMAT_XLSX")
    fields = list(dict.fromkeys(req.fields)) or DEFAULT_FIELDS
    unknown = [f for f in fields if f not in HEADERS]
    if unknown:
        raise InvalidArgument([FieldViolation("fields", f"cannot export {f!r}") for f in unknown])
    if req.query and req.order_by:
        raise InvalidArgument.field("order_by", "a search's hits come newest first; leave order_by empty")
    lang = 1 if req.language_code.lower().startswith("fa") else 0
    columns = [documents.Column(f, HEADERS[f][lang], WIDTHS.get(f, 1.0)) for f in fields]
    q = api.queries

    def page(conn, token: str):
        if req.query:
            return q.search_page(conn, req.query, req.filter, BATCH, token)
        return q.list_page(conn, req.filter, req.order_by, BATCH, token)

    # Checked before the first byte: a bad filter, order or query fails the call cleanly.
    with api.uow.read() as conn:
        first = page(conn, "")

    def rows() -> Iterator[dict]:
        batch, token, n = first[0], first[1], 0
        while True:
            for r in batch:
                n += 1
                if n > MAX_ROWS:
                    raise InvalidArgument.field("filter", f"more than {MAX_ROWS} tickets match; narrow the filter")
                m = r._mapping
                yield {f: _cell(m, f) for f in fields}
            if not token:
                return
            with api.uow.read() as conn:
                batch, token = page(conn, token)

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    title = "تیکت‌ها" if lang else "Tickets"
    yield from documents.stream_table(
        pb.ExportTicketsResponse, fmt, columns, rows(), filename=f"tickets-{stamp}", title=title
    )
