"""POST /v1/importJobs as multipart/form-data: the file part `file`, the other fields of
ImportCustomersRequest as form fields, against the real customer-svc."""

from __future__ import annotations

import io
import json
import time
import uuid

from google.protobuf.descriptor import FieldDescriptor as FD
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from crm.customer.v1 import customer_service_pb2
from crm_gateway.transcode import FORM_OVERHEAD
from tests.support.harness import assert_problem


class CountingStream(io.BytesIO):
    """A request body that counts the bytes the app reads from it."""

    count = 0

    def read(self, size=-1):
        out = super().read(size)
        self.count += len(out)
        return out

    def readinto(self, buffer):
        n = super().readinto(buffer)
        self.count += n
        return n


def upload(suite, data: bytes, filename: str = "people.csv", mimetype: str = "text/csv", /, headers=None, **form):
    """A multipart POST: `file` plus the given form fields (a list value repeats the field)."""
    data = {"file": (io.BytesIO(data), filename, mimetype), **form}
    return suite.http.post(
        "/v1/importJobs", data=data, content_type="multipart/form-data", headers=headers or suite.headers()
    )


def wait_done(suite, resp) -> dict:
    assert resp.status_code == 201, resp.get_data(as_text=True)
    job = resp.get_json()
    assert resp.headers["Location"] == f"/v1/{job['name']}"
    deadline = time.monotonic() + 30
    while job["state"] == "IMPORT_STATE_RUNNING":
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
        job = suite.http.get(f"/v1/{job['name']}", headers=suite.headers()).get_json()
    assert job["state"] == "IMPORT_STATE_SUCCEEDED", job
    return job


def counts(job: dict) -> dict[str, int]:
    return {k: int(job.get(f"{k}Rows", "0")) for k in ("total", "created", "updated", "skipped", "failed")}


def mobile() -> str:
    return "0912" + str(uuid.uuid4().int)[:7]


def e164(national: str) -> str:
    return "+98" + national[1:]


def in_city(suite, city: str) -> list[dict]:
    return (
        suite.http.get(f'/v1/customers?filter=city = "{city}"', headers=suite.headers()).get_json().get("customers", [])
    )


def test_csv_upload_with_dedupe_policy_and_bracketed_column_mapping(suite):
    h = suite.headers()
    city = f"Uploadville-{uuid.uuid4().hex[:6]}"
    new, known = mobile(), mobile()
    existing = suite.http.post(
        "/v1/customers",
        json={"type": "CUSTOMER_TYPE_PERSON", "givenName": "Reza", "familyName": "Uploadi", "mobile": known},
        headers=h,
    ).get_json()
    # "Mobile No" is no header the service knows: only the mapping makes it the mobile column.
    csv_text = (
        "First Name,Last Name,Mobile No,City\n"
        f"Sara,Uploadi,{new},{city}\n"
        f"Reza,Uploadi,{known},{city}\n"
        f"Bad,Uploadi,12,{city}\n"
    )
    resp = upload(
        suite,
        csv_text.encode(),
        customer_type="CUSTOMER_TYPE_PERSON",
        dedupe_policy="DEDUPE_POLICY_UPDATE",
        **{"column_mapping[Mobile No]": "mobile"},
    )
    job = wait_done(suite, resp)
    assert counts(job) == {"total": 3, "created": 1, "updated": 1, "skipped": 0, "failed": 1}
    people = {c["mobile"]: c for c in in_city(suite, city)}
    assert set(people) == {e164(new), e164(known)}
    assert people[e164(known)]["name"] == existing["name"]  # updated in place, not created again
    report = suite.http.get(f"/v1/{job['name']}/errorReport", headers=h)
    text = report.get_data().decode("utf-8-sig")
    report.close()
    assert "Bad" in text and "mobile" in text


