"""The channel senders against real servers on loopback: e-mail to an aiosmtpd server (a
personalised Persian right-to-left mail: inlined styles, dir=rtl, the text part, the encoded
subject, RFC 8058 unsubscribe headers, one reused SMTP session, SMTP refusals as SendError),
SMS through the Kavenegar-style and the generic JSON adapters against tests/support/sms_stub.py
(an outage is retryable, a bad number is not), and bot messages against the Bot API stub."""

from __future__ import annotations

import email
import email.policy
from concurrent.futures import ThreadPoolExecutor

import pytest

from campaign_svc import templates as T
from campaign_svc.channels import BotSender, EmailSender, GenericJsonSms, Kavenegar, SmsSender, sms_provider
from campaign_svc.outgoing import Outgoing, SendError
from crm_chassis import bots
from crm_chassis.config import ConfigError
from crm_chassis.mail import SmtpSettings
from tests.support.bot_api_stub import BotApiStub
from tests.support.harness import free_port
from tests.support.sms_stub import SmsStub
from tests.support.smtp_capture import SmtpCapture

HTML = """<style>
  .box { background-color: #f4f4f4; padding: 16px; }
  h1 { color: #c0392b; font-size: 20px; }
</style>
<div class="box">
  <h1>{{ customer.given_name | default("مشتری گرامی") }}، سلام!</h1>
  <p>خرید بعدی شما در {{ customer.city }} با ۲۰٪ تخفیف.</p>
  <p><a href="{{ unsubscribe_url }}">لغو اشتراک</a></p>
</div>"""

DRAFT = T.Draft(
    channel="email",
    subject="{{ customer.display_name }} عزیز، جشنواره پاییز",
    html_body=HTML,
    text_body="",
    language="fa",
    direction="rtl",
)
UNSUB = "https://crm.example.com/u/abc123"


def persian_values(**customer):
    group = T.Group("customer", {"display_name": "علي رضايي", "city": "شيراز", **customer})
    # the audience row's values go through customer_group's Persian letters in the service;
    # here the raw Arabic forms check that the rendered output is fixed as a whole
    return T.values_of(group, "fa", unsubscribe_url=UNSUB)


@pytest.fixture
def smtp():
    with SmtpCapture() as s:
        yield s


def sender_to(smtp: SmtpCapture, **kw) -> EmailSender:
    return EmailSender(SmtpSettings(port=smtp.port, sender="news@crm.test", domain="crm.test", timeout=5), **kw)


def outgoing(address="reza@example.ir", message_id="m-1", values=None) -> Outgoing:
    r = T.render(DRAFT, values or persian_values())
    return Outgoing(
        channel="email",
        address=address,
        text=r.text,
        subject=r.subject,
        html=r.html,
        message_id=message_id,
        campaign_id="c-1",
        unsubscribe_url=UNSUB,
        unsubscribe_mailto="mailto:unsubscribe+m-1@crm.test?subject=unsubscribe",
    )


