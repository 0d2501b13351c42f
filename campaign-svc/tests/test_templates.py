"""TemplateService over real gRPC on a fresh database: templates with etags and update masks,
immutable versions, validation at save time (syntax errors with their line, unknown
variables), rendering for an audience customer with fallbacks and Persian letters, render
errors naming the field and the variable, previews, and SendTestMessage through the real
senders: e-mail to an aiosmtpd server, SMS to the Kavenegar-style stub, Telegram to the Bot API
stub (and what an outage or a bad number answers)."""

from __future__ import annotations

import datetime as dt
import email
import email.policy

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2, struct_pb2

from campaign_svc.__main__ import SPEC
from campaign_svc.tables import audience
from crm.campaign.v1 import templates_pb2 as pb
from crm.campaign.v1 import templates_pb2_grpc
from crm_chassis.errors import read_rpc_error
from tests.support.bot_api_stub import BotApiStub
from tests.support.harness import assert_problem, channel, md, start_service, token
from tests.support.sms_stub import SmsStub
from tests.support.smtp_capture import SmtpCapture

MARKETER = md("marketer", "mina")
OTHER = md("marketer", "omid")
TG_TOKEN = "4242:TG-campaigns"

HTML = """<html><head><style>h1 { color: #1a5276; } .note { font-size: 12px; }
@media (max-width: 600px) { h1 { font-size: 18px; } }</style></head>
<body><h1>{{ customer.display_name }} عزیز</h1>
<p>مشتری {{ customer.rank | default("ویژه") }} ما در {{ customer.city | default("ایران") }}،
آخرین خرید شما: {{ customer.last_purchase_date | default("—") }}</p>
<p class="note"><a href="{{ unsubscribe_url }}">لغو اشتراک</a></p></body></html>"""


@pytest.fixture(scope="module")
def servers():
    with (
        SmtpCapture() as smtp,
        SmsStub(api_key="KAVE", bad_numbers={"09350000000"}) as sms,
        BotApiStub(token=TG_TOKEN) as bot,
    ):
        yield smtp, sms, bot


@pytest.fixture(scope="module")
def svc(databases, broker, servers):
    smtp, sms, bot = servers
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SMTP_PORT", str(smtp.port))
        mp.setenv("SMTP_FROM", "news@crm.test")
        mp.setenv("MAIL_DOMAIN", "crm.test")
        mp.setenv("SMS_PROVIDER", "kavenegar")
        mp.setenv("SMS_API_KEY", "KAVE")
        mp.setenv("SMS_SENDER", "10004346")
        mp.setenv("KAVENEGAR_API_BASE", sms.url)
        mp.setenv("TELEGRAM_BOT_TOKEN", TG_TOKEN)
        mp.setenv("TELEGRAM_API_BASE", bot.url)
        mp.delenv("BALE_BOT_TOKEN", raising=False)
        service = start_service(SPEC, databases.fresh("test_templates"), broker.url, relay=False)
    with service.ctx.engine.begin() as conn:
        for values in (
            {
                "customer_id": "cust-sara",
                "display_name": "سارا كريمي",  # typed on an Arabic keyboard (ي, ك)
                "email": "sara@example.ir",
                "mobile": "+989121234567",
                "city": "اصفهان",
                "rank": "طلایی",
                "order_count": 4,
                "revenue": 25_000_000,
                "last_purchase_time": dt.datetime(2026, 11, 20, 10, 0, tzinfo=dt.UTC),
            },
            {"customer_id": "cust-bare", "display_name": "نیما"},
            {"customer_id": "cust-old", "display_name": "سارا (قدیمی)", "merged_into": "cust-sara", "deleted": True},
            {"customer_id": "cust-erased", "display_name": "", "deleted": True},
        ):
            conn.execute(audience.insert().values(**values))
    yield service
    service.stop(0)


@pytest.fixture(scope="module")
def api(svc):
    with channel(svc) as ch:
        yield templates_pb2_grpc.TemplateServiceStub(ch)