def test_xlsx_upload_infers_the_format_from_the_file_name(suite):
    from openpyxl import Workbook

    h = suite.headers()
    city = f"Sheetville-{uuid.uuid4().hex[:6]}"
    a, b, known = mobile(), mobile(), mobile()
    suite.http.post(
        "/v1/customers",
        json={"type": "CUSTOMER_TYPE_PERSON", "givenName": "Old", "familyName": "Sheeter", "mobile": known},
        headers=h,
    )
    wb = Workbook()
    ws = wb.active
    ws.append(["Given Name", "Family Name", "Telephone", "City"])  # "Telephone" alone would be `phone`
    ws.append(["Nima", "Sheeter", a, city])
    ws.append(["Leila", "Sheeter", b, city])
    ws.append(["Old", "Sheeter", known, city])
    buf = io.BytesIO()
    wb.save(buf)
    key = {**h, "Idempotency-Key": str(uuid.uuid4())}
    form = {
        "customer_type": "CUSTOMER_TYPE_PERSON",
        "dedupe_policy": str(customer_service_pb2.DEDUPE_POLICY_SKIP),  # an enum by its number
        "column_mapping": json.dumps({"Telephone": "mobile"}),  # the whole map as a JSON object
    }
    resp = upload(suite, buf.getvalue(), "people.xlsx", "application/octet-stream", headers=key, **form)
    job = wait_done(suite, resp)
    assert counts(job) == {"total": 3, "created": 2, "updated": 0, "skipped": 1, "failed": 0}
    people = in_city(suite, city)
    assert sorted(c["mobile"] for c in people) == sorted([e164(a), e164(b)])
    assert not any(c.get("phone") for c in people)
    again = upload(suite, buf.getvalue(), "people.xlsx", "application/octet-stream", headers=key, **form)
    assert again.get_json()["name"] == job["name"]  # Idempotency-Key -> request_id, as for JSON


def test_format_from_the_content_type_and_validate_only(suite):
    city = f"Dryrun-{uuid.uuid4().hex[:6]}"
    csv_text = f"first name,last name,city\nDry,Run,{city}\n"
    resp = upload(
        suite, csv_text.encode(), "download", "text/csv; charset=utf-8", customer_type="1", validate_only="true"
    )
    job = wait_done(suite, resp)
    assert job["validateOnly"] is True and counts(job)["created"] == 1
    assert in_city(suite, city) == []  # validate_only reached the service: nothing written
    # Neither the name nor the type says the format: the service names the field.
    unknown = upload(suite, csv_text.encode(), "people.txt", "application/octet-stream")
    assert_problem(unknown, 400, "file_format")


def test_bad_form_input_is_400_naming_the_field(suite):
    h = suite.headers()
    csv = b"first name,last name\nA,B\n"

    def post(data):
        return suite.http.post("/v1/importJobs", data=data, content_type="multipart/form-data", headers=h)

    person = {"customer_type": "CUSTOMER_TYPE_PERSON"}
    missing = assert_problem(post(person), 400, "file")
    assert missing["code"] == "INVALID_ARGUMENT"
    assert_problem(post({**person, "file": "first name\nA\n"}), 400, "file")  # a text field, not a file part
    assert_problem(post({**person, "upload": (io.BytesIO(csv), "people.csv")}), 400, "upload")
    assert_problem(upload(suite, b""), 400, "file")  # the service's `content` violation, named as the part
    unknown = assert_problem(upload(suite, csv, colour="red", **person), 400, "colour")
    assert [e["field"] for e in unknown["errors"]] == ["colour"]
    assert_problem(upload(suite, csv, dedupe_policy="DEDUPE_POLICY_MAYBE", **person), 400, "dedupe_policy")
    assert_problem(upload(suite, csv, customer_type="7"), 400, "customer_type")
    assert_problem(upload(suite, csv, validate_only="maybe", **person), 400, "validate_only")
    assert_problem(upload(suite, csv, column_mapping="[1, 2]", **person), 400, "column_mapping")
    assert_problem(upload(suite, csv, content="QUJD", **person), 400, "content")
    assert_problem(upload(suite, csv, customer_type=["CUSTOMER_TYPE_PERSON"] * 2), 400, "customer_type")
    assert_problem(upload(suite, csv, **{"customer_type[x]": "y"}, **person), 400, "customer_type[x]")
    # Several bad fields: each one named.
    both = assert_problem(upload(suite, csv, colour="red", dedupe_policy="nope", **person), 400)
    assert {e["field"] for e in both["errors"]} == {"colour", "dedupe_policy"}
    # What only the service knows comes back under the form field's own name.
    body = assert_problem(upload(suite, csv, **{"column_mapping[A]": "nonsense"}, **person), 400)
    assert body["errors"][0]["field"] == "column_mapping[A]"
    assert_problem(upload(suite, csv, headers=suite.headers("sales_rep"), **person), 403)
    assert_problem(suite.http.post("/v1/importJobs", data={"file": (io.BytesIO(csv), "p.csv")}), 401)


