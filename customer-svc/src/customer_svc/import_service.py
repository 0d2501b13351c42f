"""ImportCustomers: CSV and XLSX files of people or organisations, as a long-running job.

`start` checks the request and records a chassis job (crm_chassis.jobs, kind
"customer.import") with the file, in one transaction; a job worker (Importer.worker, one per
process, run with the service) reads the file, maps its columns to Customer fields (an
explicit mapping, else field names and common English and Persian headers), and handles the
rows in chunks of CHUNK_ROWS. Each chunk is ONE transaction of the unit of work: its new and
updated customers, their events (outbox), their audit entries, the rejected rows (for the
error report), the job's counters and its checkpoint commit together, so a crash never leaves
a row half-written, GetImportJob always shows what was committed, and a job taken over by
another replica (its process got SIGTERM or died) resumes after its last committed chunk.

Per row: the cells are converted (dates: ISO, YYYY/MM/DD or Jalali such as 1369/05/12; enums
by name, number or Persian word; tags split on commas) and checked with `domain.validate`, the
same rules as CreateCustomer. A bad row is rejected with its row number (the header is row 1),
the field and the reason; the good rows land. Reading and checking needs no database, so it
runs ahead of the writes: in a thread, or for a big file in worker processes (one per spare
core), which also make each valid row's id, search key, audit entry and event body.

Dedupe (one query per chunk, `= ANY(array)` on the indexed keys): a row matches an existing
live customer of the same type with the same national id, e-mail (case-insensitive), or
phone/mobile (E.164, either column), or an earlier row of the same file. SKIP counts it as
skipped; UPDATE overwrites the customer with the row's non-empty values (a row changing
nothing counts as skipped; a repeat of a row the file creates is merged into it); CREATE
inserts it anyway (no dedupe at all).

Writes are set-based: the chunk's new customers, their outbox rows and audit entries go in by
COPY (customer codes from the sequence in one query), updates in one executemany.

validate_only runs all of it but writes no customer, event or audit entry; the counters and
the error report show what an import would do.

Jobs are queued and run by the service's job workers (two at a time per process); past
MAX_QUEUED imports queued or running, ImportCustomers answers UNAVAILABLE. Ended jobs, their
files and error reports are deleted after JOB_RETENTION_DAYS.
"""

from __future__ import annotations

import contextvars
import dataclasses
import datetime as dt
import functools
import logging
import multiprocessing
import os
import re
import uuid
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field

import sqlalchemy as sa
from opentelemetry import context as otel_context
from sqlalchemy.dialects import postgresql as pg

from crm.customer.v1 import customer_events_pb2, customer_pb2, resources_pb2
from crm.customer.v1 import customer_service_pb2 as pb
from crm_chassis import documents, jobs, persian, tabular, work_tables
from crm_chassis.auth import Principal
from crm_chassis.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound, Unavailable
from crm_chassis.logging import request_id_var
from crm_chassis.pagination import page_size
from crm_chassis.persian import jalali_to_gregorian  # noqa: F401 (tests import it from here)
from crm_chassis.resources import ResourceName
from crm_chassis.telemetry import extract_context, inject_headers
from crm_chassis.uow import Transaction, json_text, new_ids

from . import adapters, domain
from .adapters import customers
from .export_service import HEADERS
from .integration import customer_to_proto, values_from_proto
from .service_layer import AUDITED, INSERT_COLUMNS, STORED_COLUMNS, CustomerUseCases, NewCustomer, _json

log = logging.getLogger("customer_svc.import")

MAX_BYTES = 64 * 1024 * 1024
MAX_ROWS = 1_000_000
CHUNK_ROWS = 1000
MAX_RUNNING = 2  # imports running at once in one process; more wait their turn (still RUNNING)
MAX_QUEUED = 10  # imports running or waiting (all replicas); past that, UNAVAILABLE (try later)
REPORT_CHUNK = 256 * 1024
PROCESS_MIN_CHUNKS = 4  # from this many chunks, rows are read and checked in worker processes
MAX_WORKERS = 3
RUNNING, SUCCEEDED, FAILED = pb.IMPORT_STATE_RUNNING, pb.IMPORT_STATE_SUCCEEDED, pb.IMPORT_STATE_FAILED
CANCELLED = pb.IMPORT_STATE_CANCELLED
JOB_RETENTION_DAYS = 90  # ended jobs and their error reports are deleted after this long
SKIP, UPDATE, CREATE = pb.DEDUPE_POLICY_SKIP, pb.DEDUPE_POLICY_UPDATE, pb.DEDUPE_POLICY_CREATE
FORMATS = {pb.IMPORT_FILE_FORMAT_CSV: "csv", pb.IMPORT_FILE_FORMAT_XLSX: "xlsx"}
REPORT_FORMATS = {pb.EXPORT_FORMAT_UNSPECIFIED: "csv", pb.EXPORT_FORMAT_CSV: "csv", pb.EXPORT_FORMAT_XLSX: "xlsx"}

# Fields a column may fill: every writable field but the type (the request's) and contact
# persons (a list of records, not a cell); custom fields as "custom_fields.<key>".
IMPORTABLE = tuple(f for f in domain.WRITABLE if f not in ("type", "contact_persons"))
# An organisation's row may also name one contact person, column by column
# ("contact_persons.mobile"); rows of the same organisation add theirs (see _overlay).
CONTACT_FIELDS = ("title_prefix", "given_name", "family_name", "role", "org_unit", "phone", "mobile", "email")
# What a row starts from: the values an empty CreateCustomer request would give.
_BASE = values_from_proto(customer_pb2.Customer(), domain.WRITABLE)

KIND = "customer.import"  # the chassis job kind of an import
IMPORT_JOB = ResourceName("importJobs/{id}", singular="import job")
STATES = {
    jobs.QUEUED: RUNNING,  # waiting for a worker: running, as far as the caller is concerned
    jobs.RUNNING: RUNNING,
    jobs.SUCCEEDED: SUCCEEDED,
    jobs.FAILED: FAILED,
    jobs.CANCELLED: CANCELLED,
}
INTERNAL_ERROR = "the import stopped on an internal error; the rows counted as processed were handled"

import_job_errors = sa.Table(
    "import_job_errors",
    sa.MetaData(),
    sa.Column("job_id", adapters.UUID, primary_key=True),
    sa.Column("row_number", sa.Integer, primary_key=True),
    sa.Column("fields", pg.ARRAY(sa.Text), nullable=False),
    sa.Column("problems", pg.ARRAY(sa.Text), nullable=False),
    sa.Column("cells", pg.JSONB, nullable=False),
)


