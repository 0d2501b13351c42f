"""Timers fired in batches by support-svc's handlers: several SLA breaches (and offer expiries)
in one batch handler call, a ticket held by a change skipped and fired later, a failing one not
blocking the rest. The service's own timer worker is stopped here: the tests drive run_once."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa

from crm.support.v1 import support_events_pb2 as ev
from crm.support.v1 import ticket_pb2
from crm_chassis import timers
from support_svc import queue, routing, sla
from support_svc.sla import ticket_sla
from support_svc.tables import ticket_messages, tickets

from .conftest import events, make_agent, make_team, open_ticket, rt
from .test_sla import always_calendar, backdate, policy

PAST = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def worker(svc):
    """The service's timer worker, stopped: run_once fires what is due, in this thread."""
    w = rt(svc).timers
    w.stop()
    w._stopping.clear()  # stopped, yet run_once fires (a stopped worker would release its claims)
    with svc.ctx.engine.begin() as conn:  # the queue's compaction (every 5 s) would count in run_once
        timers.cancel(conn, queue.COMPACT, "all")
    return w


@pytest.fixture(scope="module")
def desk(svc, ch, worker):
    from crm.support.v1 import sla_pb2 as pb
    from crm.support.v1 import sla_pb2_grpc

    cal = always_calendar(svc, "batch 24/7")
    team = make_team(svc, "batch desk", manager_id="maryam", calendar_id=cal)
    p = policy(
        sla_pb2_grpc.SlaServiceStub(ch),
        "every ticket",
        position=0,
        first_response_minutes=10,
        breach_actions=[pb.SLA_BREACH_ACTION_NOTIFY_MANAGER],
    )
    return {"team": team, "policy": p.name}


@pytest.fixture
def batch_sizes(worker):
    """The sizes of the batches the SLA breach handler is called with."""
    spec = worker._kinds[sla.BREACH]
    original, sizes = spec.batch, []

    def counting(conn, due):
        sizes.append(len(due))
        return original(conn, due)

    spec.batch = counting
    yield sizes
    spec.batch = original


def overdue_tickets(svc, desk, n: int) -> list[str]:
    """n tickets nobody answered for 20 minutes: their first-response breach is due."""
    ids = [str(open_ticket(svc, team_id=desk["team"], subject=f"batch {i}").id) for i in range(n)]
    for tid in ids:
        backdate(svc, tid, 20)
    assert sla.engine(rt(svc)).recompute_ids(ids) == n
    return ids


def breaches(svc, tid) -> list:
    return events(svc, "ticket.sla_breached.v1", ev.SlaEvent, subject=f"tickets/{tid}")


def breach_timer(svc, tid):
    with svc.ctx.engine.connect() as conn:
        return timers.get(conn, sla.BREACH, f"{tid}:first_response")


def notes(svc, tid) -> list[str]:
    with svc.ctx.engine.connect() as conn:
        q = sa.select(ticket_messages.c.body).where(
            ticket_messages.c.ticket_id == tid, ticket_messages.c.kind == "system"
        )
        return list(conn.execute(q).scalars())


def breached(svc, tid) -> bool:
    with svc.ctx.engine.connect() as conn:
        return conn.execute(
            sa.select(ticket_sla.c.first_response_breached).where(ticket_sla.c.ticket_id == tid)
        ).scalar_one()


def retry_now(svc, tid) -> None:
    """The retry's back-off is over (attempts kept)."""
    t = timers.timers
    with svc.ctx.engine.begin() as conn:
        conn.execute(
            t.update()
            .where(t.c.kind == sla.BREACH, t.c.key == f"{tid}:first_response")
            .values(next_attempt_at=sa.func.now() - sa.text("interval '1 second'"))
        )


def test_several_due_breaches_fire_in_one_batch_each_once_with_its_action(svc, desk, worker, batch_sizes):
    ids = overdue_tickets(svc, desk, 4)
    assert worker.run_once() == 4
    assert batch_sizes == [4]  # one handler call for the four
    for tid in ids:
        (b,) = breaches(svc, tid)
        assert b.metric == "first_response" and b.policy == desk["policy"] and list(b.actions) == ["notify_manager"]
        assert b.team == f"teams/{desk['team']}"
        (note,) = notes(svc, tid)
        assert "agents/maryam" in note
        assert breached(svc, tid) and breach_timer(svc, tid) is None
    assert worker.run_once() == 0  # nothing fires twice
    assert all(len(breaches(svc, tid)) == 1 for tid in ids)


def test_the_notes_of_a_batch_are_one_message_each_with_their_events_fields(svc, desk, worker):
    """notify_manager's notes are written set-based for the batch (Tickets.add_notes): each
    ticket gets one system message, one more version and message, and a message_added event
    whose numbers and SLA fields are those of the ticket as it is afterwards."""
    ids = overdue_tickets(svc, desk, 3)
    with svc.ctx.engine.connect() as conn:
        was = {str(r.id): r for r in conn.execute(sa.select(tickets).where(tickets.c.id.in_(ids)))}
    assert worker.run_once() == 3
    with svc.ctx.engine.connect() as conn:
        now = {str(r.id): r for r in conn.execute(sa.select(tickets).where(tickets.c.id.in_(ids)))}
    for tid in ids:
        assert now[tid].version == was[tid].version + 1
        assert now[tid].message_count == was[tid].message_count + 1
        assert now[tid].first_response_time is None and now[tid].state == was[tid].state  # a note answers nothing
        e = events(svc, "ticket.message_added.v1", ev.TicketEvent, subject=f"tickets/{tid}")[-1]
        assert e.message_kind == ticket_pb2.TicketMessage.KIND_SYSTEM and e.version == now[tid].version
        assert e.message_count == now[tid].message_count
        assert e.sla_policy == desk["policy"]
        assert len(notes(svc, tid)) == 1
        assert e.message.endswith("/messages/" + str(_note_id(svc, tid)))