def problem(call, *args, **kw):
    with pytest.raises(grpc.RpcError) as info:
        call(*args, metadata=kw.pop("metadata", MARKETER), timeout=10, **kw)
    return read_rpc_error(info.value)


def email_template(api, **kw) -> pb.Template:
    t = pb.Template(
        display_name=kw.pop("display_name", "جشنواره پاییز"),
        channel="email",
        subject=kw.pop("subject", "{{ customer.display_name }}، پیشنهاد ویژه پاییز"),
        html_body=kw.pop("html_body", HTML),
        **kw,
    )
    return api.CreateTemplate(pb.CreateTemplateRequest(template=t), metadata=MARKETER, timeout=10)


def mask(*paths):
    return field_mask_pb2.FieldMask(paths=list(paths))


# --- the resource -------------------------------------------------------------------------------
def test_create_get_list_with_defaults(api):
    t = email_template(api)
    assert t.name.startswith("templates/") and t.version == 1 and t.etag == '"1"'
    assert (t.language, t.direction, t.creator) == ("fa", "rtl", "mina")
    assert api.GetTemplate(pb.GetTemplateRequest(name=t.name), metadata=MARKETER, timeout=10) == t
    sms = api.CreateTemplate(
        pb.CreateTemplateRequest(
            template=pb.Template(
                display_name="SMS", channel="sms", text_body="{{ customer.display_name }} hi", language="en"
            )
        ),
        metadata=MARKETER,
        timeout=10,
    )
    assert sms.direction == "ltr"
    page = api.ListTemplates(pb.ListTemplatesRequest(filter='channel = "sms"'), metadata=MARKETER, timeout=10)
    assert [x.name for x in page.templates] == [sms.name]
    first = api.ListTemplates(pb.ListTemplatesRequest(page_size=1), metadata=MARKETER, timeout=10)
    assert first.next_page_token
    rest = api.ListTemplates(
        pb.ListTemplatesRequest(page_size=1, page_token=first.next_page_token), metadata=MARKETER, timeout=10
    )
    assert rest.templates[0].name != first.templates[0].name


def test_a_retried_create_returns_the_first_and_another_caller_may_not_reuse_the_key(api):
    req = pb.CreateTemplateRequest(
        template=pb.Template(display_name="Bot", channel="telegram", text_body="سلام {{ customer.display_name }}"),
        request_id="req-template-1",
    )
    a = api.CreateTemplate(req, metadata=MARKETER, timeout=10)
    assert api.CreateTemplate(req, metadata=MARKETER, timeout=10).name == a.name
    assert problem(api.CreateTemplate, req, metadata=OTHER).code == grpc.StatusCode.ALREADY_EXISTS


