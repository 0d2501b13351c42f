"""Tracking end to end: a campaign mailed to a real SMTP server (aiosmtpd) carries click links and
the open pixel (its unsubscribe link left alone); the pixel and the click go through the
gateway's public routes (Flask test client, gRPC on loopback): a GIF recorded once, a 302 to the
signed target, a forged token refused; a DSN's hard bounce suppresses the address for the next
run; a provider's JSON bounce; an SMS delivery receipt; the site's click-stream tying a visitor
to a customer; responses published for sales."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import uuid
from urllib.parse import parse_qs, urlsplit

import grpc
import pytest
import sqlalchemy as sa

from campaign_svc import consent_api, delivery, tracking
from campaign_svc.__main__ import SPEC
from campaign_svc.tables import audience, audience_invoices, messages, suppressions
from campaign_svc.tracking_tables import page_events, visitors, web_activity
from crm.campaign.v1 import campaign_events_pb2 as ev
from crm.campaign.v1 import campaign_service_pb2 as cpb
from crm.campaign.v1 import (
    campaign_service_pb2_grpc,
    segments_pb2_grpc,
    templates_pb2,
    templates_pb2_grpc,
    tracking_pb2_grpc,
)
from crm.campaign.v1 import tracking_pb2 as pb
from crm_chassis.links import Signer
from tests.support.customers import customer, customer_message, merged_message
from tests.support.harness import channel, gateway_client, start_service
from tests.support.smtp_capture import SmtpCapture

from .conftest import MARKETER, deliver, events, row, rt
from .test_campaigns import campaign, launched, people, rows_of, segment_of, template
from .test_segments import dynamic, members

BASE = "https://crm.test"
SHOP = "https://shop.example.ir/autumn?x=1&y=2"
HTML = (
    '<html><body><p>{{ customer.display_name }}، <a href="https://shop.example.ir/autumn?x=1&amp;y=2">حراج</a>'
    ' <a href="mailto:help@example.ir">help</a>'
    ' <a href="{{ unsubscribe_url }}">لغو اشتراک</a></p></body></html>'
)
KEY = {"X-Crm-Provider-Key": "dev-bounce-key"}


@pytest.fixture(scope="module")
def smtp():
    with SmtpCapture() as s:
        yield s


@pytest.fixture(scope="module")
def svc(databases, broker, smtp):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SMTP_PORT", str(smtp.port))
        mp.setenv("SMTP_FROM", "news@crm.test")
        mp.setenv("MAIL_DOMAIN", "crm.test")
        mp.setenv("SMTP_TIMEOUT_SECONDS", "2")
        mp.setenv("PUBLIC_BASE_URL", BASE)
        mp.setenv("TRACKING_SITE_DOMAINS", "shop.example.ir")
        service = start_service(SPEC, databases.fresh("test_tracking"), broker.url, relay=False)
    r = rt(service)
    r.timers.stop()
    r.timers._stopping.clear()
    delivery.worker(r).stop()
    yield service
    service.stop(0)


@pytest.fixture(scope="module")
def stubs(svc):
    with channel(svc) as ch:
        yield (
            campaign_service_pb2_grpc.CampaignServiceStub(ch),
            segments_pb2_grpc.SegmentServiceStub(ch),
            templates_pb2_grpc.TemplateServiceStub(ch),
        )


@pytest.fixture(scope="module")
def tr(svc):
    with channel(svc) as ch:
        yield tracking_pb2_grpc.TrackingServiceStub(ch)


@pytest.fixture
def sender(svc):
    d = delivery.worker(rt(svc))
    d.clock = lambda: 0.0
    d._budget.clear()
    return d


@pytest.fixture(autouse=True)
def clean_desk(svc):
    """What an earlier test left queued or held is cancelled: each test's rounds send its own."""
    with svc.ctx.engine.begin() as conn:
        conn.execute(messages.update().where(messages.c.state.in_(("queued", "held"))).values(state="cancelled"))


@pytest.fixture(scope="module")
def http(svc):
    client, clients = gateway_client(campaign=f"127.0.0.1:{svc.port}")
    yield client
    clients.close()


def mailed(svc, stubs, smtp, sender, n: int = 1, **fields):
    """A campaign with a tracked template sent to n new people: (campaign, ids, {id: html})."""
    ids = people(svc, n)
    before = len(smtp.messages())
    c = launched(
        stubs, svc, campaign(stubs, segment_of(stubs, ids), [cpb.Variant(template=template(stubs, HTML))], **fields)
    )
    assert sender.run_once() == n
    got = {m["To"].split("@")[0]: m.get_body(("html",)).get_content() for m in smtp.messages()[before:]}
    return c, ids, got


def message_row(svc, c, customer_id):
    return next(r for r in rows_of(svc, c) if r.customer_id == customer_id)


def path_of(url: str) -> str:
    assert url.startswith(BASE), url
    return url[len(BASE) :]