def _note_id(svc, tid):
    with svc.ctx.engine.connect() as conn:
        q = sa.select(ticket_messages.c.id).where(
            ticket_messages.c.ticket_id == tid, ticket_messages.c.kind == "system"
        )
        return conn.execute(q).scalar_one()


def test_a_ticket_held_by_a_change_is_skipped_and_fired_later(svc, desk, worker, batch_sizes):
    free_a, held, free_b = overdue_tickets(svc, desk, 3)
    with svc.ctx.engine.connect() as holder:  # an agent's change holds the ticket right now
        holder.execute(sa.select(tickets.c.id).where(tickets.c.id == held).with_for_update())
        assert worker.run_once() == 3
        holder.rollback()
    assert batch_sizes == [3]
    assert len(breaches(svc, free_a)) == len(breaches(svc, free_b)) == 1  # not held up by the busy one
    assert breaches(svc, held) == [] and not breached(svc, held)
    t = breach_timer(svc, held)
    assert t is not None and t.attempts == 1 and "locked" in t.last_error
    retry_now(svc, held)
    assert worker.run_once() == 1
    (b,) = breaches(svc, held)
    assert list(b.actions) == ["notify_manager"] and breached(svc, held) and breach_timer(svc, held) is None
    assert len(breaches(svc, free_a)) == len(breaches(svc, free_b)) == 1


def test_a_failing_firing_does_not_block_the_rest_of_its_batch(svc, desk, worker, batch_sizes, monkeypatch):
    ids = overdue_tickets(svc, desk, 4)
    poison = ids[2]
    eng = sla.engine(rt(svc))
    notice = eng._notice

    def failing(s, metric, managers):
        if str(s.ticket.id) == poison:
            raise RuntimeError("the manager's note failed")
        return notice(s, metric, managers)

    monkeypatch.setattr(eng, "_notice", failing)
    assert worker.run_once() == 4
    assert batch_sizes == [4, 1, 1, 1, 1]  # the batch failed: each alone
    for tid in ids:
        assert len(breaches(svc, tid)) == (0 if tid == poison else 1)
        assert len(notes(svc, tid)) == (0 if tid == poison else 1)
    assert not breached(svc, poison)  # its flag rolled back with the rest of its firing
    t = breach_timer(svc, poison)
    assert t.attempts == 1 and t.last_error == "RuntimeError: the manager's note failed"
    monkeypatch.setattr(eng, "_notice", notice)  # mended
    retry_now(svc, poison)
    assert worker.run_once() == 1
    assert len(breaches(svc, poison)) == 1 and len(notes(svc, poison)) == 1
    assert all(len(breaches(svc, tid)) == 1 for tid in ids)


def test_offers_expiring_together_are_re_offered_in_one_batch(svc, worker):
    team = make_team(svc, "batch offers", strategy="round_robin")
    for a in ("bo-a", "bo-b", "bo-c", "bo-d"):
        make_agent(svc, a, teams=[team])
    ts = [open_ticket(svc, team_id=team, subject=f"offer {i}") for i in range(3)]

    def offers(tid):
        with svc.ctx.engine.connect() as conn:
            q = sa.select(routing.ticket_offers).where(routing.ticket_offers.c.ticket_id == tid)
            return conn.execute(q.order_by(routing.ticket_offers.c.attempt)).all()

    first = {t.id: offers(t.id)[0] for t in ts}
    spec = worker._kinds[routing.EXPIRE]
    original, sizes = spec.batch, []
    spec.batch = lambda conn, due: (sizes.append(len(due)), original(conn, due))[1]
    try:
        with svc.ctx.engine.begin() as conn:
            for o in first.values():
                assert timers.reschedule(conn, routing.EXPIRE, str(o.id), PAST)
        held = ts[1].id
        with svc.ctx.engine.connect() as holder:  # a change holds one of the tickets
            holder.execute(sa.select(tickets.c.id).where(tickets.c.id == held).with_for_update())
            assert worker.run_once() == 3
            holder.rollback()
        assert sizes == [3]
        for t in ts:
            got = offers(t.id)
            if t.id == held:
                assert [o.state for o in got] == ["offered"]  # retried soon
                continue
            assert [o.state for o in got] == ["expired", "offered"]
            assert got[1].agent_id != got[0].agent_id and got[1].attempt == 2
            (e,) = events(svc, "ticket.offer_expired.v1", ev.OfferEvent, subject=f"tickets/{t.id}")
            assert e.offer == f"ticketOffers/{got[0].id}"
            offered = events(svc, "ticket.offered.v1", ev.OfferEvent, subject=f"tickets/{t.id}")
            assert [o.offer for o in offered] == [f"ticketOffers/{got[0].id}", f"ticketOffers/{got[1].id}"]
        t_ = timers.timers
        with svc.ctx.engine.begin() as conn:  # its back-off is over
            row = conn.execute(sa.select(t_).where(t_.c.kind == routing.EXPIRE, t_.c.key == str(first[held].id))).one()
            assert row.attempts == 1 and "locked" in row.last_error
            conn.execute(t_.update().where(t_.c.id == row.id).values(next_attempt_at=PAST))
        assert worker.run_once() == 1
        assert [o.state for o in offers(held)] == ["expired", "offered"]
    finally:
        spec.batch = original