# --------------------------------------------------------------------------- headers


_key = tabular.header_key  # a header as compared: Persian-normalised, no spaces or punctuation


_ALIASES = {
    "given_name": ["first name", "given name", "forename", "name", "نام", "اسم", "نام کوچک"],
    "family_name": ["last name", "surname", "family name", "family", "نام خانوادگی", "فامیلی", "نام فامیل"],
    "organization_name": [
        "company",
        "company name",
        "organisation",
        "organization",
        "organisation name",
        "organization name",
        "نام شرکت",
        "شرکت",
        "نام سازمان",
        "سازمان",
    ],
    "title_prefix": ["title", "prefix", "salutation", "عنوان", "پیشوند"],
    "email": ["email", "e-mail", "email address", "e-mail address", "mail", "ایمیل", "پست الکترونیک", "رایانامه"],
    "mobile": ["mobile", "mobile phone", "mobile number", "cell", "cell phone", "موبایل", "تلفن همراه", "شماره همراه"],
    "phone": ["phone", "telephone", "tel", "phone number", "landline", "تلفن", "تلفن ثابت", "شماره تلفن"],
    "fax": ["fax", "فکس", "نمابر", "دورنگار"],
    "website": ["website", "web site", "web", "url", "وب سایت", "وبسایت", "سایت"],
    "country": ["country", "کشور"],
    "province": ["province", "state", "region", "استان"],
    "city": ["city", "town", "شهر"],
    "address": ["address", "street address", "نشانی", "آدرس"],
    "postal_code": ["postal code", "postcode", "zip", "zip code", "کد پستی"],
    "po_box": ["po box", "p.o. box", "صندوق پستی"],
    "national_id": ["national id", "national code", "national id number", "کد ملی", "شماره ملی", "شناسه ملی"],
    "birth_certificate_number": ["birth certificate number", "birth certificate no", "شماره شناسنامه"],
    "birth_date": ["birth date", "date of birth", "dob", "birthday", "تاریخ تولد"],
    "marriage_date": ["marriage date", "wedding date", "تاریخ ازدواج"],
    "field_of_study": ["field of study", "major", "رشته", "رشته تحصیلی"],
    "education_degree": ["education", "degree", "education degree", "مدرک", "مدرک تحصیلی", "تحصیلات"],
    "industry": ["industry", "sector", "حوزه فعالیت", "صنعت", "زمینه فعالیت"],
    "founding_date": ["founding date", "founded", "date founded", "تاریخ تأسیس"],
    "gender": ["gender", "sex", "جنسیت"],
    "kind": ["kind", "customer kind", "نوع مشتری"],
    "lifecycle_stage": ["stage", "lifecycle stage", "وضعیت", "مرحله"],
    "acquisition_source": ["source", "lead source", "acquisition source", "نحوه آشنایی", "روش آشنایی", "منبع"],
    "acquisition_date": ["acquisition date", "acquired", "تاریخ آشنایی"],
    "referrer_staff": ["referred by", "referrer", "معرف"],
    "referrer_customer": ["referrer customer", "referring customer", "مشتری معرف"],
    "owner": ["owner", "account owner", "مسئول"],
    "tags": ["tags", "tag", "labels", "برچسب‌ها", "برچسب"],
    "groups": ["groups", "group", "گروه", "گروه‌ها"],
    "rank": ["rank", "tier", "رتبه", "سطح"],
}


_CONTACT_ALIASES = {
    "title_prefix": ["contact title", "عنوان رابط"],
    "given_name": ["contact first name", "contact given name", "نام رابط", "نام شخص رابط"],
    "family_name": ["contact last name", "contact family name", "contact surname", "نام خانوادگی رابط"],
    "role": ["contact role", "role", "position", "job title", "سمت", "سمت رابط"],
    "org_unit": ["department", "unit", "org unit", "واحد", "واحد سازمانی", "بخش"],
    "phone": ["contact phone", "تلفن رابط"],
    "mobile": ["contact mobile", "موبایل رابط", "همراه رابط"],
    "email": ["contact email", "contact e-mail", "ایمیل رابط"],
}


def _alias_table(customer_type: int) -> dict[str, str]:
    table: dict[str, str] = {}
    for f in IMPORTABLE:  # the field's own name first, then the export's headers, then aliases
        table.setdefault(_key(f), f)
    for f, names in HEADERS.items():
        if f in IMPORTABLE:
            for n in names:
                table.setdefault(_key(n), f)
    for f, names in _ALIASES.items():
        for n in names:
            table.setdefault(_key(n), f)
    if customer_type == domain.ORGANIZATION:  # an organisation's "Name" is its organisation name
        for n in ("name", "نام"):
            table[_key(n)] = "organization_name"
        for f, names in _CONTACT_ALIASES.items():
            for n in [f"contact_persons.{f}", *names]:
                table.setdefault(_key(n), f"contact_persons.{f}")
    return table


# --------------------------------------------------------------------------- cell values


class _CellError(ValueError):
    pass


_cell_text = tabular.cell_text


DATE_HELP = persian.DATE_HELP
DAY_FIRST, MONTH_FIRST = pb.DATE_ORDER_DAY_FIRST, pb.DATE_ORDER_MONTH_FIRST
_DATE_ORDERS = {DAY_FIRST: "day", MONTH_FIRST: "month"}


def parse_date(v, order: int = pb.DATE_ORDER_UNSPECIFIED) -> dt.date:
    """A cell as a date (crm_chassis.persian.parse_date): an Excel date, YYYY-MM-DD, YYYY/MM/DD
    or, for years before 1700, the Jalali calendar (1369/05/12 is 1990-08-03); Persian digits
    are fine. With the year last (03/08/1990, 12/05/1369) only when `order` says which of the
    two is the day."""
    try:
        return persian.parse_date(v if isinstance(v, dt.date) else _cell_text(v), _DATE_ORDERS.get(order))
    except persian.AmbiguousDate:
        raise _CellError(
            f"{_cell_text(v)!r} is not a date without the import's date_order: with the year last, day and "
            "month are ambiguous (set date_order to day first or month first, or write YYYY-MM-DD)"
        ) from None
    except persian.DateError as e:
        raise _CellError(str(e)) from None