def test_every_content_change_is_a_new_immutable_version(api):
    t = email_template(api, display_name="v-test")
    v2 = api.UpdateTemplate(
        pb.UpdateTemplateRequest(
            template=pb.Template(name=t.name, etag=t.etag, subject="نسخه دوم {{ customer.display_name }}"),
            update_mask=mask("subject"),
        ),
        metadata=MARKETER,
        timeout=10,
    )
    assert (v2.version, v2.subject) == (2, "نسخه دوم {{ customer.display_name }}")
    renamed = api.UpdateTemplate(
        pb.UpdateTemplateRequest(
            template=pb.Template(name=t.name, display_name="renamed"), update_mask=mask("display_name")
        ),
        metadata=MARKETER,
        timeout=10,
    )
    assert renamed.version == 2 and renamed.etag != v2.etag  # a rename is no new content
    # a stale etag is ABORTED
    err = problem(
        api.UpdateTemplate,
        pb.UpdateTemplateRequest(
            template=pb.Template(name=t.name, etag=t.etag, subject="x"), update_mask=mask("subject")
        ),
    )
    assert err.code == grpc.StatusCode.ABORTED
    one = api.GetTemplateVersion(
        pb.GetTemplateVersionRequest(name=f"{t.name}/versions/1"), metadata=MARKETER, timeout=10
    )
    assert one.subject == t.subject and one.html_body == HTML and one.creator == "mina"
    versions = api.ListTemplateVersions(pb.ListTemplateVersionsRequest(parent=t.name), metadata=MARKETER, timeout=10)
    assert [v.version for v in versions.versions] == [2, 1]
    # rendering a pinned version renders that content
    r1 = api.RenderTemplate(pb.RenderTemplateRequest(name=t.name, version=1), metadata=MARKETER, timeout=10)
    r2 = api.RenderTemplate(pb.RenderTemplateRequest(name=t.name), metadata=MARKETER, timeout=10)
    assert r1.version == 1 and r1.subject.endswith("پیشنهاد ویژه پاییز")
    assert r2.version == 2 and r2.subject.startswith("نسخه دوم")
    # a deleted template is gone, its versions stay (campaigns pinned them)
    api.DeleteTemplate(pb.DeleteTemplateRequest(name=t.name, etag=renamed.etag), metadata=MARKETER, timeout=10)
    assert problem(api.GetTemplate, pb.GetTemplateRequest(name=t.name)).code == grpc.StatusCode.NOT_FOUND
    kept = api.GetTemplateVersion(
        pb.GetTemplateVersionRequest(name=f"{t.name}/versions/2"), metadata=MARKETER, timeout=10
    )
    assert kept.version == 2
    assert (
        problem(api.GetTemplateVersion, pb.GetTemplateVersionRequest(name=f"{t.name}/versions/9")).code
        == grpc.StatusCode.NOT_FOUND
    )


def field_errors(err) -> dict[str, str]:
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT, err
    return {v.field: v.description for v in err.field_violations}


def test_bad_templates_are_refused_at_save_time_naming_field_and_line(api):
    create = api.CreateTemplate
    bad = field_errors(
        problem(
            create,
            pb.CreateTemplateRequest(
                template=pb.Template(
                    display_name="broken",
                    channel="email",
                    subject="سلام {{ customer.display_name }",
                    html_body="<p>\n{% if customer.city %}\n{{ customer.shoe_size }}\n",
                )
            ),
        )
    )
    assert bad["template.subject"].startswith("line 1: ")
    assert bad["template.html_body"].startswith("line 3: Unexpected end of template")
    unknown = field_errors(
        problem(
            create,
            pb.CreateTemplateRequest(
                template=pb.Template(
                    display_name="x",
                    channel="email",
                    subject="s",
                    html_body="<p>a</p>\n<p>{{ customer.shoe_size }}</p>",
                )
            ),
        )
    )
    assert unknown["template.html_body"].startswith("line 2: unknown variable 'customer.shoe_size'")
    internals = field_errors(
        problem(
            create,
            pb.CreateTemplateRequest(
                template=pb.Template(display_name="x", channel="sms", text_body="{{ customer.__class__ }}")
            ),
        )
    )
    assert "not allowed" in internals["template.text_body"]
    calls = field_errors(
        problem(
            create,
            pb.CreateTemplateRequest(
                template=pb.Template(display_name="x", channel="sms", text_body="{{ customer.display_name.upper() }}")
            ),
        )
    )
    assert "calls are not allowed" in calls["template.text_body"]
    channel_rules = field_errors(
        problem(
            create,
            pb.CreateTemplateRequest(
                template=pb.Template(display_name="x", channel="sms", subject="s", html_body="<p>")
            ),
        )
    )
    assert set(channel_rules) == {"template.subject", "template.html_body", "template.text_body"}
    nul = field_errors(
        problem(
            create, pb.CreateTemplateRequest(template=pb.Template(display_name="x", channel="sms", text_body="a\x00b"))
        )
    )
    assert nul == {"template.text_body": "must not contain NUL characters (U+0000)"}  # the chassis' check
    assert set(field_errors(problem(create, pb.CreateTemplateRequest(template=pb.Template(display_name="x"))))) == {
        "template.channel"
    }
    t = email_template(api, display_name="immutable channel")
    err = problem(
        api.UpdateTemplate,
        pb.UpdateTemplateRequest(template=pb.Template(name=t.name, channel="sms"), update_mask=mask("channel")),
    )
    assert "update_mask" in field_errors(err)


