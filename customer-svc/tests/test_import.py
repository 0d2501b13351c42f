"""ImportCustomers over real gRPC and PostgreSQL: CSV and XLSX, header matching (Persian and
English) and explicit mapping, per-row validation and the error report, dedupe (skip, update,
create; within the file too), validate_only, idempotent retries, permissions, events and
audit, chunked progress and jobs interrupted by a restart."""

from __future__ import annotations

import csv
import datetime as dt
import io
import itertools
import random
import time
import uuid

import grpc
import pytest
import sqlalchemy as sa
from openpyxl import Workbook, load_workbook

from crm.customer.v1 import customer_events_pb2, customer_pb2, resources_pb2
from crm.customer.v1 import customer_service_pb2 as pb
from crm.type.v1 import date_pb2
from crm_chassis.errors import read_rpc_error
from customer_svc import domain, import_service
from customer_svc.import_service import Importer, jalali_to_gregorian, parse_date
from customer_svc.service_layer import CustomerUseCases
from tests.support.harness import md

PERSON, ORG = customer_pb2.CUSTOMER_TYPE_PERSON, customer_pb2.CUSTOMER_TYPE_ORGANIZATION
CSV, XLSX = pb.IMPORT_FILE_FORMAT_CSV, pb.IMPORT_FILE_FORMAT_XLSX
_numbers = itertools.count(random.randrange(10_000, 9_000_000, 1000))


def national_id() -> str:
    """A fresh valid Iranian national id (kod-e melli: mod-11 check digit)."""
    body = f"{next(_numbers):09d}"
    total = sum(int(d) * (10 - i) for i, d in enumerate(body)) % 11
    return body + str(total if total < 2 else 11 - total)


def mobile() -> str:
    return f"0912{next(_numbers) % 10_000_000:07d}"


def tag() -> str:
    return uuid.uuid4().hex[:8]


def csv_bytes(rows: list[list], delimiter: str = ",") -> bytes:
    out = io.StringIO()
    csv.writer(out, delimiter=delimiter).writerows(rows)
    return out.getvalue().encode("utf-8-sig")


def xlsx_bytes(rows: list[list]) -> bytes:
    wb = Workbook()
    ws = wb.active
    for r in rows:
        ws.append(r)
    out = io.BytesIO()
    wb.save(out)
    return out.getvalue()


def start(stub, content, *, fmt=CSV, ctype=PERSON, roles="admin", **kw) -> pb.ImportJob:
    req = pb.ImportCustomersRequest(content=content, file_format=fmt, customer_type=ctype, **kw)
    return stub.ImportCustomers(req, metadata=md(roles, "importer"))


def wait(stub, name: str, timeout: float = 120) -> pb.ImportJob:
    deadline = time.monotonic() + timeout
    while True:
        job = stub.GetImportJob(pb.GetImportJobRequest(name=name), metadata=md())
        if job.state != pb.IMPORT_STATE_RUNNING:
            return job
        assert time.monotonic() < deadline, f"import still running after {timeout} s: {job}"
        time.sleep(0.05)


def run(stub, content, **kw) -> pb.ImportJob:
    return wait(stub, start(stub, content, **kw).name)


def counters(job) -> tuple[int, int, int, int, int, int]:
    return (
        job.total_rows,
        job.processed_rows,
        job.created_rows,
        job.updated_rows,
        job.skipped_rows,
        job.failed_rows,
    )


def listed(stub, filter_text: str) -> list[customer_pb2.Customer]:
    return list(
        stub.ListCustomers(pb.ListCustomersRequest(filter=filter_text, page_size=1000), metadata=md()).customers
    )


def report(stub, name: str, fmt=pb.EXPORT_FORMAT_CSV) -> tuple[pb.DownloadImportErrorReportResponse, bytes]:
    parts = list(
        stub.DownloadImportErrorReport(pb.DownloadImportErrorReportRequest(name=name, format=fmt), metadata=md())
    )
    return parts[0], b"".join(p.data for p in parts)


def err(fn):
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return read_rpc_error(info.value)


def create(stub, **fields) -> customer_pb2.Customer:
    fields.setdefault("type", PERSON)
    return stub.CreateCustomer(pb.CreateCustomerRequest(customer=customer_pb2.Customer(**fields)), metadata=md())


def get(stub, c) -> customer_pb2.Customer:
    return stub.GetCustomer(pb.GetCustomerRequest(name=c.name), metadata=md())


def sql(svc, query: str, **params):
    with svc.ctx.engine.begin() as conn:
        return conn.execute(sa.text(query), params).all()


# -- pure helpers -------------------------------------------------------------------------------