def test_link_rewriting_tracks_http_links_only_and_leaves_unsubscribe_links_alone(svc):
    r = rt(svc)
    unsubscribe = consent_api.unsubscribe_url(r, "email", "a@b.ir", "marketing", "m-1")
    html = (
        f'<body><a class="x" href="https://a.ir/p?q=1&amp;r=2">a</a> <a href=\'{unsubscribe}\'>u</a>'
        ' <a href="mailto:x@y.ir">m</a> <a data-crm-notrack href="https://b.ir/">b</a></body>'
    )
    mid = str(uuid.uuid4())
    out = tracking.track(r, html, mid)
    (click,) = re.findall(r'href="(https://crm\.test/v1/t/c/[^"]+)"', out)
    token = click.rsplit("/", 1)[1]
    assert Signer(tracking.settings(r).secret, "click").open(token) == [mid, "https://a.ir/p?q=1&r=2"]
    assert f"href='{unsubscribe}'" in out and 'href="mailto:x@y.ir"' in out and 'href="https://b.ir/"' in out
    pixel = re.search(r'<img src="https://crm\.test/v1/t/o/([^"]+)"', out)
    assert pixel and out.index(pixel.group(0)) < out.index("</body>")
    assert Signer(tracking.settings(r).secret, "open").open(pixel.group(1)) == [mid]


def test_the_pixel_answers_a_gif_and_records_the_first_open_once(svc, stubs, smtp, sender, http):
    c, ids, got = mailed(svc, stubs, smtp, sender)
    html = got[ids[0]]
    assert "/v1/unsubscribe/" in html and "shop.example.ir" not in html  # the shop link is tracked
    pixel = re.search(r'<img src="([^"]+/v1/t/o/[^"]+)"', html).group(1)
    first = http.get(path_of(pixel))
    assert first.status_code == 200 and first.mimetype == "image/gif" and first.data == tracking.GIF
    assert "no-store" in first.headers["Cache-Control"]
    row = message_row(svc, c, ids[0])
    assert row.open_count == 1 and row.opened_time is not None
    assert http.get(path_of(pixel)).data == tracking.GIF
    again = message_row(svc, c, ids[0])
    assert again.open_count == 2 and again.opened_time == row.opened_time
    listed = stubs[0].ListCampaignMessages(cpb.ListCampaignMessagesRequest(parent=c.name), metadata=MARKETER)
    shown = {m.customer: m for m in listed.messages}[f"customers/{ids[0]}"]  # as docs/tracking.md says
    assert shown.open_count == 2 and shown.HasField("opened_time")
    opened = [e for e in events(svc, "message.opened.v1", ev.MessageEvent) if e.campaign == c.name]
    assert [e.customer for e in opened] == [f"customers/{ids[0]}"]
    # a bad token: the same GIF, nothing recorded
    bad = http.get("/v1/t/o/" + pixel.rsplit("/", 1)[1][:-3] + "AAA")
    assert bad.status_code == 200 and bad.data == tracking.GIF
    assert message_row(svc, c, ids[0]).open_count == 2


def test_a_click_redirects_to_the_signed_url_and_a_forged_one_never_does(svc, stubs, smtp, sender, http):
    c, ids, got = mailed(svc, stubs, smtp, sender)
    link = re.search(r'href="([^"]+/v1/t/c/[^"]+)"', got[ids[0]]).group(1)
    resp = http.get(path_of(link))
    assert resp.status_code == 302
    target = urlsplit(resp.headers["Location"])
    query = parse_qs(target.query)
    assert (target.netloc, target.path, query["x"], query["y"]) == ("shop.example.ir", "/autumn", ["1"], ["2"])
    assert query["utm_campaign"] == [c.name.split("/")[1]] and query["utm_medium"] == ["email"]
    assert "crm_t" in query  # the visit token the site hands back (test_clickstream)
    row = message_row(svc, c, ids[0])
    assert row.click_count == 1 and row.clicked_time is not None
    (clicked,) = [e for e in events(svc, "message.clicked.v1", ev.MessageEvent) if e.campaign == c.name]
    assert clicked.url == SHOP and clicked.customer == f"customers/{ids[0]}"

    token = link.rsplit("/", 1)[1]
    body, _, sig = token.partition(".")
    forged = Signer(b"not our secret", "click").sign(str(row.id), "https://evil.example/")
    for bad in (forged, body + "." + sig[::-1], tracking._signer(rt(svc), "open").sign(str(row.id))):
        resp = http.get(f"/v1/t/c/{bad}")
        assert resp.status_code == 401 and "Location" not in resp.headers
    # even our own signature over a non-http target is no redirect
    js = tracking._signer(rt(svc), "click").sign(str(row.id), "javascript:alert(1)")
    assert http.get(f"/v1/t/c/{js}").status_code == 401
    assert message_row(svc, c, ids[0]).click_count == 1


SCANNER = {"User-Agent": "Mozilla/5.0 (compatible; Barracuda Sentinel; +http://www.barracuda.com)"}
BROWSER = {
    "User-Agent": "Mozilla/5.0 (Linux; Android 13; CUBOT X70) AppleWebKit/537.36 Chrome/120 Mobile Safari/537.36"
}
GMAIL_PROXY = {
    "User-Agent": "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
}


