"""The audience projection: customer fields typed, behaviour from sales and support facts,
replays and out-of-order events, merge and erasure, the consent summary, and a trip through the
real broker (customer, sales and support events on their queues, one per producer)."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal

import pika
import sqlalchemy as sa

from campaign_svc import audience as aud
from campaign_svc import consent
from campaign_svc.__main__ import SPEC
from campaign_svc.tables import audience, audience_invoices, audience_orders, consent_ledger, consent_state, messages
from crm.campaign.v1 import campaign_events_pb2 as ev
from crm.customer.v1 import customer_pb2
from crm.sales.v1 import sales_events_pb2 as se
from crm.support.v1 import support_events_pb2 as te
from crm.support.v1 import ticket_pb2
from crm.type.v1 import date_pb2, money_pb2
from tests.support.customers import customer, customer_message, merged_message
from tests.support.harness import wait_for

from .conftest import deliver, event_of, events, row, rt

T0 = dt.datetime(2026, 3, 1, 9, 0, tzinfo=dt.UTC)


def irr(units: int) -> money_pb2.Money:
    return money_pb2.Money(currency_code="IRR", units=units)


def order(cid: str, oid: str, key="order.placed.v1", total=1_000_000, at=T0, state="open", campaign=""):
    e = se.OrderEvent(
        order=f"orders/{oid}", customer=f"customers/{cid}", total=irr(total), state=state, campaign_id=campaign
    )
    e.event_time.FromDatetime(at)
    e.lines.add(product="products/p1")
    return event_of("sales", key, e, f"orders/{oid}")


def invoice(cid: str, iid: str, key="invoice.paid.v1", total=500_000, paid=500_000, kind="invoice", at=T0, **kw):
    e = se.InvoiceEvent(
        invoice=f"invoices/{iid}",
        customer=f"customers/{cid}",
        kind=kind,
        total=irr(total),
        paid_total=irr(paid),
        state=kw.pop("state", "paid"),
        **kw,
    )
    e.event_time.FromDatetime(at)
    return event_of("sales", key, e, f"invoices/{iid}")


def ticket(cid: str, tid: str, version=1, complaint=False, state=ticket_pb2.Ticket.STATE_NEW, at=T0):
    e = te.TicketEvent(
        ticket=f"tickets/{tid}", customer=f"customers/{cid}", complaint=complaint, state=state, version=version
    )
    e.create_time.FromDatetime(at)
    e.event_time.FromDatetime(at)
    return event_of("support", "ticket.opened.v1", e, f"tickets/{tid}")


def created(svc, **fields) -> str:
    cid = str(uuid.uuid4())
    deliver(svc, customer_message("customer.created.v1", cid=cid, **fields))
    return cid


def test_customer_fields_are_typed_and_version_guarded(svc):
    cid = created(
        svc,
        display_name="مینا کاظمی",
        email=" Mina@Example.IR ",
        type=customer_pb2.CUSTOMER_TYPE_PERSON,
        kind=customer_pb2.CUSTOMER_KIND_END_CONSUMER,
        gender=customer_pb2.GENDER_FEMALE,
        birth_date=date_pb2.Date(year=1990, month=6, day=21),
        province="تهران",
        industry="",
        tags=["vip", "wholesale"],
        groups=["groups/g1"],
        rank="ranks/gold",
    )
    r = row(svc, audience, customer_id=cid)
    assert (r.email, r.type, r.kind, r.gender) == ("mina@example.ir", "person", "end_consumer", "female")
    assert r.birth_date == dt.date(1990, 6, 21) and r.tags == ["vip", "wholesale"] and r.groups == ["g1"]
    assert r.create_time == dt.datetime(2026, 1, 5, tzinfo=dt.UTC) and r.rank == "ranks/gold"
    # an older version arriving late changes nothing; a newer one does
    deliver(svc, customer_message("customer.updated.v1", cid=cid, version=0, display_name="old"))
    assert row(svc, audience, customer_id=cid).display_name == "مینا کاظمی"
    deliver(svc, customer_message("customer.updated.v1", cid=cid, version=2, display_name="مینا", province="فارس"))
    r = row(svc, audience, customer_id=cid)
    assert (r.display_name, r.province, r.gender) == ("مینا", "فارس", "")


def test_behaviour_from_sales_and_support_survives_replays_and_disorder(svc):
    cid = created(svc, display_name="رضا")
    o1, o2 = str(uuid.uuid4()), str(uuid.uuid4())
    later = T0 + dt.timedelta(days=3)
    deliver(svc, order(cid, o1, at=T0), order(cid, o2, at=later, total=2_000_000))
    deliver(svc, order(cid, o1, at=T0))  # a replay
    r = row(svc, audience, customer_id=cid)
    assert r.order_count == 2 and r.first_purchase_time == T0 and r.last_purchase_time == later
    # cancelled, then an older "placed" arrives late: still cancelled
    deliver(svc, order(cid, o2, key="order.cancelled.v1", state="cancelled", at=later + dt.timedelta(hours=1)))
    deliver(svc, order(cid, o2, at=later))
    r = row(svc, audience, customer_id=cid)
    assert r.order_count == 1 and r.last_purchase_time == T0
    assert row(svc, audience_orders, order_id=o2).placed_time == later
    # revenue: paid invoices minus credit notes
    i1, c1 = str(uuid.uuid4()), str(uuid.uuid4())
    deliver(svc, invoice(cid, i1, total=900_000, paid=900_000), invoice(cid, i1, total=900_000, paid=900_000))
    deliver(
        svc,
        invoice(cid, c1, key="invoice.credited.v1", kind="credit_note", total=100_000, paid=0, state="issued"),
    )
    assert row(svc, audience, customer_id=cid).revenue == Decimal("800000")
    # tickets and complaints
    t1, t2 = str(uuid.uuid4()), str(uuid.uuid4())
    deliver(svc, ticket(cid, t1), ticket(cid, t2, complaint=True, at=later))
    r = row(svc, audience, customer_id=cid)
    assert (r.ticket_count, r.complaint_count, r.last_complaint_time) == (2, 1, later)
    # the category changed to not-a-complaint (a newer version); an old version replayed later
    deliver(svc, ticket(cid, t2, version=3, complaint=False, at=later), ticket(cid, t2, version=2, complaint=True))
    assert row(svc, audience, customer_id=cid).complaint_count == 0
    assert row(svc, audience, customer_id=cid).last_activity_time == later
    # the full rebuild agrees with the incremental state
    with svc.ctx.engine.begin() as conn:
        before = conn.execute(sa.select(audience).where(audience.c.customer_id == cid)).one()
        aud.rebuild_behaviour(conn)
        after = conn.execute(sa.select(audience).where(audience.c.customer_id == cid)).one()
    assert {k: v for k, v in before._mapping.items() if k != "behaviour_time"} == {
        k: v for k, v in after._mapping.items() if k != "behaviour_time"
    }


def test_facts_before_the_customer_event_count_once_it_arrives(svc):
    cid = str(uuid.uuid4())
    deliver(svc, order(cid, str(uuid.uuid4())))
    assert row(svc, audience, customer_id=cid) is None
    deliver(svc, customer_message("customer.created.v1", cid=cid, display_name="دیر"))
    assert row(svc, audience, customer_id=cid).order_count == 1


def test_audience_changed_hook_runs_in_the_transaction(svc):
    seen = []
    hooks = rt(svc).hooks.audience_changed
    hooks.append(lambda conn, ids, cause: seen.append((tuple(ids), cause, conn.in_transaction())))
    try:
        cid = created(svc)
        deliver(svc, order(cid, str(uuid.uuid4())))
    finally:
        hooks.pop()
    assert seen == [((cid,), "customer", True), ((cid,), "sales", True)]


def test_merge_repoints_facts_and_messages_and_erasure_blanks_personal_data(svc):
    a, b = created(svc, email="a@x.ir"), created(svc, email="b@x.ir")
    deliver(svc, order(a, str(uuid.uuid4())), order(b, str(uuid.uuid4())))
    r = rt(svc)
    with r.uow.begin() as tx:
        camp = tx.conn.execute(
            sa.text("INSERT INTO campaigns (display_name, channel) VALUES ('c', 'email') RETURNING id")
        ).scalar()
        tx.conn.execute(messages.insert().values(campaign_id=camp, customer_id=b, channel="email", address="b@x.ir"))
        both = tx.conn.execute(
            sa.text("INSERT INTO campaigns (display_name, channel) VALUES ('both', 'email') RETURNING id")
        ).scalar()
        for cid in (a, b):  # both got this campaign's run: the survivor's message stays its own
            tx.conn.execute(messages.insert().values(campaign_id=both, customer_id=cid, channel="email", address=cid))
        consent.record(
            r, tx, consent.Change("email", "b@x.ir", "granted", "web_form", customer_id=b, proof={"ip": "1"})
        )
    deliver(svc, merged_message(customer(a, 2, email="a@x.ir"), [b]))
    assert row(svc, audience, customer_id=a).order_count == 2
    assert row(svc, audience, customer_id=b).merged_into == a
    with svc.ctx.engine.connect() as conn:
        assert conn.execute(sa.select(messages.c.customer_id).where(messages.c.campaign_id == camp)).scalar() == a
        kept = conn.execute(sa.select(messages.c.customer_id, messages.c.address).where(messages.c.campaign_id == both))
        assert sorted(kept.all()) == sorted([(a, a), (b, b)])
    # erasure: personal columns of every table blank (message address, consent proof)
    deliver(svc, customer_message("customer.erased.v1", cid=a, version=5))
    with svc.ctx.engine.connect() as conn:
        assert conn.execute(sa.select(messages.c.address).where(messages.c.campaign_id == camp)).scalar() == ""
        entry = conn.execute(sa.select(consent_ledger).where(consent_ledger.c.customer_id == a)).one()
        assert (entry.address, entry.proof) == ("", {})
    assert row(svc, audience, customer_id=a).email == ""


def test_erasing_customers_forgets_their_consent_by_customer_and_by_address(svc):
    """Two erased customers who each had a marketing consent: the second erasure failed on the
    key of consent_state (channel, address "", purpose) and the event could never be applied;
    an unsubscribe recorded by address only (the link carries no customer) kept the address and
    the client's IP after the erasure."""
    a = created(svc, email="era@x.ir", mobile="+989121110001")
    b = created(svc, email="erb@x.ir", mobile="+989121110002")
    r = rt(svc)
    with r.uow.begin() as tx:
        for cid, mail in ((a, "era@x.ir"), (b, "erb@x.ir")):
            consent.record(r, tx, consent.Change("email", mail, "granted", "web_form", customer_id=cid))
        consent.record(  # the unsubscribe link and an SMS stop know the address only
            r,
            tx,
            consent.Change("email", "era@x.ir", "revoked", "unsubscribe_link", proof={"client_address": "1.2.3.4"}),
        )
        consent.record(r, tx, consent.Change("sms", "+989121110001", "revoked", "sms_stop", purpose="all"))
    deliver(svc, customer_message("customer.erased.v1", cid=a, version=5))
    deliver(svc, customer_message("customer.erased.v1", cid=b, version=5))
    with svc.ctx.engine.connect() as conn:
        for address in ("era@x.ir", "erb@x.ir", "+989121110001"):
            assert conn.execute(sa.select(consent_ledger.c.id).where(consent_ledger.c.address == address)).all() == []
            assert conn.execute(sa.select(consent_state).where(consent_state.c.address == address)).all() == []
        assert conn.execute(sa.select(consent_state).where(consent_state.c.customer_id.in_([a, b]))).all() == []
        proofs = conn.execute(sa.select(consent_ledger.c.proof).where(consent_ledger.c.customer_id.in_([a, b])))
        assert all(p == {} for (p,) in proofs)