# --- rendering ------------------------------------------------------------------------------------
def test_render_for_a_customer_with_fallbacks_persian_letters_and_jalali_dates(api):
    t = email_template(api, display_name="render")
    r = api.RenderTemplate(
        pb.RenderTemplateRequest(name=t.name, customer="customers/cust-sara"), metadata=MARKETER, timeout=10
    )
    assert r.subject == "سارا کریمی، پیشنهاد ویژه پاییز"  # Persian ی and ک
    assert '<html dir="rtl" lang="fa">' in r.html
    assert "<style>@media (max-width: 600px) { h1 { font-size: 18px; } }" in r.html  # only @media stays
    assert "color: #1a5276; }" not in r.html
    assert 'style="color: #1a5276;"' in r.html and 'class="note" style="font-size: 12px;"' in r.html
    assert "مشتری طلایی ما در اصفهان" in r.html
    assert "۱۴۰۵/۰۸/۲۹" in r.html  # 2026-11-20 in the Jalali calendar, Persian digits
    assert "سارا کریمی عزیز" in r.text and "<" not in r.text
    bare = api.RenderTemplate(
        pb.RenderTemplateRequest(name=t.name, customer="customers/cust-bare"), metadata=MARKETER, timeout=10
    )
    assert "مشتری ویژه ما در ایران" in bare.html and "آخرین خرید شما: —" in bare.html
    merged = api.RenderTemplate(
        pb.RenderTemplateRequest(name=t.name, customer="customers/cust-old"), metadata=MARKETER, timeout=10
    )
    assert merged.html == r.html  # a merged customer renders as the survivor
    for gone in ("customers/nobody", "customers/cust-erased"):
        assert problem(api.RenderTemplate, pb.RenderTemplateRequest(name=t.name, customer=gone)).code == (
            grpc.StatusCode.NOT_FOUND
        )


def test_a_template_that_fails_to_render_names_the_variable(api, servers):
    smtp, _, _ = servers
    t = email_template(
        api, display_name="strict", html_body="<p>{{ customer.display_name }} از {{ customer.city }}</p>"
    )
    err = problem(api.RenderTemplate, pb.RenderTemplateRequest(name=t.name, customer="customers/cust-bare"))
    assert field_errors(err) == {
        "template.html_body": "undefined variable 'customer.city': it has no value for this recipient; "
        'give a fallback: {{ customer.city | default("…") }}'
    }
    before = smtp.count
    err = problem(
        api.SendTestMessage,
        pb.SendTestMessageRequest(name=t.name, address="mina@crm.test", customer="customers/cust-bare"),
    )
    assert "undefined variable 'customer.city'" in field_errors(err)["template.html_body"]
    assert smtp.count == before  # nothing was sent


def test_preview_of_an_unsaved_template_with_sample_values(api):
    sample = struct_pb2.Struct()
    sample.update({"customer": {"given_name": "رضا", "points": 1500}})
    r = api.PreviewTemplate(
        pb.PreviewTemplateRequest(
            template=pb.Template(
                channel="sms", text_body="{{ customer.given_name }} جان، {{ customer.points }} امتیاز دارید"
            ),
            sample=sample,
        ),
        metadata=MARKETER,
        timeout=10,
    )
    assert (r.channel, r.text, r.html, r.version) == ("sms", "رضا جان، 1500 امتیاز دارید", "", 0)
    default = api.PreviewTemplate(
        pb.PreviewTemplateRequest(
            template=pb.Template(channel="email", subject="{{ customer.given_name }}", html_body="<b>x</b>")
        ),
        metadata=MARKETER,
        timeout=10,
    )
    assert default.subject == "سارا" and "<b>x</b>" in default.html and default.text == "x"
    err = problem(
        api.PreviewTemplate, pb.PreviewTemplateRequest(template=pb.Template(channel="sms", text_body="{{ x }}"))
    )
    assert "unknown variable 'x'" in field_errors(err)["template.text_body"]


