"""ConsentService: double opt-in through the signed confirmation link (the message handed to the
channel's sender by its durable timer), unsubscribe links and RFC 8058's one-click POST through
the gateway without a token, SMS stop keywords with a redelivery, suppressions, and bad input
named by field."""

from __future__ import annotations

import datetime as dt
import re
import uuid

import grpc
import pytest
import sqlalchemy as sa

from campaign_svc import consent, consent_api
from campaign_svc.tables import consent_ledger
from crm.campaign.v1 import campaign_events_pb2 as ev
from crm.campaign.v1 import consent_pb2 as pb
from crm.campaign.v1 import consent_pb2_grpc
from crm_chassis.links import Signer
from tests.support.harness import md

from .conftest import ADMIN, MARKETER, events, rt

PUBLIC = md("public_channel", "gateway:public")


@pytest.fixture(scope="module")
def stub(ch):
    return consent_pb2_grpc.ConsentServiceStub(ch)


@pytest.fixture(scope="module")
def worker(svc):
    """The service's timer worker, stopped: run_once fires what is due, in this thread."""
    w = rt(svc).timers
    w.stop()
    w._stopping.clear()
    return w


@pytest.fixture
def outbox(svc):
    """What the channel senders were handed (the e-mail and SMS senders of this test)."""
    sent = []

    def send(out):
        sent.append(out)
        return f"<{len(sent)}@test>"

    senders = rt(svc).senders
    saved = dict(senders)
    senders["email"] = senders["sms"] = send
    yield sent
    senders.clear()
    senders.update(saved)


@pytest.fixture(scope="module")
def http(svc):
    from tests.support.harness import gateway_client

    client, clients = gateway_client(campaign=f"127.0.0.1:{svc.port}")
    yield client
    clients.close()


def ledger(svc, address: str) -> list:
    with svc.ctx.engine.connect() as conn:
        q = sa.select(consent_ledger).where(consent_ledger.c.address == address).order_by(consent_ledger.c.id)
        return conn.execute(q).all()


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def test_double_opt_in_sends_a_link_that_grants_once_with_proof(svc, stub, worker, outbox):
    got = stub.RequestOptIn(
        pb.RequestOptInRequest(channel="email", address=" Sara@Example.IR ", text_version="v3", source="web_form"),
        metadata=MARKETER,
    )
    assert got.confirmation_sent and got.entry.action == "requested" and got.entry.address == "sara@example.ir"
    assert [(p.purpose, p.status) for p in got.consent.purposes] == [("marketing", "pending")]
    assert outbox == []  # not before the commit: the timer sends it
    worker.run_once()
    (message,) = outbox
    assert message.channel == "email" and message.address == "sara@example.ir"
    assert 'dir="rtl"' in message.html and "تأیید" in message.text
    token = re.search(r"/v1/optIn/([A-Za-z0-9_\-.]+)", message.text).group(1)

    page = stub.GetOptIn(pb.GetOptInRequest(token=token), metadata=PUBLIC)  # a GET confirms nothing
    assert (page.masked_address, page.status) == ("s***@example.ir", "pending")
    done = stub.ConfirmOptIn(pb.ConfirmOptInRequest(token=token, client_address="203.0.113.9"), metadata=PUBLIC)
    assert done.status == "granted"
    again = stub.ConfirmOptIn(pb.ConfirmOptInRequest(token=token), metadata=PUBLIC)  # a second click
    assert again.status == "granted"
    rows = ledger(svc, "sara@example.ir")
    assert [(r.action, r.source) for r in rows] == [("requested", "web_form"), ("granted", "confirmation_link")]
    assert rows[1].text_version == "v3" and rows[1].proof["client_address"] == "203.0.113.9"
    assert rows[1].proof["requested_entry"] == f"consentEntries/{rows[0].id}"
    changes = [
        e
        for e in events(svc, "consent.changed.v1", ev.ConsentEvent)
        if e.entry in {f"consentEntries/{r.id}" for r in rows}
    ]
    assert [(e.previous_status, e.status) for e in changes] == [("", "pending"), ("pending", "granted")]
    # already granted: asking again sends nothing
    assert not stub.RequestOptIn(
        pb.RequestOptInRequest(channel="email", address="sara@example.ir"), metadata=MARKETER
    ).confirmation_sent
    worker.run_once()
    assert len(outbox) == 1