def test_an_erasure_keeps_suppressions_as_hashes_only_and_they_still_hold(svc):
    """A hard-bounced e-mail and a stopped mobile of an erased customer: the addresses leave the
    suppressions (they were kept in plain text after the erasure), their hashes stay, so the same
    address brought back later (a new record, an import) is still never sent to; an admin can
    lift it by the address."""
    from campaign_svc.tables import suppressions

    cid = created(svc, email="hash.me@x.ir", mobile="+989121110077")
    r = rt(svc)
    with r.uow.begin() as tx:
        consent.suppress(tx, "email", "hash.me@x.ir", "hard_bounce", "5.1.1")
        consent.suppress(tx, "sms", "+989121110077", "stop", "لغو")
        consent.suppress(tx, "email", "someone.else@x.ir", "hard_bounce", "5.1.1")
    deliver(svc, customer_message("customer.erased.v1", cid=cid, version=5))
    with svc.ctx.engine.connect() as conn:
        rows = {(x.channel, x.address, x.reason, x.detail) for x in conn.execute(sa.select(suppressions))}
        ok = lambda ch, a: conn.execute(sa.select(consent.sendable(ch, "marketing", sa.literal(a)))).scalar()  # noqa: E731
        assert not [x for x in rows if x[1] in ("hash.me@x.ir", "+989121110077")]
        assert ("email", consent.address_hash("hash.me@x.ir"), "hard_bounce", "") in rows
        assert ("sms", consent.address_hash("+989121110077"), "stop", "") in rows
        assert ("email", "someone.else@x.ir", "hard_bounce", "5.1.1") in rows  # not theirs: as it was
        assert ok("email", "hash.me@x.ir") is False and ok("sms", "+989121110077") is False
        assert ok("email", "fresh@x.ir") is True
        assert consent.suppression_of(conn, "email", "hash.me@x.ir").reason == "hard_bounce"
    with r.uow.begin() as tx:
        assert consent.lift(tx, "email", "hash.me@x.ir") is True
    with svc.ctx.engine.connect() as conn:
        assert conn.execute(sa.select(consent.sendable("email", "marketing", sa.literal("hash.me@x.ir")))).scalar()


