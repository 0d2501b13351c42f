"""The core rules of tickets, whoever writes (ticketing.Tickets): first response set once,
exchanges counted, states moved by messages and recorded as intervals, events published,
redelivered messages kept once, hooks run in the transaction."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from crm.support.v1 import support_events_pb2 as ev
from crm_chassis.errors import FailedPrecondition, InvalidArgument
from support_svc.tables import ticket_intervals, ticket_messages
from support_svc.ticketing import STATE_ENUM, number_in, number_text
from tests.support.customers import customer_message

from .conftest import add_message, category_id, events, open_ticket, rt, ticket


def intervals(svc, tid):
    with svc.ctx.engine.connect() as conn:
        return [
            (r.state, r.end_time is None)
            for r in conn.execute(
                sa.select(ticket_intervals).where(ticket_intervals.c.ticket_id == tid).order_by(ticket_intervals.c.id)
            )
        ]


def test_numbers_are_quoted_and_found_in_subjects():
    assert number_text(123) == "T-000123"
    assert number_in("Re: [T-000123] کالا خراب") == 123
    assert number_in("RE: FW: T-42 again") == 42
    assert number_in("no number here") is None


def test_first_response_is_set_once_and_exchanges_count_question_answer_pairs(svc):
    t = open_ticket(svc)
    assert t.state == "new" and t.message_count == 1 and t.exchange_count == 0 and t.awaiting_reply
    add_message(svc, t.id, "note", "internal: check the warehouse")
    assert ticket(svc, t.id).state == "new"  # a note answers nobody
    add_message(svc, t.id, "agent", "پوزش می‌خواهیم، بررسی می‌کنیم.")
    first = ticket(svc, t.id)
    assert first.state == "open" and first.exchange_count == 1 and first.first_response_time is not None
    add_message(svc, t.id, "agent", "a second reply without a question between")
    assert ticket(svc, t.id).exchange_count == 1
    add_message(svc, t.id, "customer", "کی ارسال می‌شود؟")
    add_message(svc, t.id, "customer", "منتظرم")
    add_message(svc, t.id, "agent", "فردا")
    after = ticket(svc, t.id)
    assert after.exchange_count == 2 and after.message_count == 7
    assert after.first_response_time == first.first_response_time  # an update never overwrites it
    assert len(events(svc, "ticket.first_responded.v1", subject=f"tickets/{t.id}")) == 1


def test_customer_messages_end_waiting_and_reopen_resolved_tickets_and_closed_ones_refuse(svc):
    t = open_ticket(svc)
    r = rt(svc)
    with r.uow.begin() as tx:
        r.tickets.change_state(tx, t.id, "waiting_on_customer", "agent-1")
    add_message(svc, t.id, "customer", "here is the photo")
    assert ticket(svc, t.id).state == "open"
    with r.uow.begin() as tx:
        r.tickets.change_state(tx, t.id, "resolved", "agent-1")
    add_message(svc, t.id, "customer", "still broken")
    assert ticket(svc, t.id).state == "reopened"
    reopened = events(svc, "ticket.reopened.v1", ev.TicketEvent, subject=f"tickets/{t.id}")
    assert reopened[-1].previous_state == STATE_ENUM["resolved"]
    with r.uow.begin() as tx:
        r.tickets.change_state(tx, t.id, "closed", "agent-1")
    with pytest.raises(FailedPrecondition):
        add_message(svc, t.id, "customer", "hello?")
    states = [s for s, _ in intervals(svc, t.id)]
    assert states == ["new", "waiting_on_customer", "open", "resolved", "reopened", "closed"]
    assert [open_ for _, open_ in intervals(svc, t.id)] == [False] * 5 + [True]


def test_a_transition_that_makes_no_sense_is_refused(svc):
    t = open_ticket(svc)
    r = rt(svc)
    with r.uow.begin() as tx:
        r.tickets.change_state(tx, t.id, "closed", "agent-1")
    with pytest.raises(FailedPrecondition), r.uow.begin() as tx:
        r.tickets.change_state(tx, t.id, "open", "agent-1")
    with pytest.raises(InvalidArgument), r.uow.begin() as tx:
        r.tickets.change_state(tx, t.id, "sleeping", "agent-1")


def test_a_redelivered_message_is_one_message(svc):
    t = open_ticket(svc, external_id="<abc@mail.example>")
    again, created = add_message(
        svc, t.id, "customer", "the same mail", channel="email", external_id="<abc@mail.example>"
    )
    assert not created
    with svc.ctx.engine.connect() as conn:
        n = conn.execute(sa.select(sa.func.count()).where(ticket_messages.c.ticket_id == t.id)).scalar()
    assert n == 1 and ticket(svc, t.id).message_count == 1


def test_the_sender_is_matched_to_a_customer_from_the_projection(svc):
    from support_svc import customer_projection

    handlers = customer_projection.subscriptions(rt(svc))[0].handlers
    e = customer_message("customer.created.v1", email="Sara@Example.IR", mobile="+989121234567")
    with svc.ctx.engine.begin() as conn:
        handlers[e.routing_key](conn, e)
    cid = e.subject.removeprefix("customers/")
    assert open_ticket(svc, contact_address="sara@example.ir").customer_id == cid
    assert open_ticket(svc, channel="phone", contact_address="09121234567").customer_id == cid
    assert open_ticket(svc, contact_address="nobody@example.ir").customer_id == ""


def test_complaints_are_marked_from_their_category_and_events_carry_the_kpi_facts(svc):
    t = open_ticket(svc, category_id=category_id(svc, "complaint"))
    assert t.complaint
    opened = events(svc, "ticket.opened.v1", ev.TicketEvent, subject=f"tickets/{t.id}")[0]
    assert opened.complaint and opened.category_key == "complaint" and opened.number == number_text(t.number)
    assert opened.create_time.seconds > 0 and opened.version >= 1


def test_hooks_run_in_the_transaction_of_the_change(svc):
    seen = []
    r = rt(svc)
    r.hooks.opened.append(lambda tx, row: seen.append(("opened", row.id)))
    r.hooks.message.append(lambda tx, row, msg: seen.append(("message", msg.kind)))
    try:
        t = open_ticket(svc)
        add_message(svc, t.id, "agent", "hi")
    finally:
        r.hooks.opened.pop()
        r.hooks.message.pop()
    assert seen == [("opened", t.id), ("message", "customer"), ("message", "agent")]


def test_a_customer_merge_repoints_tickets_and_an_erasure_blanks_the_contact(svc):
    """support-svc consumes customer.merged / customer.erased: the merged customer's tickets
    belong to the survivor; an erased customer's contact address is blanked."""
    import uuid

    from support_svc import customer_projection
    from tests.support.customers import customer, customer_message, merged_message

    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    handlers = customer_projection.subscriptions(rt(svc))[0].handlers
    with svc.ctx.engine.begin() as conn:
        for cid, mail in ((a, "a@merge.ir"), (b, "b@merge.ir")):
            handlers["customer.created.v1"](conn, customer_message("customer.created.v1", cid=cid, email=mail))
    t = open_ticket(svc, customer_id=b, contact_address="b@merge.ir")
    with svc.ctx.engine.begin() as conn:
        handlers["customer.merged.v1"](conn, merged_message(customer(a, 2, email="a@merge.ir"), [b]))
    assert ticket(svc, t.id).customer_id == a
    with svc.ctx.engine.begin() as conn:
        handlers["customer.erased.v1"](conn, customer_message("customer.erased.v1", cid=a, version=5))
    assert ticket(svc, t.id).contact_address == ""