def test_an_opt_in_request_after_an_unsubscribe_sends_nothing_until_it_is_confirmed(svc, stub, worker, outbox):
    """The request made a revoked address 'pending', which opt-out mode sends to: anyone able to
    post the site's form (or a marketer) undid an unsubscribe without the person's confirmation."""
    address = "back@example.ir"
    stub.RecordConsent(
        pb.RecordConsentRequest(entry=pb.ConsentEntry(channel="email", address=address, action="revoked")),
        metadata=MARKETER,
    )
    may_send = sa.select(consent.sendable("email", "marketing", sa.literal(address)))
    got = stub.RequestOptIn(pb.RequestOptInRequest(channel="email", address=address), metadata=MARKETER)
    assert got.confirmation_sent
    with svc.ctx.engine.connect() as conn:
        assert not conn.execute(may_send).scalar()  # still unsubscribed
    worker.run_once()
    (message,) = outbox  # the confirmation itself goes
    token = re.search(r"/v1/optIn/([A-Za-z0-9_\-.]+)", message.text).group(1)
    assert stub.ConfirmOptIn(pb.ConfirmOptInRequest(token=token), metadata=PUBLIC).status == "granted"
    with svc.ctx.engine.connect() as conn:
        assert conn.execute(may_send).scalar()


def test_a_forged_or_expired_confirmation_link_is_refused(svc, stub):
    assert code_of(lambda: stub.GetOptIn(pb.GetOptInRequest(token="abc.def"), metadata=PUBLIC))[0] == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    got = stub.RequestOptIn(pb.RequestOptInRequest(channel="sms", address="09121112233"), metadata=MARKETER)
    entry_id = got.entry.name.rsplit("/", 1)[1]
    links = Signer(consent_api.settings(rt(svc)).secret, "opt-in")
    past = links.sign(entry_id, expire_time=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1))
    code, details = code_of(lambda: stub.ConfirmOptIn(pb.ConfirmOptInRequest(token=past), metadata=PUBLIC))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "expired" in details
    other = Signer(consent_api.settings(rt(svc)).secret, "unsubscribe").sign(entry_id)  # another purpose's token
    assert code_of(lambda: stub.ConfirmOptIn(pb.ConfirmOptInRequest(token=other), metadata=PUBLIC))[0] == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    assert [r.action for r in ledger(svc, "+989121112233")] == ["requested"]  # nothing granted


def test_one_click_unsubscribe_through_the_gateway_stops_a_queued_message(svc, stub, http):
    address = "reza@example.ir"
    stub.RecordConsent(
        pb.RecordConsentRequest(
            entry=pb.ConsentEntry(channel="email", address=address, action="granted", source="import")
        ),
        metadata=MARKETER,
    )
    may_send = sa.select(consent.sendable("email", "marketing", sa.literal(address)))
    with svc.ctx.engine.connect() as conn:
        assert conn.execute(may_send).scalar()  # a message queued for it would go
    url = consent_api.unsubscribe_url(rt(svc), "email", address, "marketing", "m-1")
    path = url.split("localhost:8080", 1)[1]
    page = http.get(path)  # the landing page's question, no bearer token
    assert page.status_code == 200, page.get_data(as_text=True)
    assert page.get_json()["maskedAddress"] == "r***@example.ir" and page.get_json()["status"] == "granted"
    one_click = http.post(
        path, data="List-Unsubscribe=One-Click", content_type="application/x-www-form-urlencoded"
    )  # RFC 8058: the mail client's POST
    assert one_click.status_code == 200, one_click.get_data(as_text=True)
    assert one_click.get_json()["status"] == "revoked"
    with svc.ctx.engine.connect() as conn:
        assert not conn.execute(may_send).scalar()  # the queued message is not sent now
    rows = ledger(svc, address)
    assert [(r.action, r.source) for r in rows] == [("granted", "import"), ("revoked", "list_unsubscribe")]
    assert rows[1].proof["message"] == "m-1"
    http.post(path, data="List-Unsubscribe=One-Click", content_type="application/x-www-form-urlencoded")
    assert len(ledger(svc, address)) == 2  # a repeated POST records nothing more
    tampered = path[:-3] + ("AAA" if not path.endswith("AAA") else "BBB")
    assert http.post(tampered, data="List-Unsubscribe=One-Click").status_code == 401