def test_machine_agents_are_told_from_readers():
    machines = [
        SCANNER["User-Agent"],
        "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/120.0 Safari/537.36",
        "Microsoft Office SafeLinks/1.0",
        "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)",
        "WhatsApp/2.23.20.0",
        "Proofpoint URL Defense",
    ]
    readers = [
        BROWSER["User-Agent"],
        GMAIL_PROXY["User-Agent"],
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36",
        "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17029; Pro)",
        "",  # a direct gRPC caller: not judged
    ]
    assert [a for a in machines if not tracking.machine_agent(a)] == []
    assert [a for a in readers if tracking.machine_agent(a)] == []


def test_link_scanners_and_prefetchers_are_counted_apart_from_readers(svc, stubs, smtp, sender, http):
    api, _, _ = stubs
    c, ids, got = mailed(svc, stubs, smtp, sender)
    link = path_of(re.search(r'href="([^"]+/v1/t/c/[^"]+)"', got[ids[0]]).group(1))
    pixel = path_of(re.search(r'<img src="([^"]+/v1/t/o/[^"]+)"', got[ids[0]]).group(1))
    # A mail gateway's scanner follows the link and fetches the pixel: still redirected (with no
    # visit token) and answered, but neither a click nor an open, and no event.
    resp = http.get(link, headers=SCANNER)
    assert resp.status_code == 302 and resp.headers["Location"].startswith("https://shop.example.ir/autumn")
    assert "crm_t" not in resp.headers["Location"]
    assert http.get(pixel, headers=SCANNER).data == tracking.GIF
    r = message_row(svc, c, ids[0])
    assert (r.click_count, r.clicked_time, r.open_count, r.opened_time) == (0, None, 0, None)
    assert (r.machine_click_count, r.machine_open_count) == (1, 1)
    # The reader, on a phone whose maker's name ends in "bot", and Gmail's image proxy: counted.
    assert "crm_t" in http.get(link, headers=BROWSER).headers["Location"]
    assert http.get(pixel, headers=GMAIL_PROXY).data == tracking.GIF
    r = message_row(svc, c, ids[0])
    assert (r.click_count, r.open_count, r.machine_click_count, r.machine_open_count) == (1, 1, 1, 1)
    clicked = [e for e in events(svc, "message.clicked.v1", ev.MessageEvent) if e.campaign == c.name]
    assert len(clicked) == 1
    # A click sooner after the send than TRACKING_MACHINE_CLICK_SECONDS is a scanner's on arrival.
    r_ = rt(svc)
    before = tracking.settings(r_)
    r_.extra["tracking.settings"] = dataclasses.replace(before, machine_click_seconds=3600)
    try:
        assert http.get(link, headers=BROWSER).status_code == 302
    finally:
        r_.extra["tracking.settings"] = before
    r = message_row(svc, c, ids[0])
    assert (r.click_count, r.machine_click_count) == (1, 2)
    total = api.GetCampaignStats(cpb.GetCampaignStatsRequest(name=c.name), metadata=MARKETER).total
    assert (total.clicked, total.opened, total.machine_clicks, total.machine_opens) == (1, 1, 2, 1)


def dsn(message_id_header: str, recipient: str, status: str = "5.1.1", action: str = "failed") -> bytes:
    return (
        "From: MAILER-DAEMON@mx.example.ir\r\n"
        "To: news@crm.test\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b1"\r\n'
        "\r\n"
        "--b1\r\n"
        "Content-Type: text/plain\r\n\r\n"
        "Your message could not be delivered.\r\n"
        "--b1\r\n"
        "Content-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.example.ir\r\n"
        "\r\n"
        f"Original-Recipient: rfc822;{recipient}\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\n"
        f"Action: {action}\r\n"
        f"Status: {status}\r\n"
        "Diagnostic-Code: smtp; 550 5.1.1 user unknown\r\n"
        "--b1\r\n"
        "Content-Type: text/rfc822-headers\r\n\r\n"
        f"Message-ID: {message_id_header}\r\n"
        f"To: {recipient}\r\n"
        "Subject: x\r\n"
        "--b1--\r\n"
    ).encode()


