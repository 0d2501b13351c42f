"""The public web form: over HTTP through the gateway without a bearer token it opens a web
ticket and answers its number (never its id); the site key, the honeypot, the fields' rules,
idempotency, and the gateway's rate and size limits of the route."""

from __future__ import annotations

import itertools
import os

import grpc
import pytest
import sqlalchemy as sa

from crm.support.v1 import channels_pb2 as pb
from crm.support.v1 import channels_pb2_grpc
from support_svc.__main__ import SPEC
from support_svc.channels_api import webform_submissions
from support_svc.tables import tickets
from support_svc.ticketing import number_text
from tests.support.customers import customer_message
from tests.support.harness import assert_problem, gateway_client, md, start_service

from .conftest import category_id, rt

PATH = "/v1/webform:submit"
KEYS = "site-main-7f3a,site-shop-91bc"


@pytest.fixture(scope="module")
def svc(request, databases, broker):
    saved = os.environ.get("WEB_FORM_KEYS")
    os.environ["WEB_FORM_KEYS"] = KEYS
    try:
        service = start_service(SPEC, databases.fresh("webform"), broker.url, relay=False)
    finally:
        if saved is None:
            os.environ.pop("WEB_FORM_KEYS", None)
        else:
            os.environ["WEB_FORM_KEYS"] = saved
    yield service
    service.stop(0)


def make_http(svc):
    """The gateway as behind one proxy (the ingress): the client is the last X-Forwarded-For entry."""
    return gateway_client(hops=1, support=f"127.0.0.1:{svc.port}")


@pytest.fixture
def http(svc):
    client, clients = make_http(svc)
    yield client
    clients.close()


def form(**over) -> dict:
    base = {
        "siteKey": "site-main-7f3a",
        "name": "مریم کریمی",
        "email": "Maryam.Karimi@Example.IR",
        "phone": "0912 345 6789",
        "subject": "تأخیر در ارسال",
        "body": "سفارش ۱۰۲۴ من یک هفته است که ارسال نشده. لطفاً پیگیری کنید.",
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


_clients = itertools.count(1)


def submit(http, body: dict, headers: dict | None = None):
    """POST the form from a client address of its own (the route allows 10 a minute each)."""
    n = next(_clients)
    return http.post(
        PATH, json=body, headers={"X-Forwarded-For": f"198.18.{n // 250}.{n % 250 + 1}", **(headers or {})}
    )


def count(svc, table=tickets) -> int:
    with svc.ctx.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(table)).scalar()


def by_number(svc, number: str):
    with svc.ctx.engine.connect() as conn:
        return conn.execute(sa.select(tickets).where(tickets.c.number == int(number.removeprefix("T-")))).one()


def test_a_form_over_http_without_a_token_opens_a_web_ticket_and_answers_its_number(svc, http):
    resp = http.post(
        PATH,
        json=form(category="complaint", clientAddress="198.51.100.1"),  # the body cannot set the address
        headers={"X-Forwarded-For": "10.9.9.9, 203.0.113.7"},  # the first entry the client wrote itself
    )
    assert resp.status_code == 200, resp.get_data(as_text=True)
    body = resp.get_json()
    assert set(body) == {"ticketNumber", "message"}  # the number and a text, never the ticket's id
    assert body["ticketNumber"].startswith("T-") and body["ticketNumber"] in body["message"]
    assert "tickets/" not in resp.get_data(as_text=True)
    t = by_number(svc, body["ticketNumber"])
    assert t.channel == "web" and t.contact_address == "maryam.karimi@example.ir" and t.contact_name == "مریم کریمی"
    assert t.subject == "تأخیر در ارسال" and t.category_id == category_id(svc, "complaint") and t.complaint
    assert t.custom_fields == {"phone": "+989123456789"} and t.message_count == 1
    with svc.ctx.engine.connect() as conn:
        sub = conn.execute(sa.select(webform_submissions).where(webform_submissions.c.ticket_id == t.id)).one()
    assert sub.client_address == "203.0.113.7" and sub.site_key == "site-main-7f3a" and sub.phone == "+989123456789"


def test_a_phone_only_form_is_matched_to_its_customer_and_the_subject_defaults_to_the_body(svc, http):
    from support_svc import customer_projection

    handlers = customer_projection.subscriptions(rt(svc))[0].handlers
    e = customer_message("customer.created.v1", mobile="+989351112233")
    with svc.ctx.engine.begin() as conn:
        handlers[e.routing_key](conn, e)
    text = "دستگاه خریداری شده روشن نمی‌شود و گارانتی دارد؛ لطفاً برای تعمیر یا تعویض راهنمایی کنید. " * 2
    resp = submit(http, form(email=None, phone="۰۹۳۵۱۱۱۲۲۳۳", subject=None, body=text, siteKey="site-shop-91bc"))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    t = by_number(svc, resp.get_json()["ticketNumber"])
    assert t.contact_address == "+989351112233" and t.customer_id == e.subject.removeprefix("customers/")
    assert t.subject == " ".join(text.split())[:80]