def test_jalali_dates_convert_to_gregorian():
    assert jalali_to_gregorian(1369, 5, 12) == dt.date(1990, 8, 3)
    assert jalali_to_gregorian(1403, 1, 1) == dt.date(2024, 3, 20)  # Nowruz
    assert jalali_to_gregorian(1404, 1, 1) == dt.date(2025, 3, 21)
    assert jalali_to_gregorian(1403, 12, 30) == dt.date(2025, 3, 20)  # 1403 is a leap year
    assert jalali_to_gregorian(1402, 12, 30) is None  # 1402 is not
    assert jalali_to_gregorian(1399, 7, 31) is None  # the second half-year has 30-day months
    assert parse_date("۱۳۶۹/۰۵/۱۲") == dt.date(1990, 8, 3)  # Persian digits
    assert parse_date("1990-08-03") == parse_date("1990/8/3") == parse_date(dt.datetime(1990, 8, 3, 0, 0))
    for bad in ("03/08/1990", "yesterday", "1990-02-30", "1402/12/30"):
        with pytest.raises(ValueError):
            parse_date(bad)


def test_dates_with_the_year_last_need_a_date_order():
    day, month = pb.DATE_ORDER_DAY_FIRST, pb.DATE_ORDER_MONTH_FIRST
    with pytest.raises(ValueError, match="date_order"):
        parse_date("03/08/1990")
    assert parse_date("03/08/1990", day) == dt.date(1990, 8, 3)
    assert parse_date("03/08/1990", month) == dt.date(1990, 3, 8)
    assert parse_date("3.8.1990", day) == parse_date("03-08-1990", day) == dt.date(1990, 8, 3)
    assert parse_date("۱۲/۰۵/۱۳۶۹", day) == dt.date(1990, 8, 3)  # Jalali, day first, Persian digits
    assert parse_date("1990-08-03", month) == dt.date(1990, 8, 3)  # year first: the order does not apply
    with pytest.raises(ValueError):
        parse_date("13/08/1990", month)  # no 13th month


# -- the import ---------------------------------------------------------------------------------

PERSIAN_HEADER = ["نام", "نام خانوادگی", "ایمیل", "موبایل", "کد ملی", "تاریخ تولد", "نحوه آشنایی", "شهر", "برچسب‌ها"]


def test_csv_with_persian_headers_lands_good_rows_and_reports_bad_ones(stub):
    city, nid = f"Qom-{tag()}", national_id()
    rows = [
        PERSIAN_HEADER,
        ["علی", "رضایی", f"ali-{city}@example.ir", "۰۹۱۲۱۱۱۲۲۳۳", nid, "1369/05/12", "exhibition", city, "vip، early"],
        ["Sara", "Karimi", f"sara-{city}@example.ir", mobile(), "", "1985-02-03", "Website", city, ""],
        ["Bad", "Email", "not-an-email", "", "", "", "", city, ""],  # row 4
        ["Bad", "Nid", "", "", "0499370898", "", "", city, ""],  # row 5: wrong check digit
        ["Future", "Born", "", "", "", "2099-01-01", "", city, ""],  # row 6
        ["Odd", "Source", "", "", "", "", "carrier-pigeon", city, ""],  # row 7
        ["", "", f"nobody-{city}@example.ir", "", "", "", "", city, ""],  # row 8: no name
        [],  # row 9: blank, not a row
        ["Reza", "", "", "", "", "", "", city, ""],  # row 10: good (a given name is enough)
        ["Bad", "Date", "", "", "", "31/02/2020", "", city, ""],  # row 11
    ]
    job = run(stub, csv_bytes(rows))
    assert job.state == pb.IMPORT_STATE_SUCCEEDED and not job.error and job.creator == "importer"
    assert counters(job) == (9, 9, 3, 0, 0, 6)  # the blank line is no row
    assert job.HasField("create_time") and job.HasField("end_time")

    landed = {c.given_name: c for c in listed(stub, f'city = "{city}"')}
    assert set(landed) == {"علی", "Sara", "Reza"}  # no bad row was written
    ali = landed["علی"]
    assert ali.birth_date == date_pb2.Date(year=1990, month=8, day=3)  # from the Jalali date
    assert (ali.mobile, ali.national_id, list(ali.tags)) == ("+989121112233", nid, ["vip", "early"])
    assert ali.acquisition_source == "exhibition" and ali.owner == "importer" and ali.customer_code.startswith("C-")
    assert landed["Sara"].acquisition_source == "website"  # a source's display name works too
    assert landed["Sara"].lifecycle_stage == customer_pb2.LIFECYCLE_STAGE_PROSPECT

    first, data = report(stub, job.name)
    assert first.content_type.startswith("text/csv") and first.filename.endswith(".csv")
    lines = list(csv.reader(io.StringIO(data.decode("utf-8-sig"))))
    assert lines[0] == ["Row", "Field", "Problem", *PERSIAN_HEADER]
    by_row = {int(r[0]): r for r in lines[1:]}
    assert sorted(by_row) == [4, 5, 6, 7, 8, 11]
    expected = {
        4: ("email", "e-mail"),
        5: ("national_id", "national id"),
        6: ("birth_date", "future"),
        7: ("acquisition_source", "carrier-pigeon"),
        8: ("family_name", "name"),
        11: ("birth_date", "not a date"),
    }
    for n, (f, why) in expected.items():
        assert f in by_row[n][1] and why in by_row[n][2], by_row[n]
    assert by_row[4][3:5] == ["Bad", "Email"] and by_row[4][5] == "not-an-email"  # the original cells
    assert "ایمیل" in by_row[4][1]  # the column as the person named it

    first, data = report(stub, job.name, pb.EXPORT_FORMAT_XLSX)
    assert first.filename.endswith(".xlsx") and "spreadsheetml" in first.content_type
    sheet = load_workbook(io.BytesIO(data), read_only=True).worksheets[0]
    xrows = list(sheet.iter_rows(values_only=True))
    assert list(xrows[0][:3]) == ["Row", "Field", "Problem"]
    assert [r[0] for r in xrows[1:]] == [4, 5, 6, 7, 8, 11]
    assert "e-mail" in xrows[1][2] and "future" in xrows[3][2]