def test_an_erased_customers_queued_messages_are_cancelled_not_sent_to_a_blank_address(svc):
    """The erasure blanked the address of a message still queued (or held for an A/B winner):
    the delivery workers then sent it to "" (a bounce that suppressed the empty address)."""
    cid = created(svc, email="gone@x.ir")
    with rt(svc).uow.begin() as tx:
        camp = tx.conn.execute(
            sa.text("INSERT INTO campaigns (display_name, channel) VALUES ('c', 'email') RETURNING id")
        ).scalar()
        for run, state in ((1, "sent"), (2, "queued"), (3, "held")):
            tx.conn.execute(
                messages.insert().values(
                    campaign_id=camp, run=run, customer_id=cid, channel="email", address="gone@x.ir", state=state
                )
            )
    deliver(svc, customer_message("customer.erased.v1", cid=cid, version=5))
    with svc.ctx.engine.connect() as conn:
        rows = conn.execute(
            sa.select(messages.c.run, messages.c.state, messages.c.address)
            .where(messages.c.campaign_id == camp)
            .order_by(messages.c.run)
        ).all()
    assert [tuple(r) for r in rows] == [(1, "sent", ""), (2, "cancelled", ""), (3, "cancelled", "")]


def test_consent_ledger_state_summary_and_sendable(svc, monkeypatch):
    cid = created(svc, email="c@x.ir", mobile="+989121234567")
    r = rt(svc)
    with r.uow.begin() as tx:
        consent.record(r, tx, consent.Change("email", "c@x.ir", "requested", "web_form", text_version="v1"))
        consent.record(
            r, tx, consent.Change("email", "c@x.ir", "granted", "confirmation_link", proof={"ip": "10.0.0.1"})
        )
    assert row(svc, audience, customer_id=cid).email_consent == "granted"
    changed = events(svc, "consent.changed.v1")
    assert [e.parse(ev.ConsentEvent).status for e in changed[-2:]] == ["pending", "granted"]

    def may(channel, address, env):
        with svc.ctx.engine.connect() as conn:
            return conn.execute(sa.select(consent.sendable(channel, "marketing", sa.literal(address), env))).scalar()

    opt_in = {"CONSENT_MODE_EMAIL": "opt_in"}
    assert may("email", "c@x.ir", {}) and may("email", "c@x.ir", opt_in)
    assert may("email", "never@x.ir", {}) and not may("email", "never@x.ir", opt_in)
    with r.uow.begin() as tx:  # unsubscribe from everything
        consent.record(r, tx, consent.Change("email", "c@x.ir", "revoked", "list_unsubscribe", purpose="all"))
    assert not may("email", "c@x.ir", {}) and row(svc, audience, customer_id=cid).email_consent == "revoked"
    with r.uow.begin() as tx:
        assert consent.suppress(tx, "email", "never@x.ir", "hard_bounce", "5.1.1")
        assert not consent.suppress(tx, "email", "never@x.ir", "hard_bounce", "5.1.1")
    assert not may("email", "never@x.ir", {})
    with svc.ctx.engine.connect() as conn:
        ledger = (
            conn.execute(
                sa.select(consent_ledger.c.action)
                .where(consent_ledger.c.address == "c@x.ir")
                .order_by(consent_ledger.c.id)
            )
            .scalars()
            .all()
        )
        assert ledger == ["requested", "granted", "revoked", "revoked"]  # marketing, and "all"
        assert (
            conn.execute(sa.select(consent_state.c.status).where(consent_state.c.address == "c@x.ir")).scalar()
            == "revoked"
        )