def test_a_wrong_or_missing_site_key_is_401_and_unauthenticated(svc, http, ch):
    before = count(svc)
    assert_problem(submit(http, form(siteKey="site-main-7f3b")), 401)
    assert_problem(submit(http, form(siteKey=None)), 401)
    assert_problem(submit(http, form(siteKey="site-main-7f3a,site-shop-91bc")), 401)
    stub = channels_pb2_grpc.ChannelServiceStub(ch)
    with pytest.raises(grpc.RpcError) as err:
        stub.SubmitWebForm(
            pb.SubmitWebFormRequest(site_key="dev-site-key", email="a@b.ir", body="x"),  # not configured here
            metadata=md("public_channel", "gateway:public"),
        )
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert count(svc) == before


def test_a_filled_honeypot_is_answered_as_accepted_and_nothing_is_stored(svc, http):
    before, subs = count(svc), count(svc, webform_submissions)
    resp = submit(http, form(website="http://spam.example"))
    assert resp.status_code == 200
    body = resp.get_json()
    assert "ticketNumber" not in body and body["message"]  # a confirmation without a number
    assert count(svc) == before and count(svc, webform_submissions) == subs


def test_bad_fields_are_400_naming_each_field(svc, http):
    before = count(svc)
    assert_problem(submit(http, form(email=None, phone=None)), 400, "email")
    assert_problem(submit(http, form(email="", phone="")), 400, "phone")
    assert_problem(submit(http, form(email="maryam@@example")), 400, "email")
    assert_problem(submit(http, form(email="maryam@example")), 400, "email")
    assert_problem(submit(http, form(phone="12")), 400, "phone")
    assert_problem(submit(http, form(body="  ")), 400, "body")
    assert_problem(submit(http, form(body="ب" * 10_001)), 400, "body")
    assert_problem(submit(http, form(name="ن" * 201)), 400, "name")
    assert_problem(submit(http, form(subject="s" * 201)), 400, "subject")
    assert_problem(submit(http, form(category="no-such-category")), 400, "category")
    assert_problem(submit(http, form(color="blue")), 400, "color")  # not a field of the form
    assert count(svc) == before
    # the limits themselves are accepted
    ok = submit(http, form(body="ب" * 10_000, email=None))
    assert ok.status_code == 200, ok.get_data(as_text=True)


def test_a_retried_form_with_its_idempotency_key_is_one_ticket(svc, http):
    before = count(svc)
    first = submit(http, form(), {"Idempotency-Key": "form-8c1d"})
    again = submit(http, form(), {"Idempotency-Key": "form-8c1d"})
    assert first.status_code == again.status_code == 200
    assert first.get_json()["ticketNumber"] == again.get_json()["ticketNumber"]
    assert count(svc) == before + 1
    other = submit(http, form(), {"Idempotency-Key": "form-8c1e"})
    assert other.get_json()["ticketNumber"] != first.get_json()["ticketNumber"]


def test_the_route_is_rate_limited_per_client(svc, monkeypatch):
    """The route's own limit (10 a minute); the limiter's clock is held still so that the
    minute's window cannot turn over in the middle of the test."""
    from crm_gateway import app as app_mod
    from crm_gateway.public import RateLimiter

    monkeypatch.setattr(app_mod, "RateLimiter", lambda: RateLimiter(clock=lambda: 600.0))
    http, clients = make_http(svc)
    try:
        for _ in range(10):  # refused by the service, but counted by the gateway
            assert http.post(PATH, json=form(siteKey="wrong")).status_code == 401
        limited = http.post(PATH, json=form())
        assert_problem(limited, 429)
        assert limited.headers["Retry-After"] == "60"
        assert http.post(PATH, json=form(), headers={"X-Forwarded-For": "192.0.2.55"}).status_code == 200
        # a client writing addresses of its own in front of what the proxy appended is still itself
        spoofed = {"X-Forwarded-For": "198.51.100.99, 192.0.2.55"}
        for _ in range(9):
            http.post(PATH, json=form(siteKey="wrong"), headers=spoofed)
        assert_problem(http.post(PATH, json=form(), headers={"X-Forwarded-For": "203.0.113.1, 192.0.2.55"}), 429)
    finally:
        clients.close()
    direct, clients = gateway_client(support=f"127.0.0.1:{svc.port}")  # no proxy in front
    try:
        for i in range(10):
            direct.post(PATH, json=form(siteKey="wrong"), headers={"X-Forwarded-For": f"198.18.0.{i}"})
        limited = direct.post(PATH, json=form(), headers={"X-Forwarded-For": "198.18.1.1"})
        assert_problem(limited, 429)  # X-Forwarded-For is not believed without a proxy
    finally:
        clients.close()


def test_a_body_over_the_route_limit_is_413_before_the_service(svc, http):
    before = count(svc)
    resp = http.post(PATH, json=form(body="x" * (33 * 1024)))
    assert_problem(resp, 413)
    assert count(svc) == before


def test_the_openapi_document_lists_the_public_routes(http):
    doc = http.get("/openapi.json")
    assert doc.status_code == 200
    op = doc.get_json()["paths"][PATH]["post"]
    assert op["security"] == [] and "10 requests a minute" in op["description"]
    assert {"401", "413", "429"} <= set(op["responses"])
    hook = doc.get_json()["paths"]["/v1/channels/{provider}:webhook"]["post"]
    assert "X-Telegram-Bot-Api-Secret-Token" in [p["name"] for p in hook["parameters"]]


def test_numbers_are_not_ids():
    assert number_text(7) == "T-000007"