def test_an_sms_stop_keyword_revokes_every_purpose_once(svc, stub):
    for purpose in ("marketing", "newsletter"):
        stub.RecordConsent(
            pb.RecordConsentRequest(
                entry=pb.ConsentEntry(channel="sms", address="0912 555 6677", action="granted", purpose=purpose)
            ),
            metadata=MARKETER,
        )
    req = pb.PostInboundSmsRequest(
        key="dev-sms-key", from_number="+98 912 555 6677", message=" لغو۱۱ ", message_id="k-77"
    )
    assert stub.PostInboundSms(req, metadata=PUBLIC).stopped
    assert stub.PostInboundSms(req, metadata=PUBLIC).stopped  # the provider's redelivery
    c = stub.GetConsent(pb.GetConsentRequest(channel="sms", address="09125556677"), metadata=MARKETER)
    assert {(p.purpose, p.status) for p in c.purposes} == {
        ("all", "revoked"),
        ("marketing", "revoked"),
        ("newsletter", "revoked"),
    }
    assert not c.sendable
    stops = [r for r in ledger(svc, "+989125556677") if r.source == "sms_stop"]
    assert len(stops) == 3 and {r.proof["keyword"] for r in stops} == {"لغو11"}  # one per purpose, once
    chat = pb.PostInboundSmsRequest(key="dev-sms-key", from_number="09125556677", message="سلام، قیمت؟")
    assert not stub.PostInboundSms(chat, metadata=PUBLIC).stopped
    bad = pb.PostInboundSmsRequest(key="wrong", from_number="09125556677", message="stop")
    assert code_of(lambda: stub.PostInboundSms(bad, metadata=PUBLIC))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert consent_api.stop_keyword("STOP") == "stop" and consent_api.stop_keyword("لغو 11") == "لغو11"
    assert consent_api.stop_keyword("stop the noise") == ""


def test_a_stop_of_every_purpose_holds_for_purposes_never_asked_until_one_is_granted(svc, stub):
    """A number that never had a consent row texts STOP: no purpose may be sent to it, not only
    marketing (it was: a newsletter campaign still went out in opt-out mode); a later grant of
    one purpose opens that one only."""
    req = pb.PostInboundSmsRequest(key="dev-sms-key", from_number="09127778899", message="stop", message_id="k-78")
    assert stub.PostInboundSms(req, metadata=PUBLIC).stopped
    number = "+989127778899"

    def may(purpose: str) -> bool:
        with svc.ctx.engine.connect() as conn:
            return conn.execute(sa.select(consent.sendable("sms", purpose, sa.literal(number)))).scalar()

    assert not may("marketing") and not may("newsletter") and not may("service-notices")
    stub.RecordConsent(
        pb.RecordConsentRequest(
            entry=pb.ConsentEntry(channel="sms", address=number, action="granted", purpose="newsletter")
        ),
        metadata=MARKETER,
    )
    assert may("newsletter") and not may("marketing")


def test_a_back_dated_grant_does_not_undo_a_later_revocation(svc, stub):
    """RecordConsent takes a past occur_time (an import of old sign-ups); a grant of 2025 recorded
    after an unsubscribe of today became the state, and the address was sent to again."""
    address = "old@example.ir"
    stub.RecordConsent(
        pb.RecordConsentRequest(entry=pb.ConsentEntry(channel="email", address=address, action="revoked")),
        metadata=MARKETER,
    )
    old = pb.ConsentEntry(channel="email", address=address, action="granted", source="import")
    old.occur_time.FromDatetime(dt.datetime(2025, 3, 1, tzinfo=dt.UTC))
    got = stub.RecordConsent(pb.RecordConsentRequest(entry=old), metadata=MARKETER)
    assert [(p.purpose, p.status) for p in got.consent.purposes] == [("marketing", "revoked")]
    assert not got.consent.sendable
    assert [r.action for r in ledger(svc, address)] == ["revoked", "granted"]  # kept as proof all the same