def test_xlsx_of_organisations_with_an_explicit_column_mapping(stub):
    sector = f"Sector-{tag()}"
    rows = [
        ["Firma", "Tel", "Web", "Gründung", "Branche", "Name", "Notizen"],
        ["Pars Trading", "021 8877 6655", "pars.example.ir", dt.datetime(1998, 3, 21), sector, "ignored", "x"],
        ["شرکت البرز", 2188776600, "", "1377/01/01", sector, "", ""],
        ["", "021 1111 2222", "", "", sector, "No company name", ""],  # row 4: an organisation needs a name
    ]
    mapping = {
        "Firma": "organization_name",
        "Tel": "phone",
        "Web": "website",
        "Gründung": "founding_date",
        "Branche": "industry",
        "Name": "",  # "" ignores a column that would otherwise match by name
    }
    job = run(stub, xlsx_bytes(rows), fmt=XLSX, ctype=ORG, column_mapping=mapping)
    assert job.state == pb.IMPORT_STATE_SUCCEEDED, job.error
    assert counters(job) == (3, 3, 2, 0, 0, 1)
    orgs = {c.organization_name: c for c in listed(stub, f'industry = "{sector}"')}
    assert set(orgs) == {"Pars Trading", "شرکت البرز"}
    pars = orgs["Pars Trading"]
    assert pars.type == ORG and pars.display_name == "Pars Trading" and pars.phone == "+982188776655"
    assert pars.founding_date == date_pb2.Date(year=1998, month=3, day=21) and pars.website == "pars.example.ir"
    assert orgs["شرکت البرز"].phone == "+982188776600"  # a number cell that lost its leading zero
    assert orgs["شرکت البرز"].founding_date == date_pb2.Date(year=1998, month=3, day=21)  # Jalali 1377/01/01
    _, data = report(stub, job.name)
    lines = list(csv.reader(io.StringIO(data.decode("utf-8-sig"))))
    assert [r[0] for r in lines[1:]] == ["4"] and "organization_name" in lines[1][1]


@pytest.fixture
def existing(stub):
    city = f"Yazd-{tag()}"
    by_nid = create(stub, given_name="Nima", family_name="Old", national_id=national_id(), city=city)
    by_email = create(stub, given_name="Elham", family_name="Old", email=f"elham-{city}@example.ir", city=city)
    by_mobile = create(stub, given_name="Mina", family_name="Old", mobile=mobile(), city=city)
    return city, by_nid, by_email, by_mobile


def dedupe_file(existing, new_city: str) -> tuple[bytes, str]:
    city, by_nid, by_email, by_mobile = existing
    fresh = f"new-{tag()}@example.ir"
    header = ["given_name", "family_name", "national_id", "email", "mobile", "city"]
    rows = [
        header,
        ["Nima", "New", by_nid.national_id, "", "", new_city],
        ["Elham", "New", "", by_email.email.upper(), "", new_city],  # e-mail matches whatever its case
        ["Mina", "New", "", "", "0" + by_mobile.mobile[3:], new_city],  # same number, national format
        ["Fresh", "Person", "", fresh, "", new_city],
        ["Fresh", "Again", "", fresh, "", new_city + "-2"],  # a duplicate of the row above
    ]
    return csv_bytes(rows), fresh


def test_dedupe_skip_leaves_existing_customers_alone(stub, existing):
    city, *olds = existing
    content, fresh = dedupe_file(existing, city)
    job = run(stub, content, dedupe_policy=pb.DEDUPE_POLICY_SKIP)
    assert counters(job) == (5, 5, 1, 0, 4, 0)
    for old in olds:
        assert get(stub, old) == old  # unchanged, same etag
    assert [c.family_name for c in listed(stub, f'email = "{fresh}"')] == ["Person"]
    again = run(stub, content)  # SKIP is the default: everything is there now
    assert counters(again) == (5, 5, 0, 0, 5, 0)