_ENUMS = {
    "gender": (customer_pb2.Gender, {"زن": 1, "خانم": 1, "مونث": 1, "مرد": 2, "آقا": 2, "مذکر": 2, "سایر": 3}),
    "education_degree": (
        customer_pb2.EducationDegree,
        {
            "ابتدایی": 1,
            "سیکل": 1,
            "دیپلم": 2,
            "کاردانی": 3,
            "فوق دیپلم": 3,
            "کارشناسی": 4,
            "لیسانس": 4,
            "کارشناسی ارشد": 5,
            "فوق لیسانس": 5,
            "دکتری": 6,
            "دکترا": 6,
        },
    ),
    "kind": (customer_pb2.CustomerKind, {"مصرف کننده": 1, "مصرف کننده نهایی": 1, "واسطه": 2, "داخلی": 3}),
    "lifecycle_stage": (
        customer_pb2.LifecycleStage,
        {"بالقوه": 1, "مشتری بالقوه": 1, "فعال": 2, "غیرفعال": 3, "غیر فعال": 3, "از دست رفته": 4},
    ),
}


def _enum_parser(enum_type, persian: dict[str, int]):
    prefix = re.sub(r"(?<!^)([A-Z])", r"_\1", enum_type.DESCRIPTOR.name).upper() + "_"
    table: dict[str, int] = {}
    names = []
    for v in enum_type.DESCRIPTOR.values:
        if v.number:
            short = v.name.removeprefix(prefix)
            names.append(short.lower().replace("_", " "))
            table.update({_key(v.name): v.number, _key(short): v.number, str(v.number): v.number})
    table.update({_key(k): n for k, n in persian.items()})

    def parse(v) -> int:
        n = table.get(_key(_cell_text(v)))
        if n is None:
            raise _CellError(f"{_cell_text(v)!r} is not one of: {', '.join(names)}")
        return n

    return parse


def _split(v) -> list[str]:
    return [p.strip() for p in re.split(r"[,،;؛]", _cell_text(v)) if p.strip()]


def _number(v) -> float:
    if isinstance(v, int | float) and not isinstance(v, bool):
        return float(v)
    try:
        return persian.parse_number(_cell_text(v))
    except ValueError:
        raise _CellError(f"{_cell_text(v)!r} is not a number") from None


def _national_id(v) -> str:
    if isinstance(v, int | float) and not isinstance(v, bool):  # Excel dropped the leading zeros
        return _cell_text(v).zfill(10)
    return _cell_text(v)


# --------------------------------------------------------------------------- reading files


class _FileError(Exception):
    """The file cannot be read at all: the job fails with this message."""


def _read(fmt: str, content: bytes) -> tuple[list[str], list[tuple[int, list]]]:
    """The header and the numbered rows of a file (crm_chassis.tabular reads it)."""
    try:
        with tabular.open_table(content, fmt) as table:
            return table.headers, list(table)
    except tabular.TabularError as e:
        raise _FileError(str(e)) from None


# --------------------------------------------------------------------------- rows


@dataclass
class _Row:
    number: int
    cells: list
    raw: dict = field(default_factory=dict)  # converted values, before validation
    given: set = field(default_factory=set)  # keys of `raw` the row filled
    values: dict | None = None  # validated
    referrer: str = ""  # referrer_customer as written (resolved per chunk)
    fields: list[str] = field(default_factory=list)  # rejected: which fields and why
    problems: list[str] = field(default_factory=list)
    # A valid row made ready for insertion where it was converted (see _Converter.prepare):
    cid: str = ""  # its id if it becomes a new customer
    new: NewCustomer | None = None  # what it stores, publishes and audits as a new customer
    record: list = field(default_factory=list)  # its INSERT_COLUMNS as COPY takes them

    def reject(self, f: str, why: str) -> None:
        self.fields.append(f)
        self.problems.append(why)

    def dedupe_keys(self) -> list[str]:
        v = self.values
        out = []
        if v["national_id"]:
            out.append("n:" + v["national_id"])
        if v["email"]:
            out.append("e:" + v["email"].lower())
        for f in ("mobile", "phone"):
            if v[f]:
                out.append("p:" + v[f])
        return out


@dataclass
class _Update:
    customer_id: str
    rows: list[_Row] = field(default_factory=list)
    raw: dict = field(default_factory=dict)
    given: set = field(default_factory=set)


def _overlay(base: dict, raw: dict, given: set) -> dict:
    """`base` with the row's given values written over it: custom fields key by key, and the
    row's contact person added to the contact persons (or filled in, if one has the same name)."""
    out = dict(base)
    for k in given:
        if k == "custom_fields":
            out[k] = {**(out.get(k) or {}), **raw[k]}
        elif k == "contact_persons":
            out[k] = _add_contacts(out.get(k) or [], raw[k])
        else:
            out[k] = raw[k]
    return out


def _contact_key(c: dict) -> tuple[str, str]:
    return (persian.normalize(c.get("given_name") or ""), persian.normalize(c.get("family_name") or ""))


def _add_contacts(contacts: list[dict], more: list[dict]) -> list[dict]:
    out = [dict(c) for c in contacts]
    for c in more:
        same = next((o for o in out if _contact_key(o) == _contact_key(c)), None)
        if same is None:
            out.append(dict(c))
        else:
            same.update({k: v for k, v in c.items() if v})
    return out


@dataclass
class _Counts:
    processed: int = 0
    created: int = 0
    updated: int = 0
    skipped: int = 0
    failed: int = 0


@dataclass
class _ChunkWrite:
    """What a chunk writes: rows for COPY, and its counters."""

    counts: _Counts
    customers: list = field(default_factory=list)
    members: list = field(default_factory=list)
    events: list = field(default_factory=list)  # (routing key, [(subject, message), ...]) in order
    audit: list = field(default_factory=list)  # (resource, action, changes)
    errors: list = field(default_factory=list)


@dataclass
class _Job:
    id: str
    customer_type: int
    file_format: int
    policy: int
    validate_only: bool
    mapping: dict[str, str]
    creator: str
    request_id: str
    date_order: int = 0

    @classmethod
    def of(cls, job: jobs.Job) -> _Job:
        p = job.params
        return cls(
            id=job.id,
            customer_type=p["customer_type"],
            file_format=p["file_format"],
            policy=p["dedupe_policy"],
            validate_only=p["validate_only"],
            mapping=p.get("column_mapping") or {},
            creator=job.creator,
            request_id=job.request_id or "",
            date_order=p.get("date_order", 0),
        )


# --------------------------------------------------------------------------- the importer