def test_a_filter_asked_for_unbounded_work_is_refused_naming_the_field(api):
    """center(999999999) built a gigabyte on the server (the client saw RESOURCE_EXHAUSTED), a
    loop repeating a long text hundreds of megabytes, truncate(-5) answered INTERNAL."""
    for body in (
        "{{ customer.display_name | center(999999999) }}",
        "{% for a in 'x' * 9999 %}{{ 'y' * 9999 }}{% endfor %}",
        "{{ customer.display_name | truncate(-5) }}",
    ):
        err = problem(
            api.PreviewTemplate, pb.PreviewTemplateRequest(template=pb.Template(channel="sms", text_body=body))
        )
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "template.text_body" in field_errors(err), (body, err)


# --- test sends ----------------------------------------------------------------------------------
def test_send_test_email_to_oneself_through_smtp(api, servers):
    smtp, _, _ = servers
    t = email_template(api, display_name="test send")
    before = smtp.count
    got = api.SendTestMessage(
        pb.SendTestMessageRequest(name=t.name, address="Mina@CRM.test", customer="customers/cust-sara"),
        metadata=MARKETER,
        timeout=10,
    )
    assert got.address == "mina@crm.test" and got.provider_message_id.endswith("@crm.test>")
    assert smtp.count == before + 1
    raw = smtp.raw()[-1]
    m = email.message_from_bytes(raw, policy=email.policy.default)
    assert (m["To"], m["From"], m["X-CRM-Test"]) == ("mina@crm.test", "news@crm.test", "1")
    assert m["Subject"] == "سارا کریمی، پیشنهاد ویژه پاییز" and m["Message-ID"] == got.provider_message_id
    text, html = m.iter_parts()
    assert "سارا کریمی عزیز" in text.get_content()
    assert 'dir="rtl"' in html.get_content() and "مشتری طلایی ما در اصفهان" in html.get_content()
    assert (
        problem(api.SendTestMessage, pb.SendTestMessageRequest(name=t.name, address="nope")).field_violations[0].field
        == "address"
    )


def test_a_test_send_to_a_suppressed_address_is_refused(svc, api, servers):
    """Suppression is checked at every send, but a test send went to a hard-bounced (or erased,
    or complained) address all the same."""
    from campaign_svc import consent

    smtp, _, _ = servers
    t = email_template(api, display_name="test send suppressed")
    r = svc.ctx.shared["runtime"]
    with r.uow.begin() as tx:
        consent.suppress(tx, "email", "bounced@crm.test", "hard_bounce", "5.1.1")
    before = smtp.count
    err = problem(api.SendTestMessage, pb.SendTestMessageRequest(name=t.name, address="Bounced@CRM.test"))
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION and err.reason == "ADDRESS_SUPPRESSED", err
    assert smtp.count == before


def test_send_test_sms_and_what_an_outage_or_a_bad_number_answers(api, servers):
    _, sms, _ = servers
    t = api.CreateTemplate(
        pb.CreateTemplateRequest(
            template=pb.Template(
                display_name="sms",
                channel="sms",
                text_body="{{ customer.display_name | default('دوست') }} عزیز، ۲۰٪ تخفیف",
            )
        ),
        metadata=MARKETER,
        timeout=10,
    )
    got = api.SendTestMessage(
        pb.SendTestMessageRequest(name=t.name, address="0912 123 4567"), metadata=MARKETER, timeout=10
    )
    assert got.address == "+989121234567" and got.provider_message_id.isdigit()
    assert sms.sent()[-1]["message"] == "سارا محمدی عزیز، ۲۰٪ تخفیف" and sms.sent()[-1]["receptor"] == "09121234567"
    sms.fail(503)
    err = problem(api.SendTestMessage, pb.SendTestMessageRequest(name=t.name, address="09121234567"))
    assert err.code == grpc.StatusCode.UNAVAILABLE
    err = problem(api.SendTestMessage, pb.SendTestMessageRequest(name=t.name, address="09350000000"))
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION and err.metadata["hard_bounce"] == "true"