def test_dedupe_update_overwrites_with_the_rows_values(stub, svc, existing):
    city, *olds = existing
    new_city = f"Shiraz-{tag()}"
    content, fresh = dedupe_file(existing, new_city)
    job = run(stub, content, dedupe_policy=pb.DEDUPE_POLICY_UPDATE)
    # The duplicate within the file updates the customer its first occurrence creates.
    assert counters(job) == (5, 5, 1, 4, 0, 0)
    for old in olds:
        now = get(stub, old)
        assert (now.family_name, now.city) == ("New", new_city)
        assert now.etag != old.etag and now.given_name == old.given_name
        assert (now.national_id, now.email, now.mobile) == (old.national_id, old.email, old.mobile)
        events = sql(svc, "SELECT routing_key, payload FROM outbox WHERE subject = :s ORDER BY id", s=old.name)
        assert [e.routing_key for e in events] == ["customer.created.v1", "customer.updated.v1"]
        updated = customer_events_pb2.CustomerUpdated.FromString(bytes(events[-1].payload))
        assert updated.customer.city == new_city and set(updated.changed_fields) == {"family_name", "city"}
        audit = sql(svc, "SELECT action, actor FROM audit_entries WHERE resource = :r ORDER BY id", r=old.name)
        assert [tuple(a) for a in audit] == [("create", "tester"), ("import.update", "importer")]
    [made] = listed(stub, f'email = "{fresh}"')
    assert (made.family_name, made.city) == ("Again", new_city + "-2")  # the later row's values won
    again = run(stub, content, dedupe_policy=pb.DEDUPE_POLICY_UPDATE)
    assert counters(again) == (5, 5, 0, 0, 5, 0)  # matching rows that change nothing count as skipped


def test_dedupe_create_makes_a_second_customer(stub, existing):
    city, by_nid, _, _ = existing
    content, fresh = dedupe_file(existing, city)
    job = run(stub, content, dedupe_policy=pb.DEDUPE_POLICY_CREATE)
    assert counters(job) == (5, 5, 5, 0, 0, 0)
    twins = listed(stub, f'city = "{city}" AND given_name = "Nima"')
    assert sorted(c.family_name for c in twins) == ["New", "Old"]
    assert {c.national_id for c in twins} == {by_nid.national_id}
    assert len(listed(stub, f'email = "{fresh}"')) == 2


def test_duplicates_across_chunks_of_one_file(stub, monkeypatch):
    monkeypatch.setattr(import_service, "CHUNK_ROWS", 2)
    city, nid = f"Rasht-{tag()}", national_id()
    rows = [["given_name", "family_name", "national_id", "city"]]
    rows += [["Same", f"Person{i}", nid, city] for i in range(5)]
    job = run(stub, csv_bytes(rows))
    assert counters(job) == (5, 5, 1, 0, 4, 0)
    preview = run(
        stub, csv_bytes([rows[0], *(r[:2] + [national_id(), city] for r in rows[1:])] + rows[1:3]), validate_only=True
    )
    assert counters(preview) == (7, 7, 5, 0, 2, 0)  # both matched the customer made above
    assert len(listed(stub, f'city = "{city}"')) == 1


def test_validate_only_writes_nothing_but_counts_what_would_happen(stub, svc, existing):
    city, by_nid, _, _ = existing
    rows = [
        ["given_name", "family_name", "national_id", "email", "city"],
        ["Would", "Create", "", f"would-{city}@example.ir", city],
        ["Would", "Update", by_nid.national_id, "", city + "-x"],
        ["Would", "Fail", "", "broken@", city],
    ]

    def state():
        return sql(
            svc,
            "SELECT (SELECT count(*) FROM customers), (SELECT count(*) FROM outbox), "
            "(SELECT count(*) FROM audit_entries)",
        )[0]

    before = state()
    job = run(stub, csv_bytes(rows), validate_only=True, dedupe_policy=pb.DEDUPE_POLICY_UPDATE)
    assert job.validate_only and job.state == pb.IMPORT_STATE_SUCCEEDED
    assert counters(job) == (3, 3, 1, 1, 0, 1)
    assert state() == before
    assert get(stub, by_nid) == by_nid
    _, data = report(stub, job.name)
    assert "broken@" in data.decode("utf-8-sig")