def _job_proto(job: jobs.Job) -> pb.ImportJob:
    c = job.counters
    j = pb.ImportJob(
        name=f"importJobs/{job.id}",
        state=STATES[job.state],
        total_rows=job.total or 0,
        processed_rows=job.processed,
        created_rows=c.get("created", 0),
        updated_rows=c.get("updated", 0),
        skipped_rows=c.get("skipped", 0),
        failed_rows=c.get("failed", 0),
        error=job.error,
        validate_only=job.params.get("validate_only", False),
        creator=job.creator,
    )
    j.create_time.FromDatetime(job.create_time)
    if job.end_time is not None:
        j.end_time.FromDatetime(job.end_time)
    return j


def _parse_job_name(name: str) -> str:
    prefix, _, jid = name.partition("/")
    try:
        if prefix != "importJobs" or str(uuid.UUID(jid)) != jid:
            raise ValueError
    except ValueError:
        raise InvalidArgument.field("name", "must be 'importJobs/{id}' with a UUID id") from None
    return jid


class Importer:
    """ImportCustomers as chassis jobs (crm_chassis.jobs): `start` records the job and its file
    in one transaction; `worker` (one per process, in the service's workers) runs it chunk by
    chunk. A job whose process got SIGTERM is released and resumed by another replica at once,
    after its last committed chunk; one whose process died is resumed when its lease expires."""

    def __init__(self, use_cases: CustomerUseCases):
        self.uc = use_cases
        self.worker = jobs.JobWorker(use_cases.engine, {KIND: self._run}, concurrency=MAX_RUNNING)

    # -- the API ---------------------------------------------------------------------------
    def start(self, request: pb.ImportCustomersRequest, principal: Principal) -> pb.ImportJob:
        bad: list[FieldViolation] = []
        if request.file_format not in FORMATS:
            bad.append(FieldViolation("file_format", "choose IMPORT_FILE_FORMAT_CSV or IMPORT_FILE_FORMAT_XLSX"))
        if request.customer_type not in (domain.PERSON, domain.ORGANIZATION):
            bad.append(FieldViolation("customer_type", "choose CUSTOMER_TYPE_PERSON or CUSTOMER_TYPE_ORGANIZATION"))
        if not request.content:
            bad.append(FieldViolation("content", "the file is empty"))
        elif len(request.content) > MAX_BYTES:
            bad.append(FieldViolation("content", f"the file is larger than {MAX_BYTES // (1024 * 1024)} MiB"))
        if request.dedupe_policy not in (pb.DEDUPE_POLICY_UNSPECIFIED, SKIP, UPDATE, CREATE):
            bad.append(FieldViolation("dedupe_policy", "choose DEDUPE_POLICY_SKIP, _UPDATE or _CREATE"))
        if request.date_order not in (pb.DATE_ORDER_UNSPECIFIED, DAY_FIRST, MONTH_FIRST):
            bad.append(FieldViolation("date_order", "choose DATE_ORDER_DAY_FIRST or DATE_ORDER_MONTH_FIRST"))
        if len(request.request_id) > 128:
            bad.append(FieldViolation("request_id", "must be at most 128 characters"))
        with self.uc.reader.connect() as conn:
            defs = adapters.custom_field_defs(conn)
        targets: dict[str, str] = {}
        for header, target in sorted(request.column_mapping.items()):
            where = f"column_mapping[{header}]"
            if not target:
                continue  # "": ignore the column
            if target.startswith("custom_fields."):
                if target.removeprefix("custom_fields.") not in defs:
                    bad.append(FieldViolation(where, f"no custom field {target.removeprefix('custom_fields.')!r}"))
                    continue
            elif target.startswith("contact_persons."):
                if target.removeprefix("contact_persons.") not in CONTACT_FIELDS:
                    bad.append(FieldViolation(where, f"a contact person has no field {target.split('.', 1)[1]!r}"))
                    continue
                if request.customer_type == domain.PERSON:
                    bad.append(FieldViolation(where, "only organisations have contact persons"))
                    continue
            elif target not in IMPORTABLE:
                why = (
                    "is set by customer_type"
                    if target == "type"
                    else "name a contact person's field: contact_persons.given_name, .mobile, ..."
                    if target == "contact_persons"
                    else f"{target!r} is not a writable Customer field"
                )
                bad.append(FieldViolation(where, why))
                continue
            if target in targets:
                bad.append(FieldViolation(where, f"{target} is already filled from column {targets[target]!r}"))
            targets[target] = header
        if bad:
            raise InvalidArgument(bad)

        params = {
            "customer_type": request.customer_type,
            "file_format": request.file_format,
            "dedupe_policy": request.dedupe_policy or SKIP,
            "validate_only": request.validate_only,
            "column_mapping": dict(request.column_mapping),
            "date_order": request.date_order,
            # The call's request id and trace, for the import's audit entries and events.
            "rpc_request_id": request_id_var.get() or "",
            "trace": inject_headers(),
        }
        with self.uc.uow.begin() as tx:
            if request.request_id:
                existing = self._by_request_id(tx.conn, request.request_id)
                if existing is not None:
                    return _job_proto(existing)
            jobs.cleanup(tx.conn, dt.timedelta(days=JOB_RETENTION_DAYS))  # one small DELETE
            if jobs.active_count(tx.conn, KIND) >= MAX_QUEUED:
                raise Unavailable(f"{MAX_QUEUED} imports are running or waiting; try again in a few minutes")
            job = jobs.start(
                tx.conn,
                KIND,
                params,
                input=request.content,
                creator=principal.subject,
                request_id=request.request_id or None,
            )
        self.worker.wake()
        return _job_proto(job)

    def get(self, name: str) -> pb.ImportJob:
        jid = _parse_job_name(name)
        with self.uc.reader.connect() as conn:
            job = jobs.get(conn, jid)
        if job is None or job.kind != KIND:
            raise self._not_found(jid)
        return _job_proto(job)

    def list(self, size: int, token: str) -> tuple[list[pb.ImportJob], str]:
        with self.uc.reader.connect() as conn:
            found, nxt = jobs.list_jobs(
                conn, self.uc.tokens, kind=KIND, page_size=page_size(size, maximum=500), page_token=token
            )
        return [_job_proto(j) for j in found], nxt

    def cancel(self, name: str, principal: Principal) -> pb.ImportJob:
        """A running job becomes CANCELLED at once; the worker running it (in this replica or
        another) stops at its next chunk, and the chunk it was writing is rolled back, so
        processed_rows counts exactly what the import wrote. Cancelling a cancelled job returns it."""
        jid = _parse_job_name(name)
        with self.uc.uow.begin() as tx:
            job = jobs.get(tx.conn, jid)
            if job is None or job.kind != KIND:
                raise self._not_found(jid)
            try:
                job = jobs.cancel(tx.conn, jid, by=principal.subject)
            except FailedPrecondition:
                state = pb.ImportState.Name(STATES[job.state])
                raise FailedPrecondition(
                    f"import job importJobs/{jid} has already ended ({state})",
                    reason="IMPORT_JOB_ENDED",
                    metadata={"name": f"importJobs/{jid}", "state": state},
                ) from None
        log.info("import cancelled", extra={"job": jid, "by": principal.subject})
        return _job_proto(job)

    def cleanup(self) -> int:
        """Delete jobs (with their files and error rows) that ended more than JOB_RETENTION_DAYS
        ago (the job worker also does it every ten minutes)."""
        with self.uc.uow.begin() as tx:
            return jobs.cleanup(tx.conn, dt.timedelta(days=JOB_RETENTION_DAYS))

    def error_report(self, name: str, fmt: int) -> Iterator[pb.DownloadImportErrorReportResponse]:
        jid = _parse_job_name(name)
        kind = REPORT_FORMATS.get(fmt)
        if kind is None:
            raise InvalidArgument.field("format", "an error report is EXPORT_FORMAT_CSV or EXPORT_FORMAT_XLSX")
        with self.uc.engine.connect() as conn:  # a transaction: the rows stream from a server-side cursor
            job = jobs.get(conn, jid)
            if job is None or job.kind != KIND:
                raise self._not_found(jid)
            headers = (job.checkpoint or {}).get("headers") or []
            columns = [
                documents.Column("row", "Row", 0.6),
                documents.Column("field", "Field", 1.5),
                documents.Column("problem", "Problem", 3.0),
                *(documents.Column(f"c{i}", h or f"Column {i + 1}") for i, h in enumerate(headers)),
            ]

            def rows():
                q = (
                    sa.select(import_job_errors)
                    .where(import_job_errors.c.job_id == jid)
                    .order_by(import_job_errors.c.row_number)
                )
                for r in conn.execution_options(yield_per=1000).execute(q):
                    several = len(r.fields) > 1
                    out = {
                        "row": r.row_number,
                        "field": ", ".join(dict.fromkeys(r.fields)),
                        "problem": "; ".join(
                            f"{f}: {p}" if several else p for f, p in zip(r.fields, r.problems, strict=True)
                        ),
                    }
                    out.update({f"c{i}": c for i, c in enumerate(r.cells)})
                    yield out

            yield from documents.stream_table(
                pb.DownloadImportErrorReportResponse,
                kind,
                columns,
                rows(),
                filename=f"import-errors-{jid[:8]}",
                title="Import errors",
                chunk_size=REPORT_CHUNK,
            )

    # -- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _not_found(jid: str) -> NotFound:
        return IMPORT_JOB.not_found([jid])

    @staticmethod
    def _by_request_id(conn, request_id: str) -> jobs.Job | None:
        row = conn.execute(
            sa.select(work_tables.jobs.c.id).where(
                work_tables.jobs.c.kind == KIND, work_tables.jobs.c.request_id == request_id
            )
        ).one_or_none()
        return None if row is None else jobs.get(conn, str(row.id))

    def _run(self, ctx: jobs.JobContext):
        """The job handler: the import, resumed after its last committed chunk, in the trace of
        the ImportCustomers call that started it."""
        token = otel_context.attach(extract_context(ctx.params.get("trace")))
        try:
            return _Run(self.uc, _Job.of(ctx.job), ctx).run()
        except _FileError as e:
            raise jobs.JobFailed(str(e)) from None
        except (jobs.JobStopped, jobs.JobFailed):
            raise
        except Exception:
            log.exception("import failed", extra={"job": ctx.id})
            raise jobs.JobFailed(INTERNAL_ERROR) from None
        finally:
            otel_context.detach(token)


