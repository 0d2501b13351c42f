"""The gateway over HTTP: routes, status mapping to problem+json, auth, OpenAPI."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from crm_chassis.auth import TokenVerifier
from crm_chassis.config import DEFAULT_JWT_SECRET
from tests.support.harness import assert_problem


def person(**kw):
    body = {"type": "CUSTOMER_TYPE_PERSON", "givenName": "Maryam", "familyName": "Karimi"}
    body.update(kw)
    return body


def test_create_get_and_list(suite):
    suite.http.post("/v1/customers", json=person(), headers=suite.headers())
    resp = suite.http.post("/v1/customers", json=person(email="m@example.com"), headers=suite.headers())
    assert resp.status_code == 201
    made = resp.get_json()
    cid = made["name"].removeprefix("customers/")
    assert resp.headers["Location"] == f"/v1/customers/{cid}" and resp.headers["ETag"] == made["etag"]
    assert made["displayName"] == "Maryam Karimi"
    got = suite.http.get(f"/v1/customers/{cid}", headers=suite.headers("analyst"))
    assert got.status_code == 200 and got.get_json() == made
    page = suite.http.get("/v1/customers?page_size=1", headers=suite.headers()).get_json()
    assert len(page["customers"]) == 1 and page["nextPageToken"]
    page2 = suite.http.get(f"/v1/customers?page_size=1&page_token={page['nextPageToken']}", headers=suite.headers())
    assert page2.status_code == 200 and page2.get_json()["customers"][0]["name"] != page["customers"][0]["name"]


def test_persian_text_round_trips(suite):
    made = suite.http.post("/v1/customers", json=person(givenName="علی", familyName="رضایی"), headers=suite.headers())
    assert made.get_json()["displayName"] == "علی رضایی"
    assert "علی".encode() in made.get_data()  # not \u escapes


def test_idempotency_key_returns_the_first_result(suite):
    key = str(uuid.uuid4())
    a = suite.http.post("/v1/customers", json=person(), headers={**suite.headers(), "Idempotency-Key": key})
    b = suite.http.post(
        "/v1/customers", json=person(givenName="Other"), headers={**suite.headers(), "Idempotency-Key": key}
    )
    assert a.status_code == b.status_code == 201
    assert a.get_json()["name"] == b.get_json()["name"]


def test_bad_input_is_400_problem_naming_the_field(suite):
    h = suite.headers()
    assert_problem(suite.http.post("/v1/customers", json=person(email="nope"), headers=h), 400, "email")
    assert_problem(
        suite.http.post("/v1/customers", json=person(givenName="", familyName=""), headers=h), 400, "family_name"
    )
    assert_problem(
        suite.http.post("/v1/customers", data="{not json", headers={**h, "Content-Type": "application/json"}), 400
    )
    assert_problem(suite.http.post("/v1/customers", json=["a"], headers=h), 400)
    assert_problem(
        suite.http.post("/v1/customers", json=person(favouriteColour="red"), headers=h), 400, "favourite_colour"
    )
    assert_problem(suite.http.get("/v1/customers?page_size=-5", headers=h), 400, "page_size")
    assert_problem(suite.http.get("/v1/customers?page_size=ten", headers=h), 400, "page_size")
    assert_problem(suite.http.get("/v1/customers?page_token=forged.token", headers=h), 400, "page_token")
    assert_problem(suite.http.get("/v1/customers/not-a-uuid", headers=h), 400, "customer_id")
    assert_problem(suite.http.get("/v1/reports/customers-by-source?start_time=yesterday", headers=h), 400, "start_time")
    assert_problem(
        suite.http.get(
            "/v1/reports/customers-by-source?start_time=2026-02-01T00:00:00Z&end_time=2026-01-01T00:00:00Z", headers=h
        ),
        400,
        "end_time",
    )


def test_unknown_customer_is_404_problem(suite):
    body = assert_problem(suite.http.get(f"/v1/customers/{uuid.uuid4()}", headers=suite.headers()), 404)
    assert body["reason"] == "CUSTOMER_NOT_FOUND"
    assert_problem(suite.http.get("/v1/nothing-here", headers=suite.headers()), 404)
    assert_problem(suite.http.delete("/v1/customers", headers=suite.headers()), 405)


def test_no_valid_token_no_data_and_roles_are_enforced(suite):
    for headers in ({}, {"Authorization": "Bearer junk"}, {"Authorization": "Basic dXNlcjpwYXNz"}):
        for path in ("/v1/customers", "/v1/reports/customers-by-source", f"/v1/customers/{uuid.uuid4()}"):
            resp = suite.http.get(path, headers=headers)
            assert_problem(resp, 401)
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert_problem(suite.http.post("/v1/customers", json=person()), 401)
    assert_problem(suite.http.get("/v1/reports/customers-by-source", headers=suite.headers("sales_rep")), 403)
    assert_problem(suite.http.post("/v1/customers", json=person(), headers=suite.headers("analyst")), 403)


def test_health_readiness_and_request_ids(suite):
    assert suite.http.get("/healthz").status_code == 200
    ready = suite.http.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["services"] == {"customer": "SERVING", "reporting": "SERVING"}
    resp = suite.http.get("/v1/customers", headers={**suite.headers(), "X-Request-Id": "abc123"})
    assert resp.headers["X-Request-Id"] == "abc123"


def test_openapi_lists_exactly_the_routes(suite):
    doc = suite.http.get("/openapi.json").get_json()
    assert doc["openapi"].startswith("3.")
    documented = {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops}
    served = set()
    for rule in suite.app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = rule.rule.replace("<", "{").replace(">", "}")
        served |= {(path, m) for m in rule.methods - {"HEAD", "OPTIONS"}}
    assert documented == served


def test_token_command_prints_a_token_services_accept():
    out = subprocess.run(
        [sys.executable, "-m", "crm_gateway", "token", "--sub", "alice", "--roles", "sales_rep,marketer"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    principal = TokenVerifier(DEFAULT_JWT_SECRET).verify(out)
    assert principal.subject == "alice" and principal.roles == ("sales_rep", "marketer")
    bad = subprocess.run(
        [sys.executable, "-m", "crm_gateway", "token", "--sub", "x", "--roles", "wizard"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "unknown roles" in bad.stderr


@pytest.mark.parametrize("status_code", [503])
def test_a_service_down_is_503_not_500(databases, broker, status_code):
    from crm_gateway import create_app
    from crm_gateway.clients import Clients

    dead = Clients({"customer": "127.0.0.1:9", "reporting": "127.0.0.1:9"})
    try:
        app = create_app(dead)
        resp = app.test_client().get(
            "/v1/customers",
            headers={"Authorization": f"Bearer {TokenVerifier(DEFAULT_JWT_SECRET).mint('a', ['admin'])}"},
        )
        assert_problem(resp, status_code)
        assert app.test_client().get("/readyz").status_code == 503
    finally:
        dead.close()


def test_patch_uses_the_body_fields_as_mask_and_if_match_as_etag(suite):
    h = suite.headers()
    made = suite.http.post("/v1/customers", json=person(city="Shiraz", email="p@example.com"), headers=h).get_json()
    cid = made["name"].removeprefix("customers/")
    resp = suite.http.patch(f"/v1/customers/{cid}", json={"city": "Isfahan"}, headers={**h, "If-Match": made["etag"]})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["city"] == "Isfahan" and body["email"] == "p@example.com" and resp.headers["ETag"] == body["etag"]
    stale = suite.http.patch(f"/v1/customers/{cid}", json={"city": "Yazd"}, headers={**h, "If-Match": made["etag"]})
    assert_problem(stale, 409)
    assert_problem(suite.http.patch(f"/v1/customers/{cid}", json={"mobile": "12"}, headers=h), 400, "mobile")


def test_delete_undelete_search_notes_groups_and_audit_over_http(suite):
    h = suite.headers()
    made = suite.http.post("/v1/customers", json=person(familyName="Httpian", city="Qazvin"), headers=h).get_json()
    cid = made["name"].removeprefix("customers/")
    assert suite.http.delete(f"/v1/customers/{cid}", headers=h).get_json()["deleteTime"]
    assert suite.http.get('/v1/customers?filter=city = "Qazvin"', headers=h).get_json().get("customers") is None
    assert suite.http.post(f"/v1/customers/{cid}:undelete", headers=h).status_code == 200
    hits = suite.http.get("/v1/customers:search?query=httpian", headers=h).get_json()["results"]
    assert hits[0]["customer"]["name"] == made["name"]
    note = suite.http.post(f"/v1/customers/{cid}/notes", json={"text": "Likes tea"}, headers=h)
    assert note.status_code == 201 and note.get_json()["author"] == "tester"
    assert suite.http.get(f"/v1/customers/{cid}/notes", headers=h).get_json()["notes"][0]["text"] == "Likes tea"
    group = suite.http.post("/v1/groups", json={"displayName": "HTTP group"}, headers=h).get_json()
    gid = group["name"].removeprefix("groups/")
    added = suite.http.post(f"/v1/groups/{gid}:addMembers", json={"customers": [made["name"]]}, headers=h)
    assert added.get_json()["added"] == "1"
    members = suite.http.get(f"/v1/groups/{gid}/members", headers=h).get_json()["customers"]
    assert [m["name"] for m in members] == [made["name"]]
    audit = suite.http.get(f"/v1/auditEntries?resource={made['name']}", headers=h).get_json()["auditEntries"]
    assert {a["action"] for a in audit} >= {"create", "delete", "undelete", "group.add"}
    assert_problem(suite.http.get(f"/v1/auditEntries?resource={made['name']}", headers=suite.headers("analyst")), 403)
    assert_problem(suite.http.get("/v1/customers?colour=red", headers=h), 400, "colour")


def test_export_downloads_a_file(suite):
    h = suite.headers()
    suite.http.post("/v1/customers", json=person(familyName="Exportson", city="Exportabad"), headers=h)
    resp = suite.http.get('/v1/customers:export?format=EXPORT_FORMAT_CSV&filter=city = "Exportabad"', headers=h)
    assert resp.status_code == 200 and resp.mimetype == "text/csv"
    assert resp.headers["Content-Disposition"].startswith('attachment; filename="customers-')
    assert "Maryam Exportson" in resp.get_data().decode("utf-8-sig") and resp.headers["X-Row-Count"] == "1"
    resp.close()
    from opentelemetry import trace

    assert not trace.get_current_span().get_span_context().is_valid  # the stream's span did not leak
    assert_problem(
        suite.http.get("/v1/customers:export?format=EXPORT_FORMAT_CSV&filter=nonsense", headers=h), 400, "filter"
    )
    assert_problem(
        suite.http.get("/v1/customers:export?format=EXPORT_FORMAT_CSV", headers=suite.headers("sales_rep")), 403
    )


def test_import_over_http_with_progress_and_error_report(suite):
    import base64
    import time

    h = suite.headers()
    csv_text = "نام,نام خانوادگی,ایمیل,شهر\nسارا,کریمی,sara@example.ir,Importville\nبد,ایمیل,not-an-email,Importville\n"
    resp = suite.http.post(
        "/v1/importJobs",
        headers=h,
        json={
            "content": base64.b64encode(csv_text.encode()).decode(),
            "fileFormat": "IMPORT_FILE_FORMAT_CSV",
            "customerType": "CUSTOMER_TYPE_PERSON",
        },
    )
    assert resp.status_code == 201, resp.get_data(as_text=True)
    job = resp.get_json()
    jid = job["name"].removeprefix("importJobs/")
    assert resp.headers["Location"] == f"/v1/{job['name']}"
    deadline = time.monotonic() + 30
    while job["state"] == "IMPORT_STATE_RUNNING":
        assert time.monotonic() < deadline
        time.sleep(0.1)
        job = suite.http.get(f"/v1/importJobs/{jid}", headers=h).get_json()
    assert job["state"] == "IMPORT_STATE_SUCCEEDED" and job["createdRows"] == "1" and job["failedRows"] == "1"
    report = suite.http.get(f"/v1/importJobs/{jid}/errorReport", headers=h)
    text = report.get_data().decode("utf-8-sig")
    report.close()
    assert report.status_code == 200 and "not-an-email" in text and "3" in text.splitlines()[1]
    listed = suite.http.get('/v1/customers?filter=city = "Importville"', headers=h).get_json()["customers"]
    assert [c["email"] for c in listed] == ["sara@example.ir"]
    assert_problem(
        suite.http.post("/v1/importJobs", headers=h, json={"fileFormat": "IMPORT_FILE_FORMAT_CSV"}), 400, "content"
    )
    assert_problem(suite.http.post("/v1/importJobs", headers=suite.headers("sales_rep"), json={}), 403)
    listing = suite.http.get("/v1/importJobs?page_size=500", headers=h)
    assert listing.status_code == 200, listing.get_data(as_text=True)
    jobs = listing.get_json()["importJobs"]
    assert job["name"] in [j["name"] for j in jobs]
    ended = suite.http.post(f"/v1/importJobs/{jid}:cancel", headers=h, json={})
    assert assert_problem(ended, 400)["code"] == "FAILED_PRECONDITION"  # the job has ended
    assert_problem(suite.http.post(f"/v1/importJobs/{uuid.uuid4()}:cancel", headers=h, json={}), 404)