def test_a_personalised_persian_rtl_mail_arrives_with_inlined_styles_text_part_and_unsubscribe_headers(smtp):
    s = sender_to(smtp)
    try:
        message_id = s.send(outgoing())
    finally:
        s.close()
    assert message_id == "<cmp-m-1@crm.test>"
    [raw] = smtp.raw()
    [(mail_from, rcpts)] = smtp.envelopes()
    assert (mail_from, rcpts) == ("news@crm.test", ["reza@example.ir"])
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii")  # the header is 7-bit: the subject is encoded
    assert "Subject: =?utf-8?" in head
    m = email.message_from_bytes(raw, policy=email.policy.default)
    assert m["Subject"] == "علی رضایی عزیز، جشنواره پاییز"  # Arabic Yeh (ي) shown as Persian ی
    assert m["Message-ID"] == "<cmp-m-1@crm.test>"
    assert m["List-Unsubscribe"] == f"<mailto:unsubscribe+m-1@crm.test?subject=unsubscribe>, <{UNSUB}>"
    assert m["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert m.get_content_type() == "multipart/alternative"
    text_part, html_part = m.iter_parts()
    assert text_part.get_content_type() == "text/plain" and html_part.get_content_type() == "text/html"
    html = html_part.get_content()
    assert '<html dir="rtl" lang="fa">' in html
    assert "<style" not in html  # inlined, not left in a <style> block clients drop
    assert 'style="color: #c0392b;font-size: 20px;"' in html.replace("; ", ";")
    assert 'class="box" style="background-color: #f4f4f4;padding: 16px;"' in html.replace("; ", ";")
    assert "مشتری گرامی، سلام!" in html  # no given name: the fallback
    assert "شیراز" in html and "شيراز" not in html
    text = text_part.get_content()
    assert "مشتری گرامی، سلام!" in text and "شیراز" in text
    assert f"لغو اشتراک ({UNSUB})" in text
    assert "<" not in text and "color" not in text


def test_one_smtp_session_carries_many_messages_and_a_dropped_one_is_reopened():
    port = free_port()
    smtp = SmtpCapture(port=port).start()
    s = EmailSender(SmtpSettings(port=port, domain="crm.test", timeout=5), connections=1)
    try:
        for i in range(5):
            s.send(outgoing(address=f"r{i}@example.ir", message_id=f"m-{i}"))
        assert (smtp.count, smtp.sessions) == (5, 1)
        smtp.stop()  # the server goes away and comes back: the pooled session is stale
        smtp = SmtpCapture(port=port).start()
        s.send(outgoing(message_id="m-after"))
        assert (smtp.count, smtp.sessions) == (1, 1)
        assert smtp.messages()[0]["Message-ID"] == "<cmp-m-after@crm.test>"
    finally:
        s.close()
        smtp.stop()


def test_threads_share_the_pool_without_opening_more_sessions_than_its_size(smtp):
    s = sender_to(smtp, connections=3)
    try:
        with ThreadPoolExecutor(8) as pool:
            ids = list(
                pool.map(lambda i: s.send(outgoing(address=f"r{i}@example.ir", message_id=f"p-{i}")), range(200))
            )
    finally:
        s.close()
    assert len(set(ids)) == 200 and smtp.count == 200
    assert 1 <= smtp.sessions <= 3
    assert sorted(r for _, rs in smtp.envelopes() for r in rs) == sorted(f"r{i}@example.ir" for i in range(200))


def test_smtp_refusals_become_send_errors(smtp):
    s = sender_to(smtp, connections=1)
    smtp.refuse_rcpt["gone@example.ir"] = "550 5.1.1 <gone@example.ir>: no such user"
    smtp.refuse_rcpt["full@example.ir"] = "452 4.2.2 mailbox full"
    try:
        with pytest.raises(SendError) as err:
            s.send(outgoing(address="gone@example.ir"))
        assert (err.value.retryable, err.value.hard_bounce, err.value.code) == (False, True, "smtp_550")
        with pytest.raises(SendError) as err:
            s.send(outgoing(address="full@example.ir"))
        assert (err.value.retryable, err.value.hard_bounce) == (True, False)
        smtp.refuse_data = "554 5.7.1 message refused as spam"
        with pytest.raises(SendError) as err:
            s.send(outgoing())
        assert (err.value.retryable, err.value.hard_bounce, err.value.code) == (False, False, "smtp_554")
        smtp.refuse_data = None
        s.send(outgoing())  # the session survived the refusals (RSET)
        assert (smtp.count, smtp.sessions) == (1, 1)
        with pytest.raises(SendError) as err:
            s.send(outgoing(address="not an address"))
        assert (err.value.retryable, err.value.code) == (False, "bad_address")
    finally:
        s.close()


def test_an_smtp_server_that_is_down_is_retryable():
    s = EmailSender(SmtpSettings(port=free_port(), timeout=2))
    with pytest.raises(SendError) as err:
        s.send(outgoing())
    assert err.value.retryable and not err.value.hard_bounce and err.value.code == "smtp_connect"


# --- SMS ---------------------------------------------------------------------------------------
@pytest.fixture
def sms():
    with SmsStub(api_key="KAVE-KEY", bad_numbers={"09350000000", "+989350000000"}) as stub:
        yield stub


def sms_out(address: str, text="سلام {name}، کد تخفیف شما: PAIZ", message_id="m-1") -> Outgoing:
    return Outgoing(channel="sms", address=address, text=text, message_id=message_id)


def test_kavenegar_sends_a_persian_sms_and_a_retry_with_the_same_id_is_not_sent_twice(sms):
    s = SmsSender(Kavenegar("KAVE-KEY", "10004346", sms.url, timeout=5))
    first = s.send(sms_out("+98 912 123 4567"))
    again = s.send(sms_out("09121234567"))  # the delivery worker retries after a lost answer
    assert first == again and first.isdigit()
    [sent] = sms.sent()
    assert sent["receptor"] == "09121234567" and sent["sender"] == "10004346" and sent["localid"] == "m-1"
    assert sent["message"] == "سلام {name}، کد تخفیف شما: PAIZ"


def test_kavenegar_outage_is_retryable_and_a_bad_number_is_not(sms):
    s = SmsSender(Kavenegar("KAVE-KEY", "10004346", sms.url, timeout=5))
    sms.fail(502, times=1)
    with pytest.raises(SendError) as err:
        s.send(sms_out("09121234567"))
    assert err.value.retryable and err.value.code == "kavenegar_502"
    assert s.send(sms_out("09121234567"))  # the provider is back
    with pytest.raises(SendError) as err:
        s.send(sms_out("09350000000", message_id="m-2"))
    assert (err.value.retryable, err.value.hard_bounce, err.value.code) == (False, True, "kavenegar_411")
    with pytest.raises(SendError) as err:
        s.send(sms_out("not a number"))
    assert (err.value.retryable, err.value.code) == (False, "bad_address")
    bad_key = SmsSender(Kavenegar("WRONG", "", sms.url, timeout=5))
    with pytest.raises(SendError) as err:  # the account's problem, not the message's: retried
        bad_key.send(sms_out("09121234567", message_id="m-3"))
    assert err.value.retryable and err.value.code == "kavenegar_403"
    assert "WRONG" not in str(err.value)  # the key is in the URL, never in the error


def test_kavenegar_unreachable_is_retryable():
    s = SmsSender(Kavenegar("K", "", f"http://127.0.0.1:{free_port()}", timeout=2))
    with pytest.raises(SendError) as err:
        s.send(sms_out("09121234567"))
    assert err.value.retryable and err.value.code == "unreachable"


def test_the_generic_json_provider_with_configured_field_names(sms):
    sms.generic_fields = {"to": "msisdn", "text": "body", "reference": "client_ref"}
    env = {
        "SMS_PROVIDER": "generic",
        "SMS_API_KEY": "KAVE-KEY",
        "SMS_SENDER": "CRM",
        "SMS_GENERIC_URL": f"{sms.url}/sms",
        "SMS_GENERIC_TO_FIELD": "msisdn",
        "SMS_GENERIC_TEXT_FIELD": "body",
        "SMS_GENERIC_FROM_FIELD": "originator",
        "SMS_GENERIC_REFERENCE_FIELD": "client_ref",
        "SMS_GENERIC_ID_PATH": "data.message_id",
    }
    provider = sms_provider(env)
    assert isinstance(provider, GenericJsonSms)
    s = SmsSender(provider)
    sent_id = s.send(sms_out("09121234567"))
    assert sent_id.startswith("g-")
    [req] = [r for r in sms.received if r.path == "/sms"]
    assert req.fields == {
        "msisdn": "+989121234567",
        "body": sms_out("x").text,
        "originator": "CRM",
        "client_ref": "m-1",
    }
    assert req.headers["Authorization"] == "Bearer KAVE-KEY"
    sms.fail(503)
    with pytest.raises(SendError) as err:
        s.send(sms_out("09121234567"))
    assert err.value.retryable and err.value.code == "http_503"
    with pytest.raises(SendError) as err:
        s.send(sms_out("09350000000"))
    assert (err.value.retryable, err.value.hard_bounce, err.value.code) == (False, True, "http_422")
    wrong = SmsSender(sms_provider({**env, "SMS_API_KEY": "nope"}))
    with pytest.raises(SendError) as err:
        wrong.send(sms_out("09121234567"))
    assert (err.value.retryable, err.value.code) == (False, "http_401")


def test_sms_settings():
    assert sms_provider({}) is None and sms_provider({"SMS_PROVIDER": "none"}) is None
    assert isinstance(sms_provider({"SMS_PROVIDER": "kavenegar", "SMS_API_KEY": "k"}), Kavenegar)
    for env in (
        {"SMS_PROVIDER": "carrier-pigeon"},
        {"SMS_PROVIDER": "kavenegar"},
        {"SMS_PROVIDER": "generic", "SMS_GENERIC_URL": "ftp://x"},
        {"SMS_PROVIDER": "kavenegar", "SMS_API_KEY": "k", "SMS_TIMEOUT_SECONDS": "soon"},
    ):
        with pytest.raises(ConfigError):
            sms_provider(env)


# --- bots --------------------------------------------------------------------------------------
def test_bot_messages_go_to_the_chat_and_failures_are_classified():
    with BotApiStub(token="777:BALE") as stub:
        s = BotSender(bots.BaleBot(stub.url, "777:BALE", timeout=5))
        got = s.send(Outgoing(channel="bale", address="5551001", text="سلام سارا، جشنواره پاییز آغاز شد"))
        [call] = stub.calls()
        assert call == {"chat_id": "5551001", "text": "سلام سارا، جشنواره پاییز آغاز شد"}
        assert got.startswith("5551001:")
        stub.fail(500)
        with pytest.raises(SendError) as err:
            s.send(Outgoing(channel="bale", address="5551001", text="x"))
        assert err.value.retryable and err.value.code == "bot_500"
        stub.fail(403)
        with pytest.raises(SendError) as err:
            s.send(Outgoing(channel="bale", address="5551001", text="x"))
        assert (err.value.retryable, err.value.hard_bounce, err.value.code) == (False, True, "bot_403")
        with pytest.raises(SendError) as err:
            s.send(Outgoing(channel="bale", address="sara@example.ir", text="x"))
        assert err.value.code == "bad_address" and len(stub.calls(ok_only=False)) == 3