def test_addresses_are_normalised_or_rejected_naming_the_field():
    import pytest

    from crm_chassis.errors import InvalidArgument

    assert consent.normalise("email", " A@B.IR ") == "a@b.ir"
    assert consent.normalise("sms", "۰۹۱۲ ۱۲۳ ۴۵۶۷") == "+989121234567"
    for channel, bad in (("email", "no-at-sign"), ("sms", "12"), ("fax", "x"), ("email", "")):
        with pytest.raises(InvalidArgument) as err:
            consent.normalise(channel, bad, field_name="recipient")
        assert err.value.violations[0].field in ("recipient", "channel")


def test_events_of_three_producers_reach_the_projection_through_the_broker(svc, broker):
    """The service's consumer has one queue per producer (the parts' subscriptions merged) and
    applies customer, sales and support events from the real broker."""
    from campaign_svc.__main__ import SPEC

    assert sorted(s.domain for s in SPEC.subscriptions(svc.ctx)) == ["customer", "sales", "support"]
    cid = str(uuid.uuid4())
    conn = pika.BlockingConnection(pika.URLParameters(broker.url))
    chan = conn.channel()
    for e in (customer_message("customer.created.v1", cid=cid), order(cid, str(uuid.uuid4())), ticket(cid, "t9")):
        chan.basic_publish(e.exchange, e.routing_key, e.data, e.amqp_properties())
    conn.close()
    wait_for(
        lambda: (r := row(svc, audience, customer_id=cid)) is not None and r.order_count == 1 and r.ticket_count == 1,
        what="the audience row with its order and ticket",
    )


