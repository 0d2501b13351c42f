"""ExportLeads: a filtered list or a search's hits as CSV or XLSX, streamed in chunks, with the
same access scope as ListLeads and SearchLeads (crm_chassis.documents renders the file)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

from crm.sales.v1 import leads_pb2 as pb
from crm_chassis import documents
from crm_chassis.auth import Principal
from crm_chassis.errors import FieldViolation, InvalidArgument

BATCH = 1000
MAX_ROWS = 1_000_000
FORMATS = {pb.LEAD_EXPORT_FORMAT_CSV: "csv", pb.LEAD_EXPORT_FORMAT_XLSX: "xlsx"}
DEFAULT_FIELDS = [
    "given_name",
    "family_name",
    "organization_name",
    "mobile",
    "email",
    "city",
    "source",
    "status",
    "score",
    "owner",
    "create_time",
]
HEADERS = {
    "name": ("Lead", "سرنخ"),
    "given_name": ("Given name", "نام"),
    "family_name": ("Family name", "نام خانوادگی"),
    "organization_name": ("Organisation", "سازمان"),
    "job_title": ("Job title", "سمت"),
    "email": ("E-mail", "ایمیل"),
    "phone": ("Phone", "تلفن"),
    "mobile": ("Mobile", "موبایل"),
    "national_id": ("National id", "کد ملی"),
    "website": ("Website", "وب‌سایت"),
    "industry": ("Industry", "حوزه فعالیت"),
    "province": ("Province", "استان"),
    "city": ("City", "شهر"),
    "address": ("Address", "نشانی"),
    "description": ("Description", "توضیحات"),
    "tags": ("Tags", "برچسب‌ها"),
    "product_line": ("Product line", "خط محصول"),
    "source": ("Source", "نحوه آشنایی"),
    "campaign_id": ("Campaign", "کمپین"),
    "utm_source": ("UTM source", "UTM source"),
    "utm_medium": ("UTM medium", "UTM medium"),
    "utm_campaign": ("UTM campaign", "UTM campaign"),
    "owner": ("Owner", "مسئول"),
    "team": ("Team", "تیم"),
    "score": ("Score", "امتیاز"),
    "status": ("Status", "وضعیت"),
    "disqualify_reason": ("Disqualify reason", "دلیل رد"),
    "customer": ("Customer", "مشتری"),
    "create_time": ("Created (UTC)", "تاریخ ایجاد (UTC)"),
    "update_time": ("Updated (UTC)", "تاریخ ویرایش (UTC)"),
    "convert_time": ("Converted (UTC)", "تاریخ تبدیل (UTC)"),
}
WIDTHS = {"organization_name": 2.0, "email": 2.0, "address": 3.0, "description": 3.0, "name": 2.5}
_REF = {"team": ("team_id", "teams"), "product_line": ("product_line_id", "productLines")}
_COLUMN = {"owner": "owner_id", "customer": "customer_id"}


def _cell(m, f: str):
    if f == "name":
        return f"leads/{m['id']}"
    if f in ("create_time", "update_time", "convert_time"):
        # UTC to the minute: what a person reads in a report (the headers say UTC).
        v = m[f]
        return v.astimezone(dt.UTC).replace(second=0, microsecond=0, tzinfo=None) if v else None
    if f in _REF:
        col, collection = _REF[f]
        return f"{collection}/{m[col]}" if m[col] else ""
    if f == "tags":
        return list(m["tags"])
    return m[_COLUMN.get(f, f)]


def export(uc, req: pb.ExportLeadsRequest, principal: Principal) -> Iterator[pb.ExportLeadsResponse]:
    fmt = FORMATS.get(req.format)
    if fmt is None:
        raise InvalidArgument.field("format", "choose LEAD_EXPORT_FORMAT_CSV or LEAD_EXPORT_FORMAT_XLSX")
    fields = list(req.fields) or DEFAULT_FIELDS
    unknown = [f for f in fields if f not in HEADERS]
    if unknown:
        raise InvalidArgument([FieldViolation("fields", f"cannot export {f!r}") for f in unknown])
    lang = 1 if req.language_code.lower().startswith("fa") else 0
    columns = [documents.Column(f, HEADERS[f][lang], WIDTHS.get(f, 1.0)) for f in fields]
    list_req = pb.ListLeadsRequest(page_size=BATCH, filter=req.filter, order_by=req.order_by)
    # Checked before the first byte: a bad filter, order or query fails the call cleanly.
    first = uc.search(req.query, 100, "", req.filter, principal) if req.query else uc.list(list_req, principal)

    def rows() -> Iterator[dict]:
        page, token, n = first, first[1], 0
        while True:
            hits = [r for r, _ in page[0]] if req.query else page[0]
            for r in hits:
                n += 1
                if n > MAX_ROWS:
                    raise InvalidArgument.field("filter", f"more than {MAX_ROWS} leads match; narrow the filter")
                m = r._mapping
                yield {f: _cell(m, f) for f in fields}
            if not token:
                return
            if req.query:
                page = uc.search(req.query, 100, token, req.filter, principal)
            else:
                list_req.page_token = token
                page = uc.list(list_req, principal)
            token = page[1]

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    yield from documents.stream_table(
        pb.ExportLeadsResponse, fmt, columns, rows(), filename=f"leads-{stamp}", title="Leads"
    )
