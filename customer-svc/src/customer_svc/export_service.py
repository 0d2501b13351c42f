"""ExportCustomers: a filtered list or a search result as CSV, XLSX, PDF or DOCX. This module
chooses the columns (their English and Persian headers) and the cell values of a customer;
crm_chassis.documents renders the file and streams it to the caller in chunks."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

from crm.customer.v1 import customer_pb2
from crm.customer.v1 import customer_service_pb2 as pb
from crm_chassis import documents
from crm_chassis.auth import Principal
from crm_chassis.errors import FieldViolation, InvalidArgument

from .service_layer import CustomerUseCases

CHUNK = documents.DOWNLOAD_CHUNK
BATCH = 1000
# A PDF or DOCX of a million rows helps nobody and takes minutes: past these, narrow the filter.
MAX_ROWS = {"csv": 1_000_000, "xlsx": 1_000_000, "pdf": 20_000, "docx": 20_000}
FORMATS = {
    pb.EXPORT_FORMAT_CSV: "csv",
    pb.EXPORT_FORMAT_XLSX: "xlsx",
    pb.EXPORT_FORMAT_PDF: "pdf",
    pb.EXPORT_FORMAT_DOCX: "docx",
}
DEFAULT_FIELDS = [
    "customer_code",
    "display_name",
    "type",
    "mobile",
    "phone",
    "email",
    "province",
    "city",
    "acquisition_source",
    "lifecycle_stage",
    "owner",
    "create_time",
]
HEADERS = {
    "customer_code": ("Code", "کد مشتری"),
    "display_name": ("Name", "نام"),
    "type": ("Type", "نوع"),
    "given_name": ("Given name", "نام"),
    "family_name": ("Family name", "نام خانوادگی"),
    "organization_name": ("Organisation", "نام شرکت"),
    "title_prefix": ("Title", "عنوان"),
    "mobile": ("Mobile", "موبایل"),
    "phone": ("Phone", "تلفن"),
    "fax": ("Fax", "فکس"),
    "email": ("E-mail", "ایمیل"),
    "website": ("Website", "وب‌سایت"),
    "country": ("Country", "کشور"),
    "province": ("Province", "استان"),
    "city": ("City", "شهر"),
    "address": ("Address", "نشانی"),
    "postal_code": ("Postal code", "کد پستی"),
    "po_box": ("PO box", "صندوق پستی"),
    "national_id": ("National id", "کد ملی"),
    "birth_certificate_number": ("Birth certificate no.", "شماره شناسنامه"),
    "birth_date": ("Birth date", "تاریخ تولد"),
    "marriage_date": ("Marriage date", "تاریخ ازدواج"),
    "field_of_study": ("Field of study", "رشته تحصیلی"),
    "education_degree": ("Education", "مدرک تحصیلی"),
    "industry": ("Industry", "حوزه فعالیت"),
    "founding_date": ("Founded", "تاریخ تأسیس"),
    "kind": ("Kind", "نوع مشتری"),
    "lifecycle_stage": ("Stage", "وضعیت"),
    "acquisition_source": ("Source", "نحوه آشنایی"),
    "acquisition_date": ("Acquired", "تاریخ آشنایی"),
    "referrer_staff": ("Referred by", "معرف"),
    "owner": ("Owner", "مسئول"),
    "tags": ("Tags", "برچسب‌ها"),
    "create_time": ("Created (UTC)", "تاریخ ایجاد (UTC)"),
    "update_time": ("Updated (UTC)", "تاریخ ویرایش (UTC)"),
}
WIDTHS = {"display_name": 2.0, "address": 3.0, "email": 2.0, "organization_name": 2.0}


def _cell(c: customer_pb2.Customer, f: str):
    if f in ("create_time", "update_time"):
        # UTC to the minute: what a person reads in a report (the headers say UTC).
        return getattr(c, f).ToDatetime().replace(second=0, microsecond=0) if c.HasField(f) else None
    if f in ("birth_date", "marriage_date", "founding_date", "acquisition_date"):
        d = getattr(c, f)
        return dt.date(d.year, d.month, d.day) if c.HasField(f) else None
    if f in ("type", "kind", "lifecycle_stage", "education_degree", "gender"):
        field = c.DESCRIPTOR.fields_by_name[f]
        value = getattr(c, f)
        if not value:
            return ""
        name = field.enum_type.values_by_number[value].name
        return name.split("_", 2)[-1].replace("_", " ").lower() if f != "education_degree" else name[17:].lower()
    if f == "tags":
        return list(c.tags)
    return getattr(c, f)


def export(
    uc: CustomerUseCases, req: pb.ExportCustomersRequest, principal: Principal
) -> Iterator[pb.ExportCustomersResponse]:
    fmt = FORMATS.get(req.format)
    if fmt is None:
        raise InvalidArgument.field("format", "choose EXPORT_FORMAT_CSV, _XLSX, _PDF or _DOCX")
    fields = list(req.fields) or DEFAULT_FIELDS
    unknown = [f for f in fields if f not in HEADERS]
    if unknown:
        raise InvalidArgument([FieldViolation("fields", f"cannot export {f!r}") for f in unknown])
    lang = 1 if req.language_code.lower().startswith("fa") else 0
    columns = [documents.Column(f, HEADERS[f][lang], WIDTHS.get(f, 1.0)) for f in fields]
    limit = MAX_ROWS[fmt]

    def rows() -> Iterator[dict]:
        token, n = "", 0
        while True:
            if req.query:
                hits, token = uc.search(req.query, 100, token, req.filter, principal)
                page = [c for c, _ in hits]
            else:
                page, token = uc.list(BATCH, token, req.filter, req.order_by, False, principal)
            for c in page:
                n += 1
                if n > limit:
                    raise InvalidArgument.field(
                        "filter",
                        f"more than {limit} customers match; a {fmt.upper()} export is limited to {limit} rows",
                    )
                yield {f: _cell(c, f) for f in fields}
            if not token:
                return

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    yield from documents.stream_table(
        pb.ExportCustomersResponse,
        fmt,
        columns,
        rows(),
        filename=f"customers-{stamp}",
        title=req.title or "Customers",
        chunk_size=CHUNK,
    )