def test_created_customers_have_events_and_audit_entries(stub, svc):
    city = f"Ahvaz-{tag()}"
    rows = [["First name", "Last name", "E-mail", "Mobile", "City", "Tags", "Gender", "Education"]]
    rows += [
        [f"P{i}", "Imported", f"p{i}-{city}@example.ir", mobile(), city, 'a, b\\c, "q"', "زن", "کارشناسی ارشد"]
        for i in range(3)
    ]
    job = run(stub, csv_bytes(rows, delimiter=";"))  # a semicolon-separated file with English headers
    assert counters(job) == (3, 3, 3, 0, 0, 0)
    made = listed(stub, f'city = "{city}"')
    assert len(made) == 3
    for c in made:
        assert list(c.tags) == ["a", "b\\c", '"q"']
        assert (c.gender, c.education_degree) == (customer_pb2.GENDER_FEMALE, customer_pb2.EDUCATION_DEGREE_MASTER)
        [event] = sql(svc, "SELECT routing_key, payload FROM outbox WHERE subject = :s", s=c.name)
        assert event.routing_key == "customer.created.v1"
        created = customer_events_pb2.CustomerCreated.FromString(bytes(event.payload))
        assert created.customer == c  # the event carries the customer exactly as stored
        [(stored_key,)] = sql(svc, "SELECT search_text FROM customers WHERE id = :id", id=c.name.split("/")[1])
        values = {f: getattr(c, f) for f in ("given_name", "family_name", "email", "city", "mobile")}
        assert stored_key == domain.search_key({**values, "type": PERSON, "tags": list(c.tags)}, c.customer_code)
        [audit] = sql(svc, "SELECT action, actor, changes FROM audit_entries WHERE resource = :r", r=c.name)
        assert (audit.action, audit.actor) == ("import.create", "importer")
        assert {"field": "email", "old_value": "null", "new_value": f'"{c.email}"'} in audit.changes


def test_chunks_commit_one_by_one_and_progress_counts_whole_chunks(stub, svc):
    city, n = f"Kish-{tag()}", 3500
    rows = [["given_name", "family_name", "city"]] + [["Bulk", f"Row{i}", city] for i in range(n)]
    job = start(stub, csv_bytes(rows))
    assert job.state == pb.IMPORT_STATE_RUNNING and job.processed_rows == 0
    seen = []
    while job.state == pb.IMPORT_STATE_RUNNING:
        job = stub.GetImportJob(pb.GetImportJobRequest(name=job.name), metadata=md())
        seen.append(job.processed_rows)
        time.sleep(0.01)
    assert counters(job) == (n, n, n, 0, 0, 0)
    # Progress only ever shows committed chunks: whole chunks of 1000, then the rest.
    assert set(seen) <= {0, 1000, 2000, 3000, n} and seen == sorted(seen)
    # One write per chunk: the rows of a chunk share its time, and no two chunks have the same.
    [(chunks,)] = sql(svc, "SELECT count(DISTINCT create_time) FROM customers WHERE city = :c", c=city)
    assert chunks == 4


def test_a_retry_with_the_same_request_id_returns_the_first_job(stub):
    rid = str(uuid.uuid4())
    content = csv_bytes([["given_name", "city"], ["Once", f"Tabas-{tag()}"]])
    first = start(stub, content, request_id=rid)
    second = start(stub, content, request_id=rid)
    assert second.name == first.name
    assert counters(wait(stub, first.name)) == (1, 1, 1, 0, 0, 0)
    assert start(stub, content, request_id=rid).name == first.name


def test_bad_requests_name_the_field(stub):
    ok = csv_bytes([["given_name"], ["X"]])
    cases = [
        (dict(content=ok, file_format=0, customer_type=PERSON), "file_format"),
        (dict(content=b"", file_format=CSV, customer_type=PERSON), "content"),
        (dict(content=ok, file_format=CSV, customer_type=0), "customer_type"),
        (
            dict(content=ok, file_format=CSV, customer_type=PERSON, column_mapping={"X": "shoe_size"}),
            "column_mapping[X]",
        ),
        (dict(content=ok, file_format=CSV, customer_type=PERSON, column_mapping={"X": "type"}), "column_mapping[X]"),
        (
            dict(content=ok, file_format=CSV, customer_type=PERSON, column_mapping={"A": "email", "B": "email"}),
            "column_mapping[B]",
        ),
    ]
    for req, f in cases:
        e = err(lambda req=req: stub.ImportCustomers(pb.ImportCustomersRequest(**req), metadata=md()))
        assert e.code == grpc.StatusCode.INVALID_ARGUMENT and f in {v.field for v in e.field_violations}, (f, e)
    e = err(lambda: stub.GetImportJob(pb.GetImportJobRequest(name="importJobs/42"), metadata=md()))
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and e.field_violations[0].field == "name"
    missing = f"importJobs/{uuid.uuid4()}"
    e = err(lambda: stub.GetImportJob(pb.GetImportJobRequest(name=missing), metadata=md()))
    assert e.code == grpc.StatusCode.NOT_FOUND and e.reason == "IMPORT_JOB_NOT_FOUND"
    e = err(lambda: report(stub, missing))
    assert e.code == grpc.StatusCode.NOT_FOUND


