"""Regressions found by probing a running suite from outside (HTTP, gRPC, SMTP): each test is
one bug seen there, reproduced against the in-process service."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import io
import json

import grpc
import pytest

from crm.support.v1 import calls_pb2 as calls_pb
from crm.support.v1 import calls_pb2_grpc
from crm_chassis.errors import read_rpc_error
from tests.support.harness import md, token

PUBLIC = md("public_channel", "gateway:public")
CTI_KEY = b"dev-cti-key"


def _signed(body: bytes) -> str:
    return "sha256=" + hmac.new(CTI_KEY, body, hashlib.sha256).hexdigest()


def test_a_cti_event_with_a_nul_character_is_invalid_argument_not_internal(ch):
    """A PBX event whose call_id (or queue, agent) held U+0000 reached the INSERT and failed
    there: INTERNAL (HTTP 500). It is a bad field like any other."""
    stub = calls_pb2_grpc.CallServiceStub(ch)
    at = dt.datetime(2026, 3, 1, 10, 0, tzinfo=dt.UTC).isoformat()
    for field in ("call_id", "queue", "agent"):
        data = {"call_id": "nul-1", "event": "answered", "direction": "inbound", "caller": "09121234567"}
        data.update({"time": at, "agent": "omid", field: "a\x00b"})
        body = json.dumps(data).encode()
        req = calls_pb.PostCallEventRequest(pbx="dev-pbx", body=body, signature=_signed(body))
        with pytest.raises(grpc.RpcError) as err:
            stub.PostCallEvent(req, metadata=PUBLIC)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, err.value.details())
        assert [v.field for v in read_rpc_error(err.value).field_violations] == [field]


@pytest.fixture(scope="module")
def http(svc):
    from crm_gateway import create_app
    from crm_gateway.clients import Clients

    clients = Clients(
        {
            "customer": "127.0.0.1:9",
            "sales": "127.0.0.1:9",
            "support": f"127.0.0.1:{svc.port}",
            "reporting": "127.0.0.1:9",
        }
    )
    return create_app(clients).test_client()


def test_a_405_says_which_methods_the_route_allows(http):
    """The gateway's problem document replaced werkzeug's 405 and dropped its Allow header
    (RFC 9110 requires it)."""
    resp = http.put("/v1/categories", headers={"Authorization": f"Bearer {token('support_manager', 'mina')}"})
    assert resp.status_code == 405
    assert resp.mimetype == "application/problem+json"
    assert set(resp.headers["Allow"].replace(" ", "").split(",")) >= {"GET", "POST"}


def _chunked(http, path: str, body: bytes, client: str):
    """POST `body` the way gunicorn hands a Transfer-Encoding: chunked request to the app: no
    CONTENT_LENGTH, wsgi.input_terminated set."""
    from werkzeug.test import EnvironBuilder
    from werkzeug.wrappers import Response

    environ = EnvironBuilder(
        path=path, method="POST", input_stream=io.BytesIO(body), content_type="application/json"
    ).get_environ()
    environ.pop("CONTENT_LENGTH", None)
    environ.update({"wsgi.input_terminated": True, "HTTP_TRANSFER_ENCODING": "chunked"})
    environ["HTTP_X_FORWARDED_FOR"] = client
    return Response.from_app(http.application, environ)


def test_a_chunked_public_body_over_the_limit_is_413_not_a_truncated_400(http):
    """A body without Content-Length (Transfer-Encoding: chunked) over a public route's limit was
    cut at the limit by werkzeug and answered as broken JSON (400) or, for a signed route, a
    bad signature (401). It is too large: 413, as with a Content-Length."""
    body = json.dumps({"siteKey": "dev-site-key", "email": "a@example.ir", "body": "x" * 40_000}).encode()
    resp = _chunked(http, "/v1/webform:submit", body, "10.77.0.1")
    assert resp.status_code == 413, resp.get_data(as_text=True)
    event = json.dumps({"call_id": "c-big", "event": "new", "direction": "inbound", "pad": "x" * 70_000}).encode()
    resp = _chunked(http, "/v1/cti/dev-pbx:event", event, "10.77.0.1")
    assert resp.status_code == 413, resp.get_data(as_text=True)
    # a chunked body within the limit still goes through
    small = json.dumps({"siteKey": "dev-site-key", "email": "a@example.ir", "body": "سلام"}).encode()
    resp = _chunked(http, "/v1/webform:submit", small, "10.77.0.2")
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.get_json()["ticketNumber"].startswith("T-")


def test_make_run_with_a_port_offset_links_surveys_to_its_own_gateway():
    """`CRM_PORT_OFFSET=300 make run` serves the gateway at 8380, but the survey link in an agent
    reply pointed at http://localhost:8080 (SURVEY_BASE_URL's default): another suite's gateway,
    or nothing."""
    import importlib.util
    import pathlib
    import sys

    path = pathlib.Path(__file__).resolve().parents[2] / "tools" / "devrun.py"
    spec = importlib.util.spec_from_file_location("devrun_probe", path)
    devrun = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = devrun  # its dataclasses look their module up
    spec.loader.exec_module(devrun)
    env = devrun.support_env({}, 300, 8380)
    assert env["SURVEY_BASE_URL"] == "http://localhost:8380"
    assert (env["SMTP_PORT"], env["MAIL_IN_PORT"]) == ("2826", "2825")
    assert devrun.support_env({"SURVEY_BASE_URL": "https://crm.example.ir"}, 300, 8380)["SURVEY_BASE_URL"] == (
        "https://crm.example.ir"
    )


def test_a_mail_with_nul_characters_is_stored_not_answered_451_forever(svc):
    """A mail with U+0000 in its Message-ID, subject, sender name or body failed in PostgreSQL
    (a DataError, which mail-in treats as the database being down): 451 on every retry of the
    sending MTA. Content never makes a 4xx; the NULs are dropped."""
    import smtplib

    import sqlalchemy as sa

    from support_svc.tables import ticket_messages, tickets

    from .conftest import rt

    raw = (
        b"From: =?utf-8?q?Sa=00ra?= <nul-sender@example.ir>\r\nTo: support@crm.local\r\n"
        b"Subject: nul\x00here\r\nMessage-ID: <nul\x00probe@example.ir>\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n\r\nbody\x00with a nul\r\n"
    )
    with smtplib.SMTP("127.0.0.1", rt(svc).extra["mail_in"].port, timeout=30) as s:
        s.ehlo()
        s.mail("nul-sender@example.ir")
        s.rcpt("support@crm.local")
        code, answer = s.data(raw)
    assert code == 250, answer
    with svc.ctx.engine.connect() as conn:
        row = conn.execute(
            sa.select(tickets.c.subject, ticket_messages.c.body, ticket_messages.c.external_id)
            .join(ticket_messages, ticket_messages.c.ticket_id == tickets.c.id)
            .where(tickets.c.contact_address == "nul-sender@example.ir")
        ).one()
    assert row.subject == "nulhere" and row.body == "bodywith a nul"
    assert row.external_id == "<nulprobe@example.ir>"


@pytest.mark.parametrize(
    "path",
    [
        "/v1/tickets",
        "/v1/agents",
        "/v1/cannedAnswers",
        "/v1/calls",
        "/v1/callbacks",
        "/v1/articles",
        "/v1/slaPolicies",
        "/v1/surveys",
        "/v1/surveyTemplates",
    ],
)
def test_a_blank_order_by_is_the_default_order_not_a_500(http, path):
    """`?order_by=%20` (only spaces) passed the `or "default"` and parse_order_by answered no
    keys for it; keys[-1] then raised IndexError: INTERNAL, HTTP 500, on every list of
    support-svc."""
    headers = {"Authorization": f"Bearer {token('support_manager', 'mina')}"}
    resp = http.get(f"{path}?order_by=%20%20", headers=headers)
    assert resp.status_code == 200, resp.get_data(as_text=True)


@pytest.mark.parametrize("tz", ["Asia", "Europe", "x" * 300, "Asia/" + "y" * 300])
def test_a_calendar_time_zone_that_is_a_folder_or_too_long_is_a_named_bad_field(http, tz):
    """zoneinfo raises IsADirectoryError for "Asia" (a region, not a zone) and OSError for a
    name too long for the file system; only ZoneInfoNotFoundError and ValueError were caught, so
    CreateCalendar answered INTERNAL (HTTP 500)."""
    headers = {"Authorization": f"Bearer {token('support_manager', 'mina')}"}
    body = {
        "displayName": f"tz {tz[:20]} {len(tz)}",
        "timezone": tz,
        "weeklyHours": {"sat": {"ranges": ["08:00-16:00"]}},
    }
    resp = http.post("/v1/calendars", json=body, headers=headers)
    assert resp.status_code == 400, resp.get_data(as_text=True)
    assert [e["field"] for e in resp.get_json()["errors"]] == [
        "timezone"
    ]  # the body is the calendar: the gateway names its field