def test_suppressions_by_hand_and_their_errors(svc, stub):
    s = pb.Suppression(channel="email", address="Bounce@Example.ir", reason="admin", detail="asked by phone")
    made = stub.CreateSuppression(pb.CreateSuppressionRequest(suppression=s), metadata=ADMIN)
    assert made.address == "bounce@example.ir" and made.reason == "admin"
    assert code_of(lambda: stub.CreateSuppression(pb.CreateSuppressionRequest(suppression=s), metadata=ADMIN))[0] == (
        grpc.StatusCode.ALREADY_EXISTS
    )
    c = stub.GetConsent(pb.GetConsentRequest(channel="email", address="bounce@example.ir"), metadata=MARKETER)
    assert c.suppressed and c.suppression_reason == "admin" and not c.sendable
    listed = stub.ListSuppressions(pb.ListSuppressionsRequest(channel="email"), metadata=MARKETER)
    assert "bounce@example.ir" in [x.address for x in listed.suppressions]
    assert code_of(lambda: stub.CreateSuppression(pb.CreateSuppressionRequest(suppression=s), metadata=MARKETER))[
        0
    ] == (grpc.StatusCode.PERMISSION_DENIED)
    stub.DeleteSuppression(pb.DeleteSuppressionRequest(channel="email", address="bounce@example.ir"), metadata=ADMIN)
    code = code_of(
        lambda: stub.DeleteSuppression(
            pb.DeleteSuppressionRequest(channel="email", address="bounce@example.ir"), metadata=ADMIN
        )
    )[0]
    assert code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        (pb.ConsentEntry(channel="fax", address="x", action="granted"), "entry.channel"),
        (pb.ConsentEntry(channel="email", address="not-mail", action="granted"), "entry.address"),
        (pb.ConsentEntry(channel="sms", address="12", action="granted"), "entry.address"),
        (pb.ConsentEntry(channel="email", address="a@b.ir", action="requested"), "entry.action"),
        (pb.ConsentEntry(channel="email", address="a@b.ir", action="granted", purpose="all"), "entry.purpose"),
        (pb.ConsentEntry(channel="email", address="a@b.ir", action="granted", purpose="a b"), "entry.purpose"),
    ],
)
def test_bad_entries_name_the_field(stub, entry, field):
    code, details = code_of(lambda: stub.RecordConsent(pb.RecordConsentRequest(entry=entry), metadata=MARKETER))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and field in details


def test_the_ledger_lists_newest_first_in_keyset_pages(stub):
    for action in ("granted", "revoked", "granted"):
        stub.RecordConsent(
            pb.RecordConsentRequest(entry=pb.ConsentEntry(channel="telegram", address="5550001", action=action)),
            metadata=MARKETER,
        )
    first = stub.ListConsentEntries(
        pb.ListConsentEntriesRequest(channel="telegram", address="5550001", page_size=2), metadata=MARKETER
    )
    assert [e.action for e in first.entries] == ["granted", "revoked"] and first.next_page_token
    rest = stub.ListConsentEntries(
        pb.ListConsentEntriesRequest(
            channel="telegram", address="5550001", page_size=2, page_token=first.next_page_token
        ),
        metadata=MARKETER,
    )
    assert [e.action for e in rest.entries] == ["granted"] and not rest.next_page_token
    code, details = code_of(lambda: stub.ListConsentEntries(pb.ListConsentEntriesRequest(), metadata=MARKETER))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "address" in details