def test_unreadable_files_fail_the_job_with_a_reason(stub):
    job = run(stub, b"this is not a workbook", fmt=XLSX)
    assert job.state == pb.IMPORT_STATE_FAILED and "XLSX" in job.error
    job = run(stub, csv_bytes([["shoe size", "favourite colour"], ["42", "blue"]]))
    assert job.state == pb.IMPORT_STATE_FAILED and "no column matched" in job.error and "shoe size" in job.error
    job = run(stub, csv_bytes([["given_name"], ["X"]]), column_mapping={"Vorname": "given_name"})
    assert job.state == pb.IMPORT_STATE_FAILED and "Vorname" in job.error
    job = run(stub, csv_bytes([["given_name"]]))
    assert job.state == pb.IMPORT_STATE_FAILED and "no rows" in job.error


def test_only_roles_with_customers_import_may_import(stub):
    content = csv_bytes([["given_name"], ["X"]])
    for role in ("sales_rep", "analyst", "support_agent"):
        e = err(lambda role=role: start(stub, content, roles=role))
        assert e.code == grpc.StatusCode.PERMISSION_DENIED, role
    name = f"importJobs/{uuid.uuid4()}"
    e = err(lambda: stub.GetImportJob(pb.GetImportJobRequest(name=name), metadata=md("analyst")))
    assert e.code == grpc.StatusCode.PERMISSION_DENIED
    job = start(stub, content, roles="marketer")
    assert job.state == pb.IMPORT_STATE_RUNNING and wait(stub, job.name).state == pb.IMPORT_STATE_SUCCEEDED


def test_an_import_whose_worker_stopped_is_resumed_by_another_after_its_last_chunk(stub, svc):
    # The import's worker stops mid-way (what SIGTERM does to a replica): its job is released,
    # another replica's worker takes it over and resumes after the last committed chunk, and
    # every row lands exactly once. (Imports used to end FAILED "interrupted".)
    city, n = f"Sari-{tag()}", 8000
    rows = [["given_name", "family_name", "city"]] + [["Resumed", f"Row{i}", city] for i in range(n)]
    here = svc.ctx.shared["importer"].worker
    job = start(stub, csv_bytes(rows))
    deadline = time.monotonic() + 60
    while stub.GetImportJob(pb.GetImportJobRequest(name=job.name), metadata=md()).processed_rows < 1000:
        assert time.monotonic() < deadline, "no chunk committed"
        time.sleep(0.01)
    here.stop(timeout=10)
    released = stub.GetImportJob(pb.GetImportJobRequest(name=job.name), metadata=md())
    assert released.state == pb.IMPORT_STATE_RUNNING and 1000 <= released.processed_rows < n
    other = Importer(CustomerUseCases(svc.ctx.engine, None, "secret", "customer-svc")).worker  # another replica
    other.start()
    try:
        done = wait(stub, job.name, timeout=120)
    finally:
        other.stop(timeout=10)
        here.start()
    assert counters(done) == (n, n, n, 0, 0, 0)
    [(stored,)] = sql(svc, "SELECT count(*) FROM customers WHERE city = :c", c=city)
    assert stored == n  # no chunk written twice, none lost


def test_the_fast_audit_encoding_matches_the_create_path():
    from customer_svc.import_service import _fast_json
    from customer_svc.service_layer import _json

    values = [
        "",
        "x",
        'q"uote\\',
        "علی",
        0,
        7,
        True,
        None,
        1.5,
        dt.date(1990, 8, 3),
        [],
        ["vip", "ب"],
        {"b": 1, "a": "ö"},
    ]
    values.append([{"given_name": "A", "role": "CEO"}])
    for v in values:
        assert _fast_json(v) == _json(v), v