def _load_names(conn) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """Groups and ranks by name, id or resource name; sources by display name."""
    groups: dict[str, str] = {}
    for gid, name in conn.execute(sa.select(adapters.groups.c.id, adapters.groups.c.display_name)):
        groups.update({persian.normalize(name): str(gid), str(gid): str(gid), f"groups/{gid}": str(gid)})
    ranks: dict[str, str] = {}
    for rid, name in conn.execute(sa.select(adapters.ranks.c.id, adapters.ranks.c.display_name)):
        ranks.update({persian.normalize(name): str(rid), str(rid): str(rid), f"ranks/{rid}": str(rid)})
    sources: dict[str, str] = {}
    for key, name in conn.execute(
        sa.select(adapters.acquisition_sources.c.key, adapters.acquisition_sources.c.display_name)
    ):
        sources.setdefault(persian.normalize(name), key)
    return groups, ranks, sources


class _Converter:
    """Cells to checked values: the column plan, the cell readers and domain.validate. It needs
    no database, so it also runs in worker processes (it pickles as its arguments)."""

    def __init__(
        self, customer_type: int, mapping: dict, actor: str, headers: list[str], ctx, names: tuple, date_order: int = 0
    ):
        self.args = (customer_type, mapping, actor, headers, ctx, names, date_order)
        self.customer_type, self.mapping, self.actor, self.ctx = customer_type, mapping, actor, ctx
        self.read_date = functools.partial(parse_date, order=date_order)
        self.groups, self.ranks, self.sources = names
        self.plan = self._plan(headers)

    def __reduce__(self):
        return (_Converter, self.args)

    def _plan(self, headers: list[str]) -> list[tuple]:
        """Which column fills which field, and how its cells are read."""
        by_key = _alias_table(self.customer_type)
        for key, d in self.ctx.custom_defs.items():
            by_key.setdefault(_key(key), f"custom_fields.{key}")
            by_key.setdefault(_key(d.display_name), f"custom_fields.{key}")
        mapped = tabular.map_headers(headers, by_key, self.mapping)
        if mapped.missing:
            raise _FileError(
                f"column_mapping names columns the file does not have: {', '.join(sorted(mapped.missing))}"
            )
        if not mapped.columns:
            raise _FileError(
                "no column matched a customer field; name the columns (e.g. given_name, family_name, email, "
                f"mobile) or map them in column_mapping. The file's columns: {', '.join(h for h in headers if h)}"
            )
        return [(c.index, c.field, self._reader(c.field), c.label) for c in mapped.columns]

    def _reader(self, target: str):
        if target in domain.DATE_FIELDS:
            return self.read_date
        if target in _ENUMS:
            return _enum_parser(*_ENUMS[target])
        if target == "national_id":
            return _national_id
        if target == "tags":
            return _split
        if target == "acquisition_source":
            return lambda v: self.sources.get(persian.normalize(_cell_text(v)), _cell_text(v))
        if target == "groups":

            def groups(v) -> list[str]:
                ids, unknown = [], []
                for name in _split(v):
                    gid = self.groups.get(persian.normalize(name))
                    (ids if gid else unknown).append(gid or name)
                if unknown:
                    raise _CellError(f"no such group: {', '.join(unknown)}")
                return sorted(set(ids))

            return groups
        if target == "rank":

            def rank(v) -> str:
                rid = self.ranks.get(persian.normalize(_cell_text(v)))
                if rid is None:
                    raise _CellError(f"no such rank: {_cell_text(v)}")
                return rid

            return rank
        if target.startswith("custom_fields."):
            d = self.ctx.custom_defs[target.removeprefix("custom_fields.")]
            if d.type == resources_pb2.CUSTOM_FIELD_TYPE_NUMBER:
                return _number
            if d.type == resources_pb2.CUSTOM_FIELD_TYPE_DATE:
                return self.read_date
        return _cell_text

    def convert(self, number: int, cells: list) -> _Row:
        row = _Row(number, cells)
        raw, given = row.raw, row.given
        for i, target, read, label in self.plan:
            v = cells[i] if i < len(cells) else None
            if v is None or (isinstance(v, str) and not v.strip()):
                continue
            try:
                value = read(v)
            except _CellError as e:
                row.reject(label, str(e))
                continue
            if target == "referrer_customer":
                row.referrer = value
                given.add("referrer_customer")
            elif target == "groups":
                raw["group_ids"] = value
                given.add("group_ids")
            elif target == "rank":
                raw["rank_id"] = value
                given.add("rank_id")
            elif target.startswith("custom_fields."):
                raw.setdefault("custom_fields", {})[target.removeprefix("custom_fields.")] = value
                given.add("custom_fields")
            elif target.startswith("contact_persons."):
                raw.setdefault("contact_persons", [{}])[0][target.removeprefix("contact_persons.")] = value
                given.add("contact_persons")
            else:
                raw[target] = value
                given.add(target)
        try:
            row.values = self.validate(self.fresh(raw))
        except InvalidArgument as e:
            for v in e.violations:
                row.reject(self.label(v.field), v.description)
        return row

    def prepare(self, r: _Row, cid: str = "") -> None:
        """What inserting a valid row as a new customer takes that needs no database: its id,
        search key, audit entry and event body (but for the customer code from the sequence and
        the transaction's time), so that it is done where the row was converted."""
        r.cid = cid or r.cid or new_ids(1)[0]
        v = r.values
        r.new = NewCustomer(v, self.ctx.custom_defs, r.cid)
        r.record = [_AS_TEXT[c](v[c]) if c in _AS_TEXT else v[c] for c in INSERT_COLUMNS]

    def fresh(self, raw: dict) -> dict:
        """A new customer's values: the defaults CreateCustomer applies, then the row's."""
        return {
            **_BASE,
            "type": self.customer_type,
            "owner": self.actor,
            "lifecycle_stage": customer_pb2.LIFECYCLE_STAGE_PROSPECT,
            "group_ids": [],
            "rank_id": None,
            "referrer_customer": None,
            **raw,
        }

    def label(self, f: str) -> str:
        """A field as the person knows it: the file's column header, and the field's name."""
        target = {"group_ids": "groups", "rank_id": "rank"}.get(f, f)
        if target.startswith("contact_persons["):  # contact_persons[0].mobile: the row's one contact
            target = "contact_persons." + target.partition(".")[2]
        return next((label for _, t, _, label in self.plan if t == target), target)

    def validate(self, values: dict, old_source: str | None = None) -> dict:
        ctx = dataclasses.replace(self.ctx, old_source=old_source) if old_source else self.ctx
        return domain.validate(values, ctx, prefix="")


