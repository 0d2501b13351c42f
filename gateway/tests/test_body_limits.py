"""Bodies the gateway refuses before any service sees them: JSON nested too deeply (400, not a
RecursionError's 500), a body over the route's limit (413 before it is read), and what OPTIONS
answers. The services are the suite's real customer-svc and reporting-svc on loopback."""

from __future__ import annotations

import base64
import json

import pytest

from crm_gateway import create_app
from crm_gateway.app import max_body_bytes
from crm_gateway.transcode import DEFAULT_MAX_BODY_BYTES
from tests.support.harness import assert_problem

DEEP = "[" * 1000 + "]" * 1000


@pytest.mark.parametrize("path", ["/v1/customers", "/v1/webform:submit"])
def test_json_nested_too_deeply_is_a_400(suite, path):
    # /v1/webform:submit is public: no token, and no service reached either
    resp = suite.http.post(path, data=DEEP, headers={**suite.headers(), "Content-Type": "application/json"})
    doc = assert_problem(resp, 400, "body")
    assert "nested too deeply" in doc["detail"]
    inner = '{"type": "CUSTOMER_TYPE_PERSON", "givenName": "a", "familyName": "b", "x": ' + DEEP + "}"
    resp = suite.http.post("/v1/customers", data=inner, headers={**suite.headers(), "Content-Type": "application/json"})
    assert_problem(resp, 400, "body")


def test_a_struct_field_nested_too_deeply_is_a_400(suite):
    # under json's recursion limit, over protobuf's (ParseDict's depth limit names the field)
    deep = "{}"
    for _ in range(400):
        deep = '{"a": ' + deep + "}"
    body = '{"displayName": "x", "report": "acquisition", "cron": "0 8 * * *", "parameters": ' + deep + "}"
    json.loads(body)  # valid JSON, which the gateway's parser reads
    resp = suite.http.post(
        "/v1/reportSchedules", data=body, headers={**suite.headers(), "Content-Type": "application/json"}
    )
    assert_problem(resp, 400, "parameters")


def test_the_body_limit_setting():
    assert max_body_bytes({}) == DEFAULT_MAX_BODY_BYTES == 10 * 1024 * 1024
    assert max_body_bytes({"GATEWAY_MAX_BODY_BYTES": "2048"}) == 2048
    assert max_body_bytes({"GATEWAY_MAX_BODY_BYTES": "lots"}) == DEFAULT_MAX_BODY_BYTES


def test_a_body_over_the_limit_is_413_and_a_file_route_takes_more(suite):
    h = {**suite.headers(), "Content-Type": "application/json"}
    person = {"type": "CUSTOMER_TYPE_PERSON", "givenName": "a", "familyName": "b"}
    over = json.dumps({**person, "givenName": "x" * (DEFAULT_MAX_BODY_BYTES + 10)})
    doc = assert_problem(suite.http.post("/v1/customers", data=over, headers=h), 413)
    assert doc["detail"] == "the body may be at most 10 MiB"

    small = create_app(suite.clients, max_body=4096).test_client()
    assert_problem(small.post("/v1/customers", data=json.dumps({**person, "givenName": "x" * 5000}), headers=h), 413)
    made = small.post("/v1/customers", data=json.dumps(person), headers=h)
    assert made.status_code == 201, made.get_data(as_text=True)
    # An import carries its file in the body (base64 in JSON): it still takes up to 90 MiB.
    csv = b"given_name,family_name\n" + b"Ali,Rezaei\n" * 1000
    body = json.dumps({"content": base64.b64encode(csv).decode(), "fileFormat": "IMPORT_FILE_FORMAT_CSV"})
    assert len(body) > 4096
    resp = small.post("/v1/importJobs", data=body, headers=h)
    assert resp.status_code != 413, resp.get_data(as_text=True)
    assert resp.status_code < 500, resp.get_data(as_text=True)


def test_options_is_204_with_allow(suite):
    resp = suite.http.options("/v1/customers")  # no token: it reaches no service
    assert resp.status_code == 204 and resp.get_data() == b""
    assert set(resp.headers["Allow"].split(", ")) >= {"GET", "POST", "OPTIONS"}
    assert "Content-Type" not in resp.headers
    resp = suite.http.options("/v1/webform:submit")
    assert resp.status_code == 204 and "POST" in resp.headers["Allow"]