def test_groups_ranks_custom_fields_and_referrers_are_found_by_name_or_code(stub):
    t = tag()
    group = stub.CreateGroup(pb.CreateGroupRequest(group=resources_pb2.Group(display_name=f"VIP {t}")), metadata=md())
    rank = stub.CreateRank(
        pb.CreateRankRequest(rank=resources_pb2.Rank(display_name=f"Gold {t}", position=1)), metadata=md()
    )
    key = f"budget_{t}"
    stub.CreateCustomFieldDefinition(
        pb.CreateCustomFieldDefinitionRequest(
            custom_field_definition=resources_pb2.CustomFieldDefinition(
                key=key, display_name=f"Budget {t}", type=resources_pb2.CUSTOM_FIELD_TYPE_NUMBER
            )
        ),
        metadata=md(),
    )
    referrer = create(stub, given_name="Referrer", city=f"Ref-{t}")
    city = f"Sari-{t}"
    rows = [
        ["Name", "Family", "Groups", "Rank", f"Budget {t}", "City", "Referrer customer"],
        ["Ok", "One", f"vip {t}", f"GOLD {t}", "۱٬۲۵۰", city, ""],
        ["Bad", "Group", "No such group", "", "", city, ""],  # row 3
        ["Bad", "Budget", "", "", "lots", city, ""],  # row 4
        ["Ref", "Two", "", "", "", city, referrer.customer_code.lower()],
        ["Ref", "Unknown", "", "", "", city, "C-999999"],  # row 6
    ]
    job = run(stub, csv_bytes(rows))
    assert counters(job) == (5, 5, 2, 0, 0, 3)
    made = {c.given_name: c for c in listed(stub, f'city = "{city}"')}
    assert set(made) == {"Ok", "Ref"}
    assert list(made["Ok"].groups) == [group.name] and made["Ok"].rank == rank.name
    assert made["Ok"].custom_fields[key].number_value == 1250
    assert made["Ref"].referrer_customer == referrer.name
    _, data = report(stub, job.name)
    by_row = {int(r[0]): r for r in list(csv.reader(io.StringIO(data.decode("utf-8-sig"))))[1:]}
    assert sorted(by_row) == [3, 4, 6]
    assert "no such group" in by_row[3][2] and by_row[3][1] == "Groups"
    assert "not a number" in by_row[4][2] and "no such customer" in by_row[6][2]


def test_an_import_reads_day_first_dates_when_asked(stub):
    city = f"Yazd-{tag()}"
    rows = [["given_name", "family_name", "birth_date", "city"], ["Dina", "Day", "03/08/1990", city]]
    job = run(stub, csv_bytes(rows))
    assert counters(job) == (1, 1, 0, 0, 0, 1)
    _, body = report(stub, job.name)
    assert "date_order" in body.decode("utf-8-sig")
    job = run(stub, csv_bytes(rows), date_order=pb.DATE_ORDER_DAY_FIRST)
    assert counters(job) == (1, 1, 1, 0, 0, 0)
    [c] = listed(stub, f'city = "{city}"')
    assert (c.birth_date.year, c.birth_date.month, c.birth_date.day) == (1990, 8, 3)
    e = err(lambda: start(stub, csv_bytes(rows), date_order=7))
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and e.field_violations[0].field == "date_order"


def test_cancel_stops_an_import_and_keeps_exactly_the_committed_chunks(stub, svc, monkeypatch):
    monkeypatch.setattr(import_service, "CHUNK_ROWS", 200)
    city, n = f"Bam-{tag()}", 20_000
    rows = [["given_name", "family_name", "city"]] + [["Stop", f"Row{i}", city] for i in range(n)]
    job = start(stub, csv_bytes(rows))
    while job.processed_rows == 0:
        job = stub.GetImportJob(pb.GetImportJobRequest(name=job.name), metadata=md())
        assert job.state == pb.IMPORT_STATE_RUNNING, job
        time.sleep(0.01)
    cancelled = stub.CancelImportJob(pb.CancelImportJobRequest(name=job.name), metadata=md("admin", "boss"))
    assert cancelled.state == pb.IMPORT_STATE_CANCELLED and cancelled.HasField("end_time")
    assert "boss" in cancelled.error

    def settled():  # the job's thread holds its advisory lock until it has stopped
        return sql(
            svc,
            "SELECT pg_try_advisory_lock(hashtextextended('crm.import-job:' || :id, 0)) "
            "AND pg_advisory_unlock(hashtextextended('crm.import-job:' || :id, 0))",
            id=job.name.removeprefix("importJobs/"),
        )[0][0]

    deadline = time.monotonic() + 30
    while not settled():
        assert time.monotonic() < deadline, "the import thread did not stop"
        time.sleep(0.05)
    final = stub.GetImportJob(pb.GetImportJobRequest(name=job.name), metadata=md())
    assert final.state == pb.IMPORT_STATE_CANCELLED
    [(made,)] = sql(svc, "SELECT count(*) FROM customers WHERE city = :c", c=city)
    [(events,)] = sql(
        svc,
        "SELECT count(*) FROM outbox o JOIN customers c ON o.subject = 'customers/' || c.id "
        "WHERE c.city = :c AND o.routing_key = 'customer.created.v1'",
        c=city,
    )
    # What the job says it did is what it wrote: whole chunks, each with its events; then it stopped.
    assert made == final.processed_rows == final.created_rows == events
    assert 0 < made < n and made % 200 == 0
    again = stub.CancelImportJob(pb.CancelImportJobRequest(name=job.name), metadata=md())
    assert again.state == pb.IMPORT_STATE_CANCELLED and again.processed_rows == made

    done = run(stub, csv_bytes([["given_name", "city"], ["Done", city]]))
    e = err(lambda: stub.CancelImportJob(pb.CancelImportJobRequest(name=done.name), metadata=md()))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "IMPORT_JOB_ENDED"
    missing = f"importJobs/{uuid.uuid4()}"
    e = err(lambda: stub.CancelImportJob(pb.CancelImportJobRequest(name=missing), metadata=md()))
    assert e.code == grpc.StatusCode.NOT_FOUND
    e = err(lambda: stub.CancelImportJob(pb.CancelImportJobRequest(name=job.name), metadata=md("analyst")))
    assert e.code == grpc.StatusCode.PERMISSION_DENIED


