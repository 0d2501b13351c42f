"""ExportTaxInvoices: the issued invoices and credit notes of a period in the tax system's
header/body shape (invoice_tax.tax_record), as JSON lines or as an XLSX sheet (one row per
line) through crm_chassis.documents, streamed in chunks."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator

import sqlalchemy as sa

from crm.sales.v1 import invoices_pb2 as pb
from crm_chassis import documents, persian
from crm_chassis.auth import Principal
from crm_chassis.errors import InvalidArgument

from .access import Scope
from .invoice_tax import tax_record
from .tables import invoices

JSONL = "application/x-ndjson"
BATCH = 500
MAX_DAYS = 366

HEADER_FIELDS = ["taxid", "inno", "indatim", "inty", "inp", "ins", "irtaxid", "tins", "tob", "bid", "tinb", "bpc"]
BODY_FIELDS = ["sstid", "sstt", "am", "mu", "fee", "cut", "exr", "prdis", "dis", "adis", "vra", "vam", "tsstam"]
TOTAL_FIELDS = ["tadis", "tvam", "tbill", "setm"]


def _day(text: str, field: str) -> dt.date:
    if not text.strip():
        raise InvalidArgument.field(field, f"is required; {persian.DATE_HELP}")
    try:
        return persian.parse_date(text.strip())
    except persian.DateError as e:
        raise InvalidArgument.field(field, str(e)) from None


def _period(req: pb.ExportTaxInvoicesRequest) -> tuple[dt.date, dt.date]:
    start = _day(req.start_date, "start_date")
    end = _day(req.end_date, "end_date")
    if end < start:
        raise InvalidArgument.field("end_date", "is before start_date")
    if (end - start).days >= MAX_DAYS:
        raise InvalidArgument.field("end_date", f"a tax export covers at most {MAX_DAYS} days")
    return start, end


def records(uc, start: dt.date, end: dt.date, principal: Principal) -> Iterator[dict]:
    """The tax records of the invoices issued from start to end (inclusive) that the caller
    may see, by issue date and number, read in batches (keyset on issue_date, id)."""
    from .invoices import SELECT

    where = [
        invoices.c.issue_date >= start,
        invoices.c.issue_date <= end,
        invoices.c.state.not_in(("draft", "cancelled")),
        Scope.of(principal).visible(invoices.c.owner_id, invoices.c.team_id),
    ]
    after = None
    while True:
        q = SELECT.where(*where).order_by(invoices.c.issue_date, invoices.c.id).limit(BATCH)
        if after is not None:
            q = q.where(sa.tuple_(invoices.c.issue_date, invoices.c.id) > sa.tuple_(*after))
        with uc.uow.read() as conn:
            rows = list(conn.execute(q))
            lines: dict[str, list] = {}
            for ln in uc._lines(conn, [r.id for r in rows]) if rows else ():
                lines.setdefault(ln.invoice_id, []).append(ln)
        for r in rows:
            yield tax_record(r, lines.get(r.id, []))
        if len(rows) < BATCH:
            return
        after = (rows[-1].issue_date, rows[-1].id)


def _xlsx_rows(recs: Iterator[dict]) -> Iterator[dict]:
    for rec in recs:
        h = rec["header"]
        for b in rec["body"]:
            row = {"number": rec["number"], "kind": rec["kind"]}
            row.update({k: h[k] for k in HEADER_FIELDS})
            if h["indatim"] is not None:
                t = dt.datetime.fromtimestamp(h["indatim"] / 1000, dt.UTC)
                row["indatim"] = persian.format_jalali(t.astimezone(_tehran()).date())
            row.update({k: b[k] for k in BODY_FIELDS})
            row.update({k: h[k] for k in TOTAL_FIELDS})
            yield row


def _tehran():
    from crm_chassis.dates import TEHRAN

    return TEHRAN


def export(uc, req: pb.ExportTaxInvoicesRequest, principal: Principal) -> Iterator[pb.ExportTaxInvoicesResponse]:
    if req.format not in (pb.TAX_EXPORT_FORMAT_JSONL, pb.TAX_EXPORT_FORMAT_XLSX):
        raise InvalidArgument.field("format", "choose TAX_EXPORT_FORMAT_JSONL or TAX_EXPORT_FORMAT_XLSX")
    start, end = _period(req)
    filename = f"tax-invoices-{start.isoformat()}-{end.isoformat()}"
    if req.format == pb.TAX_EXPORT_FORMAT_XLSX:
        columns = [
            documents.Column(k, k, 1.5 if k in ("taxid", "sstt") else 1.0)
            for k in ["number", "kind", *HEADER_FIELDS, *BODY_FIELDS, *TOTAL_FIELDS]
        ]
        yield from documents.stream_table(
            pb.ExportTaxInvoicesResponse,
            "xlsx",
            columns,
            _xlsx_rows(records(uc, start, end, principal)),
            filename=filename,
            title="Tax invoices",
        )
        return

    def write(out) -> dict:
        n = 0
        for rec in records(uc, start, end, principal):
            out.write(json.dumps(rec, ensure_ascii=False, separators=(",", ":")).encode() + b"\n")
            n += 1
        return {"content_type": JSONL, "filename": f"{filename}.jsonl", "row_count": n}

    yield from documents.stream_file(pb.ExportTaxInvoicesResponse, write)