def test_an_erased_address_is_kept_as_a_keyed_hash_and_an_older_unkeyed_one_still_matches(svc):
    """The hash an erasure keeps is HMAC-SHA256 under the deployment's key, the same in SQL (the
    erasure's INSERT .. SELECT, the send-time check) as in Python: without the key nobody can
    find the phone number by hashing every number. A row an earlier version kept as an unkeyed
    SHA-256 still stops sends to that address."""
    import hashlib
    import hmac

    from campaign_svc.tables import suppressions

    key = consent.hash_key_of({"SUPPRESSION_HASH_KEY": "k" * 40}, None)  # the setting wins over the derived key
    assert key == b"k" * 40
    assert consent.hash_key_of({"CONSENT_LINK_SECRET": "a" * 40}, "j") != consent.hash_key_of(
        {"CONSENT_LINK_SECRET": "b" * 40}, "j"
    )
    phone = "+989121234567"
    mine = consent.hash_key()
    want = "hmac-sha256:" + hmac.new(mine, phone.encode(), hashlib.sha256).hexdigest()
    assert consent.address_hash(phone) == want
    assert consent.address_hash(phone) != "sha256:" + hashlib.sha256(phone.encode()).hexdigest()
    with svc.ctx.engine.connect() as conn:
        assert conn.execute(sa.select(consent._hash_sql(sa.literal(phone)))).scalar() == want
    try:
        consent.configure(b"another deployment's key")
        assert consent.address_hash(phone) != want
    finally:
        consent.configure(mine)
    legacy = "+989129990000"
    r = rt(svc)
    with r.uow.begin() as tx:
        tx.conn.execute(
            suppressions.insert().values(
                channel="sms", address="sha256:" + hashlib.sha256(legacy.encode()).hexdigest(), reason="erased"
            )
        )
    with svc.ctx.engine.connect() as conn:
        ok = conn.execute(sa.select(consent.sendable("sms", "marketing", sa.literal(legacy)))).scalar()
        assert ok is False
        assert consent.suppression_of(conn, "sms", legacy).reason == "erased"
    with r.uow.begin() as tx:
        assert consent.lift(tx, "sms", legacy) is True


def test_authentic_tokens_that_are_not_our_links_are_refused_and_record_nothing(svc, stub):
    """Tokens signed with the service's key whose fields are not what it writes (an expiry that
    is not a number, an opt-in entry id that is not one, an unsubscribe of channel "pigeon" or
    an empty purpose) are refused as bad links: UNAUTHENTICATED, not INTERNAL, no revocation."""
    secret = consent_api.settings(rt(svc)).secret
    opt_in, unsub = Signer(secret, "opt-in"), Signer(secret, "unsubscribe")
    # an expiry field that is not a number, hand-made with the same key
    import base64
    import hashlib
    import hmac

    def raw(purpose: str, body: str) -> str:
        b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()  # noqa: E731
        mac = hmac.new(secret, f"{purpose}\x1f{body}".encode(), hashlib.sha256).digest()[:20]
        return b64(body.encode()) + "." + b64(mac)

    assert opt_in.open(opt_in.sign("7")) == ["7"]  # the hand-made form is the Signer's own
    assert raw("opt-in", "\x1f7") == opt_in.sign("7")
    tokens = [
        (stub.GetOptIn, pb.GetOptInRequest, raw("opt-in", "soon\x1f7")),
        (stub.GetOptIn, pb.GetOptInRequest, opt_in.sign("not-a-number")),
        (stub.ConfirmOptIn, pb.ConfirmOptInRequest, opt_in.sign(str(uuid.uuid4()))),
        (stub.Unsubscribe, pb.UnsubscribeRequest, unsub.sign("pigeon", "a@b.ir", "nope", "")),
        (stub.Unsubscribe, pb.UnsubscribeRequest, unsub.sign("email", "a@b.ir", "", "")),
        (stub.GetUnsubscribe, pb.GetUnsubscribeRequest, raw("unsubscribe", "x\x1femail\x1fa@b.ir\x1fm\x1f")),
    ]
    for call, request, token in tokens:
        code, _details = code_of(
            lambda call=call, request=request, token=token: call(request(token=token), metadata=PUBLIC)
        )
        assert code == grpc.StatusCode.UNAUTHENTICATED, (call, token)
    assert ledger(svc, "a@b.ir") == []
