"""E-mail in and out, through real SMTP: mails sent with smtplib to the service's aiosmtpd
mail-in endpoint become tickets and messages (threaded, de-duplicated, fax by mail); agent
replies go out through the durable delivery timer to a local aiosmtpd sink (.eml files)."""

from __future__ import annotations

import base64
import smtplib
import uuid
from email.message import EmailMessage
from email.utils import make_msgid

import pytest
import sqlalchemy as sa

from crm_chassis import timers
from support_svc import customer_projection, mail_parse
from support_svc.__main__ import SPEC
from support_svc.smtp_sink import Sink
from support_svc.tables import attachments, ticket_messages, tickets
from support_svc.ticketing import DELIVER, number_text
from tests.support.customers import customer_message
from tests.support.harness import free_port, start_service, wait_for

from .conftest import add_message, make_team, rt, ticket

FAX_GATEWAY = "fax@faxgate.example"
DOMAIN = "crm.test"


@pytest.fixture(scope="module")
def sink(tmp_path_factory):
    """The outbound SMTP server agent replies go to (not started: the tests start and stop it)."""
    s = Sink(tmp_path_factory.mktemp("sink"), port=free_port())
    yield s
    s.stop()


@pytest.fixture(scope="module")
def svc(request, databases, broker, sink):
    """The service with mail-in on a free port, replies to `sink`, a fax gateway configured."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MAIL_IN_PORT", "0")
        mp.setenv("SMTP_PORT", str(sink.port))
        mp.setenv("SMTP_FROM", f"support@{DOMAIN}")
        mp.setenv("MAIL_DOMAIN", DOMAIN)
        mp.setenv("FAX_GATEWAY_ADDRESSES", f"{FAX_GATEWAY}, @efax.example")
        service = start_service(SPEC, databases.fresh("test_mail"), broker.url, relay=False)
    yield service
    service.stop(0)


def port(svc) -> int:
    return rt(svc).extra["mail_in"].port


def send(svc, raw, sender="sara@example.ir", to=("support@crm.test",)):
    """Send raw bytes (or an EmailMessage) to mail-in; returns the reply of DATA (code, text)."""
    data = crlf(raw) if isinstance(raw, EmailMessage) else raw
    with smtplib.SMTP("127.0.0.1", port(svc), timeout=30) as s:
        s.ehlo()
        code, _ = s.mail(sender)
        assert code == 250
        for r in to:
            assert s.rcpt(r)[0] == 250
        return s.data(data)


def crlf(m: EmailMessage) -> bytes:
    """The message as an SMTP client sends it (CRLF line ends)."""
    return m.as_bytes(policy=m.policy.clone(linesep="\r\n"))


def mail(subject="سفارش خراب", body="سلام، سفارشم خراب رسید.", sender="sara@example.ir", to="support@crm.test", **h):
    m = EmailMessage()
    m["From"] = sender
    m["To"] = to
    m["Subject"] = subject
    m["Message-ID"] = h.pop("message_id", None) or make_msgid(domain="example.ir")
    for k, v in h.items():
        m[k.replace("_", "-")] = v
    m.set_content(body)
    return m


def messages_with(svc, external_id):
    with svc.ctx.engine.connect() as conn:
        return conn.execute(sa.select(ticket_messages).where(ticket_messages.c.external_id == external_id)).all()


def ticket_of(svc, external_id):
    rows = messages_with(svc, external_id)
    assert len(rows) == 1, rows
    return ticket(svc, rows[0].ticket_id)


def files_of(svc, message_id):
    with svc.ctx.engine.connect() as conn:
        return conn.execute(sa.select(attachments).where(attachments.c.message_id == message_id)).all()


def count(svc, table):
    with svc.ctx.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(table)).scalar()


# -- inbound ---------------------------------------------------------------------------------
def test_a_mail_becomes_a_ticket_with_the_customer_matched_and_the_team_of_its_address(svc):
    handlers = customer_projection.subscriptions(rt(svc))[0].handlers
    e = customer_message("customer.created.v1", email="Sara.Mail@Example.IR")
    with svc.ctx.engine.begin() as conn:
        handlers[e.routing_key](conn, e)
    team = make_team(svc, "billing-mail", email_address="Billing@CRM.test")
    m = mail(sender='"سارا احمدی" <Sara.Mail@example.ir>', to="billing@crm.test")
    code, text = send(svc, m, sender="sara.mail@example.ir", to=("billing@crm.test",))
    assert code == 250
    t = ticket_of(svc, m["Message-ID"])
    assert t.channel == "email" and t.subject == "سفارش خراب" and t.contact_address == "sara.mail@example.ir"
    assert t.customer_id == e.subject.removeprefix("customers/")
    assert t.contact_name == "سارا احمدی" and str(t.team_id) == team
    assert number_text(t.number).encode() in text  # the 250 names the ticket
    msg = messages_with(svc, m["Message-ID"])[0]
    assert msg.kind == "customer" and msg.body == "سلام، سفارشم خراب رسید." and msg.channel == "email"


def test_a_reply_with_in_reply_to_threads_into_the_ticket(svc):
    first = mail()
    send(svc, first)
    t = ticket_of(svc, first["Message-ID"])
    # another address (a colleague): the Message-ID it answers is what counts
    reply = mail(
        "Re: سفارش خراب",
        "هنوز خبری نشد",
        sender="ali@example.ir",
        In_Reply_To=first["Message-ID"],
        References=first["Message-ID"],
    )
    assert send(svc, reply, sender="ali@example.ir")[0] == 250
    assert ticket_of(svc, reply["Message-ID"]).id == t.id
    assert ticket(svc, t.id).message_count == 2
    # only References (an MUA that drops In-Reply-To) threads too
    again = mail("Re: Re: سفارش خراب", "?", References=f"<unknown@x.example> {reply['Message-ID']}")
    send(svc, again)
    assert ticket_of(svc, again["Message-ID"]).id == t.id


def test_a_quoted_ticket_number_threads_for_its_sender_and_not_for_a_stranger(svc):
    first = mail(sender="reza@example.ir")
    send(svc, first, sender="reza@example.ir")
    t = ticket_of(svc, first["Message-ID"])
    quoted = mail(f"Re: [{number_text(t.number)}] سفارش خراب", "عکس را فرستادم", sender="Reza@Example.ir")
    send(svc, quoted, sender="reza@example.ir")
    assert ticket_of(svc, quoted["Message-ID"]).id == t.id
    stranger = mail(f"Re: [{number_text(t.number)}] سفارش خراب", "let me in", sender="mallory@evil.example")
    send(svc, stranger, sender="mallory@evil.example")
    other = ticket_of(svc, stranger["Message-ID"])
    assert other.id != t.id and other.contact_address == "mallory@evil.example"
    assert ticket(svc, t.id).message_count == 2


def test_the_same_mail_twice_is_one_message_with_or_without_a_message_id(svc):
    m = mail(body="یک بار")
    assert send(svc, m)[0] == 250
    before = count(svc, tickets)
    code, _ = send(svc, m)  # the MTA did not see our 250 and delivers again
    assert code == 250 and count(svc, tickets) == before and len(messages_with(svc, m["Message-ID"])) == 1
    raw = b"From: nima@example.ir\r\nTo: support@crm.test\r\nSubject: no id\r\n\r\nbody without a Message-ID\r\n"
    send(svc, raw, sender="nima@example.ir")
    send(svc, raw, sender="nima@example.ir")
    synthetic = mail_parse.synthetic_message_id(raw)
    assert len(messages_with(svc, synthetic)) == 1 and count(svc, tickets) == before + 1
    assert ticket_of(svc, synthetic).subject == "no id"


def test_broken_mime_with_a_truncated_boundary_still_makes_a_ticket(svc):
    mid = f"<broken-{uuid.uuid4().hex}@example.ir>"
    raw = (
        "From: broken@example.ir\r\nTo: support@crm.test\r\nSubject: broken\r\n"
        f"Message-ID: {mid}\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="BOUNDARY"\r\n\r\n'
        "--BOUNDARY\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        "متن نامه قبل از قطع شدن\r\n--BOUND"
    ).encode()
    assert send(svc, raw, sender="broken@example.ir")[0] == 250
    t = ticket_of(svc, mid)
    assert t.subject == "broken"
    assert "متن نامه قبل از قطع شدن" in messages_with(svc, mid)[0].body
    # a multipart whose boundary never appears: the raw text is the body, the original is kept
    mid2 = f"<noboundary-{uuid.uuid4().hex}@example.ir>"
    raw2 = (
        f"From: broken@example.ir\r\nSubject: no parts\r\nMessage-ID: {mid2}\r\n"
        'Content-Type: multipart/mixed; boundary="NEVER"\r\n\r\nجز متن خام چیزی نیست\r\n'
    ).encode()
    assert send(svc, raw2, sender="broken@example.ir")[0] == 250
    msg = messages_with(svc, mid2)[0]
    assert "جز متن خام چیزی نیست" in msg.body


def test_a_mail_over_the_size_limit_is_refused_with_552_and_nothing_is_stored(svc):
    m = mail(subject="huge")
    m.add_attachment(b"\0" * (30 * 1024 * 1024), maintype="application", subtype="octet-stream", filename="big.bin")
    data = crlf(m)
    before = (count(svc, tickets), count(svc, ticket_messages), count(svc, attachments))
    with smtplib.SMTP("127.0.0.1", port(svc), timeout=60) as s:  # announced with SIZE: refused at MAIL
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            s.sendmail("sara@example.ir", ["support@crm.test"], data)
        assert refused.value.smtp_code == 552
    with smtplib.SMTP("127.0.0.1", port(svc), timeout=60) as s:  # not announced: refused after DATA
        s.ehlo()
        s.mail("sara@example.ir")
        s.rcpt("support@crm.test")
        code, _ = s.data(data)
        assert code == 552
    assert (count(svc, tickets), count(svc, ticket_messages), count(svc, attachments)) == before
    assert messages_with(svc, m["Message-ID"]) == []


def test_a_cp1256_body_and_an_rfc2047_persian_subject_come_out_right(svc):
    mid = f"<cp-{uuid.uuid4().hex}@example.ir>"
    subject = "=?UTF-8?B?" + base64.b64encode("مشکل در پرداخت".encode()).decode() + "?="
    sender = "=?windows-1256?B?" + base64.b64encode("مژگان".encode("cp1256")).decode() + "?="
    body = "پرداخت من انجام نشد".encode("cp1256")  # cp1256 has every letter of it
    raw = (
        f"From: {sender} <maryam@example.ir>\r\nTo: support@crm.test\r\nSubject: {subject}\r\n"
        f"Message-ID: {mid}\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    ).encode() + body
    assert send(svc, raw, sender="maryam@example.ir")[0] == 250
    t = ticket_of(svc, mid)
    assert t.subject == "مشکل در پرداخت" and t.contact_name == "مژگان"
    assert messages_with(svc, mid)[0].body == "پرداخت من انجام نشد"


def test_an_html_only_mail_becomes_text_and_attachments_are_kept(svc):
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = "html@example.ir", "support@crm.test", "html"
    m["Message-ID"] = make_msgid(domain="example.ir")
    m.set_content(
        "<html><head><style>p{}</style></head><body><p>سلام</p><p>خط&nbsp;دوم<br>سوم</p></body></html>", "html"
    )
    m.add_attachment(b"%PDF-1.4 invoice", maintype="application", subtype="pdf", filename="فاکتور.pdf")
    send(svc, m, sender="html@example.ir")
    msg = messages_with(svc, m["Message-ID"])[0]
    assert msg.body == "سلام\n\nخط\xa0دوم\nسوم"
    files = files_of(svc, msg.id)
    assert [(f.filename, f.content_type, bytes(f.content)) for f in files] == [
        ("فاکتور.pdf", "application/pdf", b"%PDF-1.4 invoice")
    ]


def test_a_fax_from_the_gateway_is_a_fax_ticket_of_the_number_with_its_pdf(svc):
    m = mail(subject="Fax from 021-8877 6655", body="", sender=f'"Fax 02188776655" <{FAX_GATEWAY}>')
    m.add_attachment(b"%PDF-1.4 fax page", maintype="application", subtype="pdf", filename="fax.pdf")
    assert send(svc, m, sender=FAX_GATEWAY)[0] == 250
    t = ticket_of(svc, m["Message-ID"])
    assert t.channel == "fax" and t.contact_address == "+982188776655"
    msg = messages_with(svc, m["Message-ID"])[0]
    assert msg.channel == "fax"
    assert [(f.filename, bytes(f.content)) for f in files_of(svc, msg.id)] == [("fax.pdf", b"%PDF-1.4 fax page")]
    # a whole gateway domain ("@efax.example"), the number in the display name, a TIFF
    m2 = mail(subject="new fax", body="", sender='"۰۹۱۲۱۲۳۴۵۶۷" <noreply@efax.example>')
    m2.add_attachment(b"II*\0tiff", maintype="image", subtype="tiff", filename="page1.tif")
    send(svc, m2, sender="noreply@efax.example")
    t2 = ticket_of(svc, m2["Message-ID"])
    assert t2.channel == "fax" and t2.contact_address == "+989121234567"


def test_a_reply_to_a_closed_ticket_opens_a_follow_up(svc):
    first = mail(sender="closed@example.ir")
    send(svc, first, sender="closed@example.ir")
    t = ticket_of(svc, first["Message-ID"])
    r = rt(svc)
    with r.uow.begin() as tx:
        r.tickets.change_state(tx, t.id, "closed", "agent-1")
    reply = mail("Re: سفارش خراب", "دوباره خراب شد", sender="closed@example.ir", In_Reply_To=first["Message-ID"])
    assert send(svc, reply, sender="closed@example.ir")[0] == 250
    follow = ticket_of(svc, reply["Message-ID"])
    assert follow.id != t.id and follow.subject == "سفارش خراب"
    assert follow.tags == ["follow_up"] and follow.custom_fields == {"follow_up_of": number_text(t.number)}
    assert ticket(svc, t.id).state == "closed" and ticket(svc, t.id).message_count == 1


# -- outbound --------------------------------------------------------------------------------
def delivery(svc, message_id):
    with svc.ctx.engine.connect() as conn:
        return conn.execute(sa.select(ticket_messages).where(ticket_messages.c.id == message_id)).one()


def sent_with(sink, message_id):
    return [m for m in sink.messages() if m["Message-ID"] == message_id]


def test_an_agent_reply_is_mailed_with_the_threading_headers_and_answers_thread_back(svc, sink):
    first = mail("Re: [T-999999] مرجوعی", "کالا را پس بدهم؟", sender='"سارا" <reply@example.ir>')
    send(svc, first, sender="reply@example.ir")
    t = ticket_of(svc, first["Message-ID"])
    sink.start()
    try:
        msg, _ = add_message(svc, t.id, "agent", "بله، از فرم مرجوعی استفاده کنید.", author="agent-7")
        assert msg.delivery == "pending"
        rt(svc).timers.run_once()  # (or the service's own timer worker, whichever comes first)
        done = wait_for(lambda: delivery(svc, msg.id).delivery == "sent" and delivery(svc, msg.id), 15, "sent")
        ours = f"<msg-{msg.id}@{DOMAIN}>"
        assert done.external_id == ours
        got = wait_for(lambda: sent_with(sink, ours), 5, "the mail at the sink")
        out = got[0]
        assert out["Subject"] == f"Re: [{number_text(t.number)}] مرجوعی"
        assert out["In-Reply-To"] == first["Message-ID"] and first["Message-ID"] in out["References"]
        assert out["To"].addresses[0].addr_spec == "reply@example.ir" and out["From"] == f"support@{DOMAIN}"
        assert out.get_body(("plain",)).get_content().strip() == "بله، از فرم مرجوعی استفاده کنید."
        assert 'dir="rtl"' in out.get_body(("html",)).get_content()
        assert sink.files() and all(p.suffix == ".eml" for p in sink.files())
    finally:
        sink.stop()
    # the customer answers our mail from another client: In-Reply-To is our Message-ID
    answer = mail("RE: مرجوعی", "ممنون", sender="other@example.ir", In_Reply_To=ours)
    send(svc, answer, sender="other@example.ir")
    assert ticket_of(svc, answer["Message-ID"]).id == t.id


def test_smtp_down_keeps_the_reply_pending_and_it_is_sent_once_the_server_is_up(svc, sink):
    first = mail("down", "hello", sender="down@example.ir")
    send(svc, first, sender="down@example.ir")
    t = ticket_of(svc, first["Message-ID"])
    msg, _ = add_message(svc, t.id, "agent", "we are on it", author="agent-7")
    rt(svc).timers.run_once()

    def failed_once():
        with svc.ctx.engine.connect() as conn:
            tm = timers.get(conn, DELIVER, str(msg.id))
        return tm is not None and tm.attempts >= 1 and tm

    tm = wait_for(failed_once, 10, "a failed attempt")
    assert tm.last_error  # the connection was refused
    assert delivery(svc, msg.id).delivery == "pending"
    sink.start()
    try:
        with svc.ctx.engine.begin() as conn:  # the back-off is seconds; the test does not wait it out
            timers.reschedule(conn, DELIVER, str(msg.id), conn.execute(sa.select(sa.func.now())).scalar())
        rt(svc).timers.run_once()
        wait_for(lambda: delivery(svc, msg.id).delivery == "sent", 15, "sent after the server came up")
        ours = f"<msg-{msg.id}@{DOMAIN}>"
        got = wait_for(lambda: sent_with(sink, ours), 5, "the mail at the sink")
        assert {m["Message-ID"] for m in got} == {ours}  # at least once, always the same id
        assert delivery(svc, msg.id).external_id == ours
    finally:
        sink.stop()


def test_the_sink_writes_each_message_as_an_eml_file(tmp_path):
    s = Sink(tmp_path / "mail", port=0).start()
    try:
        m = mail("sink", "یک پیام")
        with smtplib.SMTP("127.0.0.1", s.port, timeout=10) as c:
            c.send_message(m)
        [f] = s.files()
        assert f.suffix == ".eml" and m["Message-ID"].encode() in f.read_bytes()
        assert s.messages()[0]["Subject"] == "sink"
    finally:
        s.stop()


# -- pure ------------------------------------------------------------------------------------
def test_reply_subjects_quote_the_number_once():
    assert mail_parse.reply_subject("T-000123", "کالا خراب") == "Re: [T-000123] کالا خراب"
    assert mail_parse.reply_subject("T-000123", "RE: Fwd: [T-000123] کالا خراب") == "Re: [T-000123] کالا خراب"


def test_fax_numbers_and_gateways():
    assert mail_parse.fax_number("IR", "Fax from +98 21 8877 6655") == "+982188776655"
    assert mail_parse.fax_number("IR", "no number", "Fax ۰۲۱۸۸۷۷۶۶۵۵") == "+982188776655"
    assert mail_parse.fax_number("IR", "page 1", "") == ""
    gws = mail_parse.gateway_list("Fax@Gate.example, @efax.example")
    assert mail_parse.is_gateway("fax@gate.example", gws) and mail_parse.is_gateway("x@efax.example", gws)
    assert not mail_parse.is_gateway("x@notefax.example", gws)


def test_charsets_fall_back_to_utf8_then_cp1256():
    assert mail_parse.decode_bytes("سلام".encode(), "x-unknown") == "سلام"
    assert mail_parse.decode_bytes("سلام".encode("cp1256"), "us-ascii") == "سلام"
    assert mail_parse.decode_bytes("سلام".encode(), "utf-8") == "سلام"


def dsn(original_id: str, recipient: str, status: str = "5.1.1", action: str = "failed") -> bytes:
    """An RFC 3464 delivery-status notification returning the headers of one of our mails."""
    text = (
        "From: MAILER-DAEMON@mx.example.ir\n"
        "To: support@crm.test\n"
        "Subject: Undelivered Mail Returned to Sender\n"
        f"Message-ID: <dsn-{uuid.uuid4().hex}@mx.example.ir>\n"
        "MIME-Version: 1.0\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\n\n'
        "--B\nContent-Type: text/plain\n\nThe mail could not be delivered.\n"
        "--B\nContent-Type: message/delivery-status\n\n"
        "Reporting-MTA: dns; mx.example.ir\n\n"
        f"Final-Recipient: rfc822; {recipient}\nAction: {action}\nStatus: {status}\n"
        f"Diagnostic-Code: smtp; 550 {status} mailbox unknown\n"
        "--B\nContent-Type: text/rfc822-headers\n\n"
        f"From: support@{DOMAIN}\nTo: {recipient}\nMessage-ID: {original_id}\nSubject: Re: x\n"
        "--B--\n"
    )
    return text.replace("\n", "\r\n").encode()


def test_a_bounce_of_our_reply_marks_it_failed_with_a_note_and_makes_no_ticket(svc, sink):
    first = mail("bounce me", "hello", sender="gone@example.ir")
    send(svc, first, sender="gone@example.ir")
    t = ticket_of(svc, first["Message-ID"])
    sink.start()
    try:
        msg, _ = add_message(svc, t.id, "agent", "we answered", author="agent-7")
        rt(svc).timers.run_once()
        wait_for(lambda: delivery(svc, msg.id).delivery == "sent", 15, "sent")
    finally:
        sink.stop()
    before = count(svc, tickets)
    report = dsn(f"<msg-{msg.id}@{DOMAIN}>", "gone@example.ir")
    assert send(svc, report, sender="")[0] == 250
    send(svc, report, sender="")  # the MTA sends it again
    assert count(svc, tickets) == before  # no ticket of the mailer daemon
    d = delivery(svc, msg.id)
    assert d.delivery == "failed" and "5.1.1" in d.delivery_error and "hard" in d.delivery_error
    with svc.ctx.engine.connect() as conn:
        notes = (
            conn.execute(
                sa.select(ticket_messages.c.body).where(
                    ticket_messages.c.ticket_id == t.id, ticket_messages.c.kind == "system"
                )
            )
            .scalars()
            .all()
        )
    assert len([n for n in notes if "bounced" in n]) == 1  # noted once
    # a report of a mail that is not ours is a mail like any other
    other = dsn("<someone-else@example.org>", "x@example.ir")
    send(svc, other, sender="")
    assert count(svc, tickets) == before + 1