def test_a_dsn_hard_bounce_marks_the_message_and_suppresses_the_address_for_the_next_run(
    svc, stubs, smtp, sender, http
):
    c, ids, _ = mailed(svc, stubs, smtp, sender, n=2)
    row = message_row(svc, c, ids[0])
    assert row.provider_message_id == f"<cmp-{row.id}@crm.test>"
    address = f"{ids[0]}@example.ir"
    assert http.post("/v1/bounces:post", data=dsn(row.provider_message_id, address)).status_code == 401  # no key
    resp = http.post("/v1/bounces:post", data=dsn(row.provider_message_id, address), headers=KEY)
    assert resp.status_code == 200, resp.json
    assert resp.json == {
        "message": f"{c.name}/messages/{row.id}",
        "bounceKind": "hard",
        "status": "5.1.1",
        "recipient": address,
        "suppressed": True,
    }
    bounced = message_row(svc, c, ids[0])
    assert (bounced.state, bounced.bounce_kind) == ("bounced", "hard") and "5.1.1" in bounced.error
    with svc.ctx.engine.connect() as conn:
        sup = conn.execute(sa.select(suppressions).where(suppressions.c.address == address)).one()
    assert (sup.reason, sup.detail) == ("hard_bounce", "5.1.1")
    again = http.post("/v1/bounces:post", data=dsn(row.provider_message_id, address), headers=KEY)  # redelivered
    assert again.json.get("suppressed") is None
    got = [e for e in events(svc, "message.bounced.v1", ev.MessageEvent) if e.campaign == c.name]
    assert [(e.customer, e.bounce_kind) for e in got] == [(f"customers/{ids[0]}", "hard")]
    # a "delayed" report is no bounce
    other = message_row(svc, c, ids[1])
    late = http.post(
        "/v1/bounces:post", data=dsn(other.provider_message_id, f"{ids[1]}@example.ir", "4.4.7", "delayed"), headers=KEY
    )
    assert late.json.get("bounceKind") is None and message_row(svc, c, ids[1]).state == "sent"
    # a success report (NOTIFY=SUCCESS) is the delivery: once, and never over a bounce
    arrived = dsn(other.provider_message_id, f"{ids[1]}@example.ir", "2.0.0", "delivered")
    ok = http.post("/v1/bounces:post", data=arrived, headers=KEY)
    assert ok.status_code == 200 and ok.json.get("bounceKind") is None, ok.json
    assert ok.json["message"] == f"{c.name}/messages/{other.id}"
    assert message_row(svc, c, ids[1]).state == "delivered" and message_row(svc, c, ids[1]).delivered_time
    http.post("/v1/bounces:post", data=arrived, headers=KEY)  # redelivered
    http.post("/v1/bounces:post", data=dsn(row.provider_message_id, address, "2.0.0", "delivered"), headers=KEY)
    assert message_row(svc, c, ids[0]).state == "bounced"
    got = [e for e in events(svc, "message.delivered.v1", ev.MessageEvent) if e.campaign == c.name]
    assert [e.customer for e in got] == [f"customers/{ids[1]}"]
    # the next campaign to the same people leaves the bounced address out
    segment = c.segment
    again = launched(stubs, svc, campaign(stubs, segment, [cpb.Variant(template=template(stubs, HTML))]))
    states = {r.customer_id: r.state for r in rows_of(svc, again)}
    assert states == {ids[0]: "suppressed", ids[1]: "queued"}
    assert http.post("/v1/bounces:post", data=b"hello", headers=KEY).status_code == 400