def test_import_jobs_are_listed_newest_first_and_old_ones_are_deleted(stub, svc):
    made = [run(stub, csv_bytes([["given_name", "city"], [f"L{i}", f"Ilam-{tag()}"]])).name for i in range(3)]
    seen, token = [], ""
    while True:
        page = stub.ListImportJobs(pb.ListImportJobsRequest(page_size=2, page_token=token), metadata=md())
        assert len(page.import_jobs) <= 2
        seen += [j.name for j in page.import_jobs]
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == len(set(seen))  # no job twice
    assert [n for n in seen if n in made] == made[::-1]  # newest first
    e = err(lambda: stub.ListImportJobs(pb.ListImportJobsRequest(page_token="forged.token"), metadata=md()))
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and e.field_violations[0].field == "page_token"

    [(old,)] = sql(
        svc,
        "INSERT INTO jobs (id, kind, state, creator, end_time) VALUES (gen_random_uuid(), 'customer.import', "
        f"'succeeded', 'past', now() - interval '{import_service.JOB_RETENTION_DAYS + 1} days') "
        "RETURNING id::text",
    )
    with svc.ctx.engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO import_job_errors (job_id, row_number, fields, problems, cells) VALUES (:j, 2, '{}', '{}', '[]')"
            ),
            {"j": old},
        )
    run(stub, csv_bytes([["given_name"], ["Fresh"]]))  # starting an import clears out old jobs
    e = err(lambda: stub.GetImportJob(pb.GetImportJobRequest(name=f"importJobs/{old}"), metadata=md()))
    assert e.code == grpc.StatusCode.NOT_FOUND
    assert sql(svc, "SELECT count(*) FROM import_job_errors WHERE job_id = :j", j=old)[0][0] == 0
    assert stub.GetImportJob(pb.GetImportJobRequest(name=made[0]), metadata=md()).state == pb.IMPORT_STATE_SUCCEEDED


def test_organisations_bring_their_contact_persons_one_row_each(stub):
    phone, city = f"021{next(_numbers) % 100_000_000:08d}", f"Arak-{tag()}"
    header = ["نام شرکت", "تلفن", "شهر", "نام رابط", "نام خانوادگی رابط", "سمت", "Contact Mobile"]
    rows = [
        header,
        ["Pars Co", phone, city, "Ali", "Karimi", "CEO", "09121112233"],
        ["Pars Co", phone, city, "Sara", "Rad", "Buyer", ""],  # the same company: a second contact
        ["Kish Co", "", city, "Reza", "Amini", "", "not a phone"],
    ]
    job = run(stub, csv_bytes(rows), ctype=ORG, dedupe_policy=pb.DEDUPE_POLICY_UPDATE)
    assert counters(job) == (3, 3, 1, 1, 0, 1)
    _, body = report(stub, job.name)
    assert "Contact Mobile" in body.decode("utf-8-sig") and "Kish" in body.decode("utf-8-sig")
    [org] = listed(stub, f'city = "{city}"')
    assert [(c.given_name, c.family_name, c.role, c.mobile) for c in org.contact_persons] == [
        ("Ali", "Karimi", "CEO", "+989121112233"),
        ("Sara", "Rad", "Buyer", ""),
    ]
    # A later file naming Ali again fills him in instead of adding a third contact.
    again = run(
        stub,
        csv_bytes([header, ["Pars Co", phone, city, "Ali", "Karimi", "Chairman", ""]]),
        ctype=ORG,
        dedupe_policy=pb.DEDUPE_POLICY_UPDATE,
    )
    assert counters(again) == (1, 1, 0, 1, 0, 0)
    [org] = listed(stub, f'city = "{city}"')
    assert [(c.given_name, c.role, c.mobile) for c in org.contact_persons] == [
        ("Ali", "Chairman", "+989121112233"),
        ("Sara", "Buyer", ""),
    ]
    e = err(lambda: start(stub, csv_bytes(rows), column_mapping={"Contact Mobile": "contact_persons.mobile"}))
    assert (
        e.code == grpc.StatusCode.INVALID_ARGUMENT and e.field_violations[0].field == "column_mapping[Contact Mobile]"
    )
    e = err(lambda: start(stub, csv_bytes(rows), ctype=ORG, column_mapping={"سمت": "contact_persons.shoe"}))
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and "shoe" in e.field_violations[0].description