def test_send_test_bot_message_and_an_unconfigured_channel(api, servers):
    _, _, bot = servers
    t = api.CreateTemplate(
        pb.CreateTemplateRequest(
            template=pb.Template(display_name="tg", channel="telegram", text_body="سلام {{ customer.display_name }}")
        ),
        metadata=MARKETER,
        timeout=10,
    )
    got = api.SendTestMessage(
        pb.SendTestMessageRequest(name=t.name, address="5551234", customer="customers/cust-sara"),
        metadata=MARKETER,
        timeout=10,
    )
    assert got.provider_message_id.startswith("5551234:")
    assert bot.calls()[-1] == {"chat_id": "5551234", "text": "سلام سارا کریمی"}
    bale = api.CreateTemplate(
        pb.CreateTemplateRequest(template=pb.Template(display_name="bale", channel="bale", text_body="سلام")),
        metadata=MARKETER,
        timeout=10,
    )
    err = problem(api.SendTestMessage, pb.SendTestMessageRequest(name=bale.name, address="5551234"))
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION and err.reason == "CHANNEL_NOT_CONFIGURED"


def test_the_audience_row_is_read_not_customer_svc(svc):
    """The render reads the projection only: a row changed here is what the next render shows."""
    with svc.ctx.engine.begin() as conn:
        conn.execute(sa.update(audience).where(audience.c.customer_id == "cust-bare").values(city="قم"))
    with channel(svc) as ch:
        api = templates_pb2_grpc.TemplateServiceStub(ch)
        t = email_template(
            api,
            display_name="projection",
            html_body="<p>{{ customer.city }}</p>{% if customer.rank %}<i>{{ customer.rank }}</i>{% endif %}",
        )
        r = api.RenderTemplate(
            pb.RenderTemplateRequest(name=t.name, customer="customers/cust-bare"), metadata=MARKETER, timeout=10
        )
    assert "<p>قم</p>" in r.html and "<i>" not in r.html  # no rank: the test is false, no error


# --- over HTTP ------------------------------------------------------------------------------------
@pytest.fixture
def http(svc):
    from tests.support.harness import gateway_client

    client, clients = gateway_client(campaign=f"127.0.0.1:{svc.port}")
    yield client
    clients.close()


def test_templates_over_http_through_the_gateway(http, servers):
    smtp, _, _ = servers
    auth = {"Authorization": f"Bearer {token('marketer', 'mina')}"}
    made = http.post(
        "/v1/templates",
        json={
            "displayName": "http",
            "channel": "email",
            "subject": "سلام",
            "htmlBody": "<p>{{ customer.display_name }}</p>",
        },
        headers=auth,
    )
    assert made.status_code == 201, made.get_data(as_text=True)
    name = made.get_json()["name"]
    assert made.headers["Location"].endswith(f"/v1/{name}")
    r = http.post(f"/v1/{name}:render", json={"customer": "customers/cust-sara"}, headers=auth)
    assert r.status_code == 200 and "سارا کریمی" in r.get_json()["html"]
    bad = http.post(
        "/v1/templates:preview", json={"template": {"channel": "sms", "textBody": "{{ nope }}"}}, headers=auth
    )
    assert "unknown variable 'nope'" in assert_problem(bad, 400, "template.text_body")["errors"][0]["description"]
    before = smtp.count
    sent = http.post(f"/v1/{name}:sendTest", json={"address": "mina@crm.test"}, headers=auth)
    assert sent.status_code == 200 and sent.get_json()["address"] == "mina@crm.test" and smtp.count == before + 1
    versions = http.get(f"/v1/{name}/versions", headers=auth)
    assert [v["version"] for v in versions.get_json()["versions"]] == ["1"]
    assert http.get(f"/v1/{name}").status_code == 401  # no token