def test_a_file_over_the_limit_is_413(suite, monkeypatch):
    limit = 1000
    monkeypatch.setitem(suite.app.config, "MAX_UPLOAD_BYTES", limit)
    head = b"first name,last name,note\nAt,Limit,"
    exactly = head + b"x" * (limit - len(head) - 1) + b"\n"
    assert len(exactly) == limit
    ok = upload(suite, exactly, customer_type="CUSTOMER_TYPE_PERSON", validate_only="true")
    assert wait_done(suite, ok)["validateOnly"] is True
    over = upload(suite, exactly + b"\n", customer_type="CUSTOMER_TYPE_PERSON")
    body = assert_problem(over, 413, "file")
    assert "1000 bytes" in body["detail"] and body["reason"] == "UPLOAD_TOO_LARGE"
    # A body far past the limit: refused from its Content-Length, before it is read ...
    huge = upload(suite, exactly * 1100, customer_type="CUSTOMER_TYPE_PERSON")
    assert_problem(huge, 413, "file")
    # ... and without one (chunked), reading stops soon after the limit: no whole copy of it.
    builder = EnvironBuilder(
        method="POST",
        path="/v1/importJobs",
        data={"file": (io.BytesIO(exactly * 3000), "people.csv"), "customer_type": "CUSTOMER_TYPE_PERSON"},
        content_type="multipart/form-data",
        headers=suite.headers(),
    )
    env = builder.get_environ()
    stream = CountingStream(env.pop("wsgi.input").read())
    env.update({"wsgi.input": stream, "wsgi.input_terminated": True})
    del env["CONTENT_LENGTH"]
    assert_problem(suite.http.open(Request(env)), 413, "file")
    assert stream.count <= limit + FORM_OVERHEAD + 128 * 1024 < len(stream.getbuffer())
    # The JSON body keeps its own, larger limit.
    import base64

    as_json = suite.http.post(
        "/v1/importJobs",
        json={
            "content": base64.b64encode(exactly + b"\n").decode(),
            "fileFormat": "IMPORT_FILE_FORMAT_CSV",
            "customerType": "CUSTOMER_TYPE_PERSON",
            "validateOnly": True,
        },
        headers=suite.headers(),
    )
    assert as_json.status_code == 201, as_json.get_data(as_text=True)


def test_openapi_describes_the_multipart_upload(suite):
    doc = suite.http.get("/openapi.json").get_json()
    op = doc["paths"]["/v1/importJobs"]["post"]
    assert set(op["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    form = op["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["file"]
    assert form["properties"]["file"] == {**form["properties"]["file"], "type": "string", "format": "binary"}
    # Generated from the descriptor: every field but the bytes the file part fills.
    fields = {f.name for f in customer_service_pb2.ImportCustomersRequest.DESCRIPTOR.fields}
    assert set(form["properties"]) == fields - {"content"} | {"file"}
    assert form["properties"]["dedupe_policy"]["enum"][1:] == [
        "DEDUPE_POLICY_SKIP",
        "DEDUPE_POLICY_UPDATE",
        "DEDUPE_POLICY_CREATE",
    ]
    assert "column_mapping[KEY]" in form["properties"]["column_mapping"]["description"]
    assert "413" in op["responses"]
    others = [
        (path, method)
        for path, ops in doc["paths"].items()
        for method, o in ops.items()
        if "multipart/form-data" in o.get("requestBody", {}).get("content", {})
    ]
    assert sorted(others) == [
        ("/v1/importJobs", "post"),
        ("/v1/segments/{segment_id}:importMembers", "post"),
    ]  # UPLOADS


def test_every_request_field_maps_from_the_form_by_its_name(suite):
    """Generic over the descriptor: a field added to ImportCustomersRequest later is a form field
    too, with no change to the gateway."""
    from crm_gateway.routes import ROUTES
    from crm_gateway.transcode import build_request

    route = next(r for r in ROUTES if r.rpc == "ImportCustomers")
    form, want = {}, customer_service_pb2.ImportCustomersRequest(content=b"a,b\n")
    for i, fd in enumerate(customer_service_pb2.ImportCustomersRequest.DESCRIPTOR.fields):
        if fd.name == route.upload:
            continue
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            form[f"{fd.name}[Col {i}]"] = f"value{i}"
            getattr(want, fd.name)[f"Col {i}"] = f"value{i}"
        elif fd.type == FD.TYPE_ENUM:
            last = fd.enum_type.values[-1]
            form[fd.name] = last.name if i % 2 else str(last.number)  # by name or by number
            setattr(want, fd.name, last.number)
        elif fd.type == FD.TYPE_BOOL:
            form[fd.name] = "1"
            setattr(want, fd.name, True)
        elif fd.type == FD.TYPE_STRING:
            form[fd.name] = f"text {i}"
            setattr(want, fd.name, f"text {i}")
    assert len(form) == len(want.DESCRIPTOR.fields) - 1  # a field type this test does not know: extend it
    with suite.app.test_request_context(
        "/v1/importJobs",
        method="POST",
        data={"file": (io.BytesIO(b"a,b\n"), "people.csv"), **form},
        content_type="multipart/form-data",
    ):
        got = build_request(route, customer_service_pb2.ImportCustomersRequest, {})
    assert got == want