def _convert_chunk(conv: _Converter, chunk: list[tuple[int, list]]) -> list[_Row]:
    rows = [conv.convert(n, cells) for n, cells in chunk]
    for r, cid in zip(rows, new_ids(len(rows)), strict=True):
        if not r.problems:
            conv.prepare(r, cid)
    return rows


class _Run:
    """One run of an import job (in a job worker's thread), from its last committed chunk."""

    def __init__(self, uc: CustomerUseCases, job: _Job, ctx: jobs.JobContext):
        self.uc = uc
        self.job = job
        self.jctx = ctx
        self.seen: dict[str, str | int] = {}  # dedupe key -> customer id, or the file row creating it
        self.actor = job.creator
        self.request_id = ctx.params.get("rpc_request_id", "")  # the ImportCustomers call's, for the audit

    # -- set-up ----------------------------------------------------------------------------
    def run(self) -> dict:
        job = self.job
        content = self.jctx.input() or b""
        headers, records = _read(FORMATS[job.file_format], content)
        del content
        records = [(n, cells) for n, cells in records if any(_cell_text(c) for c in cells)]
        if len(records) > MAX_ROWS:
            raise _FileError(f"the file has {len(records)} rows; an import takes at most {MAX_ROWS}")
        with self.uc.reader.connect() as conn:
            self.ctx = self.uc.context(conn)  # plain values (custom fields as namespaces): it pickles
            names = _load_names(conn)
        self.conv = _Converter(job.customer_type, job.mapping, self.actor, headers, self.ctx, names, job.date_order)
        self.headers = headers
        self.total = len(records)
        done = (self.jctx.checkpoint or {}).get("chunks", 0)  # committed by an earlier run
        if not done:
            self.jctx.progress({"chunks": 0, "headers": headers}, total=len(records))
        if not records:
            raise _FileError("the file has no rows below the header")
        chunks = [records[i : i + CHUNK_ROWS] for i in range(0, len(records), CHUNK_ROWS)]
        del records
        for i in range(done):  # a resumed run: those chunks are in the database already
            chunks[i] = None
        # Reading and validating rows needs no database: it runs ahead of the writes, in worker
        # processes for a big file (Python runs one thread at a time; the writes, the outbox
        # relay and the RPCs keep this process busy enough), else in a thread.
        workers = _worker_processes(len(chunks))
        if workers:
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        else:
            pool = ThreadPoolExecutor(1, thread_name_prefix=f"import-{job.id[:8]}-read")
        writer = ThreadPoolExecutor(1, thread_name_prefix=f"import-{job.id[:8]}-write")
        writing = None  # the chunk being written
        try:
            ahead: deque = deque()  # chunks being read: one per worker, and the next in line
            submitted, depth = done, max(workers, 1) + 1
            for index in range(done, len(chunks)):
                while submitted < len(chunks) and len(ahead) < depth:
                    ahead.append(pool.submit(_convert_chunk, self.conv, chunks[submitted]))
                    chunks[submitted] = None  # handed over: free it as soon as it is converted
                    submitted += 1
                rows = ahead.popleft().result()
                if job.policy == UPDATE and not job.validate_only:
                    # Updates read and lock their customers in the chunk's transaction.
                    if writing is not None:
                        writing.result()
                    with self.jctx.step(self.uc.uow) as tx:
                        self._write(tx, self._chunk(tx.conn, rows), index)
                    continue
                # Otherwise a chunk is decided and built while the one before is written: the
                # rows of a file that chunk creates are known here (self.seen) before it commits.
                with self.uc.reader.connect() as conn:
                    chunk = self._chunk(conn, rows)
                if writing is not None:
                    writing.result()
                # The writer runs in this thread's context (trace and request id of the import).
                writing = writer.submit(contextvars.copy_context().run, self._commit, chunk, index)
            if writing is not None:
                writing.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            writer.shutdown(wait=True, cancel_futures=True)
        return {"rows": self.total}

    def _commit(self, chunk: _ChunkWrite, index: int) -> None:
        with self.jctx.step(self.uc.uow) as tx:
            self._write(tx, chunk, index)

    # -- per chunk -------------------------------------------------------------------------
    def _chunk(self, conn: sa.Connection, rows: list[_Row]) -> _ChunkWrite:
        """What each row of a chunk does, and the chunk's writes. `conn` reads; for UPDATE it is
        the chunk's transaction, and the updates are made here."""
        job = self.job
        counts = _Counts(processed=len(rows))
        chunk = _ChunkWrite(counts)
        good = [r for r in rows if not r.problems]
        self._resolve_referrers(conn, [r for r in good if r.referrer])
        good = [r for r in good if not r.problems]
        creates: list[_Row] = []
        pending: dict[int, _Row] = {}  # file row number -> a row this chunk creates
        updates: dict[str, _Update] = {}
        existing = self._existing(conn, good) if job.policy != CREATE else {}
        for r in good:
            if job.policy == CREATE:
                creates.append(r)
                continue
            keys = r.dedupe_keys()
            target = next((existing[k] for k in keys if k in existing), None)
            if target is None:
                target = next((self.seen[k] for k in keys if k in self.seen), None)
            if target is None:
                creates.append(r)
                pending[r.number] = r
                for k in keys:
                    self.seen.setdefault(k, r.number)
                continue
            for k in keys:
                self.seen.setdefault(k, target)
            if job.policy == SKIP:
                counts.skipped += 1
            elif isinstance(target, str):
                u = updates.setdefault(target, _Update(target))
                u.rows.append(r)
                u.raw = _overlay(u.raw, r.raw, r.given)
                u.given |= r.given
            elif target in pending:  # a duplicate of a row this chunk creates: merge into it
                first = pending[target]
                try:
                    first.values = self.conv.validate(self.conv.fresh(_overlay(first.raw, r.raw, r.given)))
                except InvalidArgument as e:
                    for v in e.violations:
                        r.reject(self.conv.label(v.field), v.description)
                else:
                    first.raw, first.given = _overlay(first.raw, r.raw, r.given), first.given | r.given
                    first.new = None  # prepared from other values
                    counts.updated += 1
            else:  # a duplicate of a row an earlier chunk would create (validate_only)
                counts.updated += 1
        if updates:
            self._update(conn, updates, chunk)
        if creates:
            counts.created += len(creates)
            if not job.validate_only:
                self._create(conn, creates, chunk)
        failed = [r for r in rows if r.problems]
        counts.failed = len(failed)
        width = max(len(self.headers), 1)
        chunk.errors = [
            (job.id, r.number, r.fields, r.problems, json_text([_cell_text(c) for c in r.cells[:width]]))
            for r in failed
        ]
        return chunk

    def _write(self, tx: Transaction, chunk: _ChunkWrite, index: int) -> None:
        """A chunk's rows by COPY and the job's counters, in the chunk's transaction."""
        if chunk.customers:
            tx.copy("customers", STORED_COLUMNS, chunk.customers)
        if chunk.members:
            tx.copy("group_members", ["group_id", "customer_id"], chunk.members)
        for routing_key, events in chunk.events:
            tx.publish_many(routing_key, events)
        tx.audit_many(chunk.audit, self.actor, self.request_id, copy=True)
        if chunk.errors:
            tx.copy("import_job_errors", ["job_id", "row_number", "fields", "problems", "cells"], chunk.errors)
        # The job's progress in the chunk's transaction: a cancel or a take-over since the
        # chunk began makes this raise JobStopped, and the chunk rolls back with it.
        counts = chunk.counts
        self.jctx.save(
            tx.conn,
            {"chunks": index + 1, "headers": self.headers},
            processed=min((index + 1) * CHUNK_ROWS, self.total),
            increment={
                "created": counts.created,
                "updated": counts.updated,
                "skipped": counts.skipped,
                "failed": counts.failed,
            },
        )

    def _resolve_referrers(self, conn, rows: list[_Row]) -> None:
        if not rows:
            return
        ids = [r.referrer.removeprefix("customers/") for r in rows]
        uuids = [i for i in ids if re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", i)]
        found: dict[str, str] = {}
        for cid, code in conn.execute(
            sa.text(
                "SELECT id::text, customer_code FROM customers WHERE NOT erased AND "
                "(id = ANY(CAST(:ids AS uuid[])) OR customer_code = ANY(CAST(:codes AS text[])))"
            ),
            {"ids": uuids, "codes": [i.upper() for i in ids]},
        ):
            found[cid] = found[code.lower()] = found[code] = cid
        for r, ref in zip(rows, ids, strict=True):
            cid = found.get(ref) or found.get(ref.lower())
            if cid is None:
                r.reject(self.conv.label("referrer_customer"), f"no such customer: {r.referrer}")
            else:
                r.raw["referrer_customer"] = r.values["referrer_customer"] = cid
                r.new = None  # prepared without it

    def _existing(self, conn, rows: list[_Row]) -> dict[str, str]:
        """Dedupe key -> the oldest live customer of the job's type having it (one query)."""
        nids, emails, phones = set(), set(), set()
        for r in rows:
            v = r.values
            if v["national_id"]:
                nids.add(v["national_id"])
            if v["email"]:
                emails.add(v["email"].lower())
            phones.update(p for p in (v["mobile"], v["phone"]) if p)
        if not (nids or emails or phones):
            return {}
        out: dict[str, str] = {}
        for cid, nid, email, phone, mobile in conn.execute(
            sa.text(
                "SELECT id::text, national_id, lower(email), phone, mobile FROM customers "
                "WHERE type = :type AND delete_time IS NULL AND NOT erased AND ("
                " (national_id <> '' AND national_id = ANY(CAST(:nids AS text[])))"
                " OR (email <> '' AND lower(email) = ANY(CAST(:emails AS text[])))"
                " OR (phone <> '' AND phone = ANY(CAST(:phones AS text[])))"
                " OR (mobile <> '' AND mobile = ANY(CAST(:phones AS text[])))"
                ") ORDER BY create_time, id"
            ),
            {"type": self.job.customer_type, "nids": list(nids), "emails": list(emails), "phones": list(phones)},
        ):
            for k in (f"n:{nid}" if nid else "", f"e:{email}" if email else "", f"p:{phone}", f"p:{mobile}"):
                if len(k) > 2:
                    out.setdefault(k, cid)
        return out

    # -- writes ----------------------------------------------------------------------------
    def _create(self, conn, rows: list[_Row], chunk: _ChunkWrite) -> None:
        """The chunk's new customers as COPY rows (customer codes from the sequence in one
        query), their group memberships, one customer.created.v1 event and one audit entry each."""
        [(now, codes)] = conn.execute(
            sa.text(f"SELECT now(), array_agg({adapters.NEXT_CODE_SQL}) FROM generate_series(1, :n)"),
            {"n": len(rows)},
        )
        events = []
        for r, code in zip(rows, codes, strict=True):
            if r.new is None:
                self.conv.prepare(r)
            new, cid = r.new, r.cid
            # The row as CreateCustomer stores it (NewCustomer.stored), its values as COPY takes them.
            chunk.customers.append([*r.record, cid, code, new.search_text(code), 1, now, now])
            chunk.members += [(g, cid) for g in r.values["group_ids"]]
            for k in r.dedupe_keys():  # later chunks find this customer by id, not by row number
                if self.seen.get(k) == r.number:
                    self.seen[k] = cid
            event = new.event(code, now)
            events.append((event.customer.name, event))
            chunk.audit.append((event.customer.name, "import.create", new.changes))
        chunk.events.append(("customer.created.v1", events))

    def _update(self, conn, updates: dict[str, _Update], chunk: _ChunkWrite) -> None:
        counts = chunk.counts
        # Locked in id order, so two imports updating the same customers cannot deadlock.
        q = adapters.select_customers().where(customers.c.id.in_(list(updates))).order_by(customers.c.id)
        if not self.job.validate_only:
            q = q.with_for_update(of=customers)
        by_id = {str(r.id): r for r in conn.execute(q)}
        defs = self.ctx.custom_defs
        params, done = [], []
        for cid, u in updates.items():
            row = by_id.get(cid)
            if row is None or row.erased or row.delete_time is not None:
                counts.skipped += len(u.rows)
                continue
            old = CustomerUseCases.stored_values(row, defs)
            try:
                merged = self.conv.validate(_overlay(old, u.raw, u.given), old_source=old["acquisition_source"])
            except InvalidArgument as e:
                for r in u.rows:
                    for v in e.violations:
                        r.reject(self.conv.label(v.field), v.description)
                continue
            if merged["email"].lower() == old["email"].lower():  # the same address: keep how it was written
                merged["email"] = old["email"]
            changed = [k for k in AUDITED if _json(old.get(k)) != _json(merged.get(k))]
            if not changed:
                counts.skipped += len(u.rows)
                continue
            counts.updated += len(u.rows)
            if self.job.validate_only:
                continue
            p = {f"v_{k}": merged[k] for k in INSERT_COLUMNS}
            p["v_search_text"] = domain.search_key(merged, row.customer_code)
            p["v_id"] = cid
            params.append(p)
            done.append((cid, old, merged, changed))
        if not params:
            return
        conn.execute(
            customers.update()
            .where(customers.c.id == sa.bindparam("v_id"))
            .values(
                **{k: sa.bindparam(f"v_{k}") for k in [*INSERT_COLUMNS, "search_text"]},
                **adapters.NEW_VERSION,
            ),
            params,
        )
        for cid, _, merged, changed in done:
            if "group_ids" in changed:
                adapters.set_groups(conn, cid, merged["group_ids"])
        stored = {str(s.id): s for s in adapters.get_customers(conn, [d[0] for d in done])}
        events = []
        for cid, old, merged, changed in done:
            full = customer_to_proto(stored[cid], defs)
            fields = [{"group_ids": "groups", "rank_id": "rank"}.get(k, k) for k in changed]
            events.append((full.name, customer_events_pb2.CustomerUpdated(customer=full, changed_fields=fields)))
            chunk.audit.append(
                (
                    full.name,
                    "import.update",
                    [
                        {"field": f, "old_value": _json(old.get(k)), "new_value": _json(merged.get(k))}
                        for f, k in zip(fields, changed, strict=True)
                    ],
                )
            )
        chunk.events.append(("customer.updated.v1", events))


# The create path's JSON text of an audited value (kept under its old name for its test).
_fast_json = _json


def _array_text(values: list[str]) -> str:
    """A text[] value as COPY takes it: an array literal (PostgreSQL parses it)."""
    return "{" + ",".join('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values) + "}"


def _worker_processes(chunks: int) -> int:
    """Worker processes for reading a file of this many chunks: none for a small file (a
    process takes a second or two to start), else one per spare core, at most MAX_WORKERS."""
    cores = os.cpu_count() or 1
    if chunks < PROCESS_MIN_CHUNKS or cores < 2:
        return 0
    return min(MAX_WORKERS, cores - 1)


# Columns handed to COPY as text, converted here (cheaper than the driver's adapters).
_AS_TEXT = {"contact_persons": json_text, "custom_fields": json_text, "tags": _array_text}