def test_a_batch_of_sales_events_gives_what_they_give_one_at_a_time(svc):
    """The consumer's batch handler (facts per event, each customer recomputed once, the hook
    once) leaves the audience as the events one by one do."""
    a, b, x, y = (created(svc) for _ in range(4))
    evs = lambda p, q: [  # noqa: E731
        order(p, str(uuid.uuid4()), total=2_000_000),
        invoice(p, str(uuid.uuid4()), total=700_000, paid=700_000),
        invoice(q, str(uuid.uuid4()), total=300_000, paid=300_000),
        invoice(p, str(uuid.uuid4()), total=100_000, paid=100_000),
    ]
    deliver(svc, *evs(a, b))  # one at a time
    sub = {s.domain: s for s in SPEC.subscriptions(svc.ctx)}["sales"]
    batch = evs(x, y)
    with svc.ctx.engine.begin() as conn:  # runs of one routing key, as the consumer makes them
        sub.batch["order.placed.v1"](conn, batch[:1])
        sub.batch["invoice.paid.v1"](conn, batch[1:])
    cols = ("order_count", "revenue", "last_purchase_time", "first_purchase_time")
    for one, many in ((a, x), (b, y)):
        r1, r2 = row(svc, audience, customer_id=one), row(svc, audience, customer_id=many)
        assert tuple(getattr(r1, c) for c in cols) == tuple(getattr(r2, c) for c in cols)
    assert row(svc, audience, customer_id=x).revenue == 800_000 and row(svc, audience, customer_id=x).order_count == 1


def test_a_batch_keeps_the_newest_fact_of_an_invoice_seen_twice(svc):
    """Two events of one invoice in a batch (paid, then an older issued one arriving late): the
    newest by event time wins, as one by one."""
    cid = created(svc)
    iid = str(uuid.uuid4())
    newer = invoice(cid, iid, total=900_000, paid=900_000, at=T0 + dt.timedelta(hours=1))
    older = invoice(cid, iid, key="invoice.issued.v1", total=900_000, paid=0, state="issued", at=T0)
    sub = {s.domain: s for s in SPEC.subscriptions(svc.ctx)}["sales"]
    with svc.ctx.engine.begin() as conn:
        sub.batch["invoice.paid.v1"](conn, [newer, newer])
        sub.batch["invoice.issued.v1"](conn, [older])
    fact = row(svc, audience_invoices, invoice_id=iid)
    assert (fact.state, fact.paid_total) == ("paid", 900_000)
    assert row(svc, audience, customer_id=cid).revenue == 900_000


def test_an_erasure_keeps_the_bot_chat_ids_suppressions_as_hashes_only(svc):
    """The customer's Telegram chat id (their consent entry names it) was left in plain text in
    the suppressions after an erasure: it goes as the e-mail and the phone do, its hash still
    stopping sends to it; another person's chat id is left alone."""
    from campaign_svc.tables import suppressions

    cid = created(svc, email="chat.me@x.ir")
    r = rt(svc)
    with r.uow.begin() as tx:
        consent.record(r, tx, consent.Change("telegram", "70011", "granted", "admin", customer_id=cid))
        consent.suppress(tx, "telegram", "70011", "stop", "")
        consent.suppress(tx, "telegram", "80022", "stop", "")  # someone else's
    deliver(svc, customer_message("customer.erased.v1", cid=cid, version=5))
    with svc.ctx.engine.connect() as conn:
        rows = {
            (x.channel, x.address)
            for x in conn.execute(sa.select(suppressions).where(suppressions.c.channel == "telegram"))
        }
        assert rows == {("telegram", consent.address_hash("70011")), ("telegram", "80022")}
        ok = conn.execute(sa.select(consent.sendable("telegram", "marketing", sa.literal("70011")))).scalar()
        assert ok is False