def reply(sender: str, text: str, message_id: str, in_reply_to: str = "", extra: str = "") -> bytes:
    head = (
        f"From: =?utf-8?b?2YXYsduM2YU=?= <{sender}>\r\nTo: news@crm.test\r\n"
        "Subject: =?utf-8?b?UmU6INis2LTZhtmI2KfYsdmH?=\r\n"
        f"Message-ID: {message_id}\r\n" + (f"In-Reply-To: {in_reply_to}\r\n" if in_reply_to else "") + extra
    )
    return (head + "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + text).encode()


def test_a_reply_to_a_campaign_mail_is_a_response_once_and_auto_replies_are_not(svc, stubs, smtp, sender, http):
    c, ids, _ = mailed(svc, stubs, smtp, sender, n=2)
    first, second = message_row(svc, c, ids[0]), message_row(svc, c, ids[1])
    body = "سلام، لطفاً با من تماس بگیرید.\r\n\r\nدر تاریخ ۱۲ آذر ۱۴۰۵، خبرنامه نوشت:\r\n> جشنواره پاییز\r\n"
    raw = reply(f"{ids[0]}@example.ir", body, f"<r-{ids[0]}@mail.example.ir>", first.provider_message_id)
    assert http.post("/v1/inboundMail:post", data=raw).status_code == 401  # no provider key
    resp = http.post("/v1/inboundMail:post", data=raw, headers=KEY)
    assert resp.status_code == 200, resp.json
    assert (resp.json["outcome"], resp.json["message"]) == ("reply", f"{c.name}/messages/{first.id}")
    assert http.post("/v1/inboundMail:post", data=raw, headers=KEY).json["response"] == resp.json["response"]
    got = [e for e in events(svc, "response.recorded.v1", ev.ResponseEvent) if e.campaign == c.name]
    assert [(e.kind, e.channel, e.customer, e.text, e.contact_name) for e in got] == [
        ("reply", "email", f"customers/{ids[0]}", "سلام، لطفاً با من تماس بگیرید.", "مریم")
    ]
    assert message_row(svc, c, ids[0]).responded_time is not None
    # An out-of-office answer from the other recipient records nothing.
    auto = reply(
        f"{ids[1]}@example.ir",
        "I am away until Monday.",
        f"<ooo-{ids[1]}@mail.example.ir>",
        second.provider_message_id,
        "Auto-Submitted: auto-replied\r\n",
    )
    assert http.post("/v1/inboundMail:post", data=auto, headers=KEY).json == {"outcome": "auto_reply"}
    # A reply whose client dropped In-Reply-To is matched by its sender's address.
    bare = reply(f"{ids[1]}@example.ir", "Interested.", f"<bare-{ids[1]}@mail.example.ir>")
    assert http.post("/v1/inboundMail:post", data=bare, headers=KEY).json["message"] == f"{c.name}/messages/{second.id}"
    got = [e for e in events(svc, "response.recorded.v1", ev.ResponseEvent) if e.campaign == c.name]
    assert [e.customer for e in got] == [f"customers/{ids[0]}", f"customers/{ids[1]}"]
    # A stranger's mail answers nothing of ours; a returned message is a bounce.
    stranger = reply("someone@else.ir", "hello", "<s-1@else.ir>")
    assert http.post("/v1/inboundMail:post", data=stranger, headers=KEY).json == {"outcome": "unmatched"}
    bounced = http.post(
        "/v1/inboundMail:post", data=dsn(first.provider_message_id, f"{ids[0]}@example.ir"), headers=KEY
    )
    assert (bounced.json["outcome"], bounced.json["bounceKind"]) == ("bounce", "hard")
    assert http.post("/v1/inboundMail:post", data=b"  ", headers=KEY).status_code == 400


def test_a_provider_webhook_bounce_and_an_sms_delivery_receipt(svc, stubs, smtp, sender, http):
    c, ids, _ = mailed(svc, stubs, smtp, sender, n=2)
    hard, soft = (message_row(svc, c, i) for i in ids)
    resp = http.post(
        "/v1/bounces:post",
        json={"provider_message_id": hard.provider_message_id, "recipient": hard.address, "status": "5.7.1",
              "description": "rejected by policy"},
        headers=KEY,
    )  # fmt: skip
    assert resp.json["bounceKind"] == "hard" and resp.json["suppressed"] is True
    resp = http.post(
        "/v1/bounces:post", json={"message_id": str(soft.id), "status": "4.2.2", "kind": "soft"}, headers=KEY
    )
    assert resp.json["bounceKind"] == "soft" and "suppressed" not in resp.json
    assert (message_row(svc, c, ids[1]).state, message_row(svc, c, ids[1]).bounce_kind) == ("bounced", "soft")
    with svc.ctx.engine.connect() as conn:
        held = conn.execute(
            sa.select(suppressions.c.address).where(suppressions.c.address.in_([hard.address, soft.address]))
        )
        assert [a for (a,) in held] == [hard.address]
    bad = http.post("/v1/bounces:post", json={"message_id": "x", "status": "5.1.1"}, headers=KEY)
    assert bad.status_code == 400 and bad.json["errors"][0]["field"] == "message_id"

    # an SMS provider's receipt: delivered (Kavenegar status 10) once
    with svc.ctx.engine.begin() as conn:  # an SMS message as the SMS sender would have left it
        conn.execute(
            messages.update()
            .where(messages.c.id == hard.id)
            .values(state="sent", channel="sms", provider_message_id="kv-77")
        )
    ok = http.post("/v1/deliveryReceipts:post", json={"providerMessageId": "kv-77", "status": "10"}, headers=KEY)
    assert ok.json == {"message": f"{c.name}/messages/{hard.id}", "state": "delivered"}
    http.post("/v1/deliveryReceipts:post", json={"providerMessageId": "kv-77", "status": "10"}, headers=KEY)
    got = [e for e in events(svc, "message.delivered.v1", ev.MessageEvent) if e.campaign == c.name]
    assert len(got) == 1 and message_row(svc, c, ids[0]).delivered_time is not None


def test_a_bounce_report_with_a_nul_byte_is_read_not_internal(svc, http):
    """A NUL in a webhook's JSON strings (\\u0000) or in a DSN reached PostgreSQL (a suppression,
    the message's error): 500 to the provider, which then retries it for ever."""
    resp = http.post("/v1/bounces:post", json={"recipient": "nul\u0000@x.ir", "status": "5.1.1"}, headers=KEY)
    assert resp.status_code == 200 and resp.json["suppressed"] is True, resp.get_data(as_text=True)
    raw = dsn("<cmp-00000000-0000-0000-0000-000000000000@crm.test>", "dsn\x00nul@x.ir")
    resp = http.post("/v1/bounces:post", data=raw, headers=KEY)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    with svc.ctx.engine.connect() as conn:
        got = conn.execute(sa.select(suppressions.c.address).where(suppressions.c.address.like("%nul@x.ir"))).all()
    assert sorted(a for (a,) in got) == ["dsnnul@x.ir", "nul@x.ir"]


def test_the_clickstream_ties_a_visitor_to_a_customer(svc, stubs, tr, smtp, sender, http):
    c, ids, got = mailed(svc, stubs, smtp, sender, n=2)
    page = {"url": "https://shop.example.ir/p/1", "title": "کفش"}
    anon = http.post(
        "/v1/trackingEvents:post", json={"siteKey": "dev-site-key", "visitorId": "visitor-0001", "events": [page, page]}
    )
    assert anon.status_code == 200 and anon.json == {"accepted": 2}
    known = http.post(
        "/v1/trackingEvents:post",
        json={"siteKey": "dev-site-key", "visitorId": "visitor-0001", "identify": {"email": f"{ids[0].upper()}@example.ir"},
              "events": [{"url": "https://shop.example.ir/cart", "kind": "event", "name": "add_to_cart"}]},
    )  # fmt: skip
    assert known.json["customer"] == f"customers/{ids[0]}"
    with svc.ctx.engine.connect() as conn:
        act = conn.execute(sa.select(web_activity).where(web_activity.c.customer_id == ids[0])).one()
    assert (act.page_views, act.event_count, act.last_page) == (
        2,
        1,
        "https://shop.example.ir/p/1",
    )  # the earlier ones too
    v = tr.GetVisitor(pb.GetVisitorRequest(name="visitors/visitor-0001"), metadata=MARKETER)
    assert (v.customer, v.identified_by, v.page_views) == (f"customers/{ids[0]}", "identify", 2)

    # a visitor arriving through a tracked click: the landing page's crm_t ties them
    link = re.search(r'href="([^"]+/v1/t/c/[^"]+)"', got[ids[1]]).group(1)
    crm_t = parse_qs(urlsplit(http.get(path_of(link)).headers["Location"]).query)["crm_t"][0]
    landed = http.post(
        "/v1/trackingEvents:post",
        json={"siteKey": "dev-site-key", "visitorId": "visitor-0002", "clickToken": crm_t, "events": [page]},
    )
    assert landed.json["customer"] == f"customers/{ids[1]}"
    # visitor-0001 says it is the other customer after all: both summaries follow
    http.post(
        "/v1/trackingEvents:post",
        json={"siteKey": "dev-site-key", "visitorId": "visitor-0001", "identify": {"customer": f"customers/{ids[1]}"}},
    )
    assert row(svc, web_activity, customer_id=ids[1]).page_views == 3
    assert row(svc, web_activity, customer_id=ids[0]).page_views == 0

    bad = http.post("/v1/trackingEvents:post", json={"siteKey": "nope", "visitorId": "visitor-0003"})
    assert bad.status_code == 401
    bad = http.post(
        "/v1/trackingEvents:post",
        json={"siteKey": "dev-site-key", "visitorId": "visitor-0003", "events": [{"url": "javascript:x"}]},
    )
    assert bad.status_code == 400 and bad.json["errors"][0]["field"] == "events[0].url"
    assert http.post("/v1/trackingEvents:post", json={"siteKey": "dev-site-key", "visitorId": "x"}).status_code == 400


def test_site_behaviour_is_in_segments_and_goes_to_sales_for_lead_scoring(svc, stubs, http):
    from crm.campaign.v1 import segments_pb2 as spb

    seg_stub = stubs[1]
    (a,) = people(svc, 1)
    vid = f"visitor-{uuid.uuid4().hex[:12]}"

    def post(*hits, **extra):
        body = {"siteKey": "dev-site-key", "visitorId": vid, "events": list(hits), **extra}
        r = http.post("/v1/trackingEvents:post", json=body)
        assert r.status_code == 200, r.json
        return r.json

    def published():
        return [
            e for e in events(svc, "web_activity.recorded.v1", ev.WebActivityEvent) if e.visitor == f"visitors/{vid}"
        ]

    post({"url": "https://shop.example.ir/p/1"}, {"url": "https://shop.example.ir/p/2"})
    assert published() == []  # an anonymous visitor is nobody's behaviour yet
    keen = dynamic(seg_stub, f'customer_id = "{a}" AND web_page_views >= 3 AND web_events >= 1')
    recent = dynamic(seg_stub, f'customer_id = "{a}" AND last_web_visit_time >= now - 1d')
    assert members(seg_stub, keen.name) == set() and members(seg_stub, recent.name) == set()

    post(
        {"url": "https://shop.example.ir/pricing"},
        {"url": "https://shop.example.ir/pricing", "kind": "event", "name": "demo_request"},
        identify={"email": f"{a}@example.ir"},
    )
    got = row(svc, audience, customer_id=a)
    assert (got.web_page_views, got.web_events) == (3, 1) and got.last_web_visit_time is not None
    # the hook moved them into both segments in the visit's transaction
    assert members(seg_stub, keen.name) == {a} and members(seg_stub, recent.name) == {a}
    added = events(svc, "segment.member_added.v1", ev.SegmentMemberEvent)
    assert {(e.segment, e.cause) for e in added if e.customer == f"customers/{a}"} >= {(keen.name, "event")}
    (first,) = published()  # tied now: the two anonymous page views come along
    assert first.customer == f"customers/{a}" and first.email == f"{a}@example.ir"
    assert [h.kind for h in first.hits] == ["page_view", "page_view", "page_view", "event"]
    assert first.hits[-1].name == "demo_request" and len({h.id for h in first.hits}) == 4

    # a junk field beside the one that identifies is left out, not refused (the hits are kept)
    junk = post({"url": "https://shop.example.ir/p/3"}, identify={"customer": f"customers/{a}", "phone": "-"})
    assert junk["customer"] == f"customers/{a}"
    second = published()[-1]
    assert [h.url for h in second.hits] == ["https://shop.example.ir/p/3"]  # only the new hit
    assert second.hits[0].id not in {h.id for h in first.hits}
    preview = seg_stub.PreviewSegment(
        spb.PreviewSegmentRequest(
            segment=spb.Segment(kind=spb.SEGMENT_KIND_DYNAMIC, filter=f'customer_id = "{a}" AND web_page_views = 4')
        ),
        metadata=MARKETER,
    )
    assert preview.member_count == 1
    with pytest.raises(grpc.RpcError) as info:
        seg_stub.PreviewSegment(
            spb.PreviewSegmentRequest(
                segment=spb.Segment(kind=spb.SEGMENT_KIND_DYNAMIC, filter='web_page_views >= "x"')
            ),
            metadata=MARKETER,
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "segment.filter" in info.value.details()


def test_a_response_is_recorded_once_and_published_for_sales(svc, stubs, tr, smtp, sender, http):
    c, ids, _ = mailed(svc, stubs, smtp, sender)
    row = message_row(svc, c, ids[0])
    given = pb.Response(
        message=f"{c.name}/messages/{row.id}", kind="reply", contact_name="سارا  احمدی", phone="09121234567",
        text="لطفاً تماس بگیرید",
    )  # fmt: skip
    first = tr.RecordResponse(pb.RecordResponseRequest(response=given, request_id="r-1"), metadata=MARKETER)
    again = tr.RecordResponse(pb.RecordResponseRequest(response=given, request_id="r-1"), metadata=MARKETER)
    assert first.name == again.name and first.campaign == c.name and first.customer == f"customers/{ids[0]}"
    assert (first.channel, first.phone) == ("email", "+989121234567")
    assert message_row(svc, c, ids[0]).responded_time is not None
    (e,) = [x for x in events(svc, "response.recorded.v1", ev.ResponseEvent) if x.campaign == c.name]
    assert (e.response, e.message, e.kind, e.contact_name) == (first.name, given.message, "reply", "سارا احمدی")
    # the site's form, attributed by the campaign in its UTM
    form = http.post(
        "/v1/trackingEvents:post",
        json={"siteKey": "dev-site-key", "visitorId": "visitor-form1",
              "events": [{"url": "https://shop.example.ir/form", "utmCampaign": c.name.split("/")[1]}],
              "response": {"contactName": "Reza", "email": "reza@example.ir", "text": "call me"}},
    )  # fmt: skip
    assert form.status_code == 200 and form.json["response"].startswith("responses/")
    unknown = http.post(  # a form of no campaign we know: its events are kept, no response
        "/v1/trackingEvents:post",
        json={"siteKey": "dev-site-key", "visitorId": "visitor-form2",
              "events": [{"url": "https://shop.example.ir/form", "utmCampaign": "newsletter-12"}],
              "response": {"contactName": "Ali", "text": "hi"}},
    )  # fmt: skip
    assert unknown.json == {"accepted": 1}
    listed = tr.ListResponses(pb.ListResponsesRequest(campaign=c.name), metadata=MARKETER)
    assert [(r.kind, r.channel) for r in listed.responses] == [("form", "web"), ("reply", "email")]

    def code(call):
        with pytest.raises(grpc.RpcError) as err:
            call()
        return err.value.code(), err.value.details()

    assert code(
        lambda: tr.RecordResponse(pb.RecordResponseRequest(response=pb.Response(kind="reply")), metadata=MARKETER)
    )[0] == (grpc.StatusCode.INVALID_ARGUMENT)
    bad_kind = pb.Response(campaign=c.name, kind="shout")
    assert (
        "response.kind"
        in code(lambda: tr.RecordResponse(pb.RecordResponseRequest(response=bad_kind), metadata=MARKETER))[1]
    )


def test_first_touch_attribution_counts_invoices_whose_lead_came_from_the_campaign(svc, stubs, smtp, sender):
    c, ids, _ = mailed(svc, stubs, smtp, sender)
    cid = c.name.split("/")[1]
    with svc.ctx.engine.begin() as conn:  # the lead of ids[0] came from this campaign; a later invoice, and
        now = conn.execute(sa.select(sa.func.now())).scalar()  # an unpaid one that does not count
        for n, (paid, amount) in enumerate(((now - dt.timedelta(days=90), 3_000_000), (None, 5_000_000))):
            conn.execute(
                audience_invoices.insert().values(
                    invoice_id=f"ft-{cid}-{n}", customer_id=ids[0], kind="invoice", state="paid" if paid else "issued",
                    total=amount, paid_total=amount if paid else 0, currency="IRR", paid_time=paid,
                    order_id=f"ord-ft-{n}", campaign_id=cid, event_time=now,
                )
            )  # fmt: skip
    stats = stubs[0].GetCampaignStats(cpb.GetCampaignStatsRequest(name=c.name), metadata=MARKETER)
    assert (stats.first_touch_orders, stats.first_touch_revenue.units) == (1, 3_000_000)
    assert stats.total.orders == 0  # last touch: paid long before the message


def test_a_merge_moves_web_activity_to_the_survivor_and_an_erasure_forgets_the_visits(svc, http):
    a, b = people(svc, 2)
    for vid, cid in (("visitor-merge-a", a), ("visitor-merge-b", b)):
        http.post(
            "/v1/trackingEvents:post",
            json={"siteKey": "dev-site-key", "visitorId": vid, "identify": {"customer": f"customers/{cid}"},
                  "events": [{"url": f"https://shop.example.ir/{vid}"}]},
        )  # fmt: skip
    deliver(svc, merged_message(customer(a, 2, email=f"{a}@example.ir"), [b]))
    assert row(svc, web_activity, customer_id=b) is None
    assert row(svc, web_activity, customer_id=a).page_views == 2
    assert row(svc, audience, customer_id=a).web_page_views == 2  # what segment filters read
    assert row(svc, visitors, visitor_id="visitor-merge-b").customer_id == a
    deliver(svc, customer_message("customer.erased.v1", cid=a, version=5))
    assert row(svc, web_activity, customer_id=a) is None and row(svc, visitors, visitor_id="visitor-merge-a") is None
    gone = row(svc, audience, customer_id=a)
    assert gone is None or (gone.web_page_views, gone.web_events, gone.last_web_visit_time) == (0, 0, None)
    with svc.ctx.engine.connect() as conn:
        left = conn.execute(sa.select(sa.func.count()).where(page_events.c.visitor_id.like("visitor-merge-%"))).scalar()
    assert left == 0


def test_an_sms_answer_to_a_campaign_is_a_response_once(svc, stubs, smtp, sender, http):
    c, ids, _ = mailed(svc, stubs, smtp, sender)
    with svc.ctx.engine.begin() as conn:  # as the SMS sender would have left it
        conn.execute(
            messages.update()
            .where(messages.c.campaign_id == c.name.split("/")[1])
            .values(channel="sms", address="+989127770000")
        )
    for _ in range(2):  # the provider delivers it twice
        resp = http.post(
            "/v1/sms:inbound",
            json={"key": "dev-sms-key", "fromNumber": "09127770000", "message": "بله، علاقه‌مندم", "messageId": "in-9"},
        )
        assert resp.status_code == 200 and not resp.json.get("stopped")
    got = [e for e in events(svc, "response.recorded.v1", ev.ResponseEvent) if e.campaign == c.name]
    assert [(e.kind, e.channel, e.phone, e.customer) for e in got] == [
        ("sms", "sms", "+989127770000", f"customers/{ids[0]}")
    ]


def test_sms_links_are_short_links_that_track_the_click(svc, stubs, sender, http):
    api, _, tpl = stubs
    r = rt(svc)
    texts: list[str] = []
    before = r.senders.get("sms")
    r.senders["sms"] = lambda out: texts.append(out.text) or f"sms-{len(texts)}"  # the provider's side
    try:
        ids = people(svc, 1)
        t = tpl.CreateTemplate(
            templates_pb2.CreateTemplateRequest(
                template=templates_pb2.Template(
                    display_name="sms", channel="sms", text_body=f"تخفیف پاییز: {SHOP}. لغو۱۱"
                )
            ),
            metadata=MARKETER,
        )
        c = cpb.Campaign(
            display_name="پیامک",
            channel="sms",
            segment=segment_of(stubs, ids),
            variants=[cpb.Variant(template=t.name)],
            quiet_start_hour=0,
            quiet_end_hour=0,
        )
        c = launched(stubs, svc, api.CreateCampaign(cpb.CreateCampaignRequest(campaign=c), metadata=MARKETER))
        assert sender.run_once() == 1
    finally:
        r.senders["sms"] = before
    (text,) = texts
    code = re.fullmatch(r"تخفیف پاییز: https://crm\.test/s/([A-Za-z0-9_-]{10})\. لغو۱۱", text).group(1)
    assert code == tracking.short_code(r, str(message_row(svc, c, ids[0]).id), SHOP)  # stable: a retry re-writes it
    resp = http.get(f"/s/{code}", headers=BROWSER)
    assert resp.status_code == 302
    target = urlsplit(resp.headers["Location"])
    assert (target.netloc, target.path, parse_qs(target.query)["utm_medium"]) == ("shop.example.ir", "/autumn", ["sms"])
    assert message_row(svc, c, ids[0]).click_count == 1
    (clicked,) = [e for e in events(svc, "message.clicked.v1", ev.MessageEvent) if e.campaign == c.name]
    assert clicked.url == SHOP
    for bad in ("AAAAAAAAAA", "short", "AAAA%3DAAAAA"):
        assert http.get(f"/s/{bad}").status_code == 404
    # Bot messages have room for the signed click link.
    assert tracking.track_text(r, None, f"see {SHOP}!", "m-1").startswith(f"see {BASE}/v1/t/c/")
    # An erasure takes the customer's short links (a target may carry what the template put in it).
    deliver(svc, customer_message("customer.erased.v1", cid=ids[0], version=5))
    assert http.get(f"/s/{code}").status_code == 404


def test_parse_dsn_reads_a_returned_message_and_tells_soft_from_hard():
    mid = str(uuid.uuid4())
    raw = dsn(f"<cmp-{mid}@crm.test>", "a@b.ir", "4.2.2").replace(
        b"Content-Type: text/rfc822-headers\r\n\r\n", b"Content-Type: message/rfc822\r\n\r\n"
    )
    b = tracking.parse_dsn(raw.replace(b"Subject: x\r\n", b"Subject: x\r\n\r\nthe body\r\n"))
    assert (b.message_id, b.kind, b.status, b.recipient) == (mid, "soft", "4.2.2", "a@b.ir")
    assert tracking.parse_dsn(dsn("<x@elsewhere>", "a@b.ir")).kind == "hard"
    assert tracking.parse_dsn(dsn("<x@elsewhere>", "a@b.ir", "2.0.0", "delivered")).kind == ""
    assert tracking.parse_dsn(b"Subject: hi\r\n\r\nnot a report") is None
