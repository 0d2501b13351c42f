"""Push routing: one live offer per ticket chosen by the team's strategy, accept / decline /
expiry with re-offer, races answered exactly once, capacity freed -> offered at once, durable
offers across a restart. The clock is the tests': timers are moved into the past and fired."""

from __future__ import annotations

import datetime as dt
import threading
import uuid

import grpc
import pytest
import sqlalchemy as sa

from crm.support.v1 import agents_pb2, agents_pb2_grpc, routing_pb2, routing_pb2_grpc
from crm.support.v1 import support_events_pb2 as ev
from crm_chassis import timers
from support_svc.__main__ import SPEC
from support_svc.routing import EXPIRE, ticket_offers
from support_svc.tables import agents, categories
from tests.support.harness import channel, start_service

from .conftest import agent_md, category_id, events, make_agent, make_team, manager_md, open_ticket, rt, ticket

PAST = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def offers(svc, ticket_id) -> list:
    with svc.ctx.engine.connect() as conn:
        return conn.execute(
            sa.select(ticket_offers).where(ticket_offers.c.ticket_id == ticket_id).order_by(ticket_offers.c.attempt)
        ).all()


def live(svc, ticket_id):
    found = [o for o in offers(svc, ticket_id) if o.state == "offered"]
    assert len(found) <= 1
    return found[0] if found else None


def expire_now(svc, offer_id) -> None:
    """The offer's timeout passes: its timer moved into the past and due timers fired."""
    with svc.ctx.engine.begin() as conn:
        assert timers.reschedule(conn, EXPIRE, str(offer_id), PAST)
    rt(svc).timers.run_once()


def stub(ch):
    return routing_pb2_grpc.RoutingServiceStub(ch)


def accept(ch, offer, who):
    return stub(ch).AcceptOffer(routing_pb2.AcceptOfferRequest(name=f"ticketOffers/{offer.id}"), metadata=agent_md(who))


def team_of(svc, n=3, strategy="round_robin", **agent_kw):
    team = make_team(svc, uid("team"), strategy=strategy)
    names = sorted(uid(f"a{i}") for i in range(n))
    for a in names:
        make_agent(svc, a, teams=[team], **agent_kw)
    return team, names


def test_round_robin_offers_in_turn_across_three_agents_and_wraps(svc):
    team, (a, b, c) = team_of(svc)
    got = [live(svc, open_ticket(svc, team_id=team).id).agent_id for _ in range(4)]
    assert got == [a, b, c, a]
    e = events(svc, "ticket.offered.v1", ev.OfferEvent)[-1]
    assert e.agent == f"agents/{a}" and e.team == f"teams/{team}" and e.strategy == "round_robin" and e.attempt == 1
    assert e.expire_time.ToDatetime() > e.offer_time.ToDatetime()


def test_least_loaded_counts_channel_weights_and_capacity(svc, ch):
    team, (a, b) = team_of(svc, 2, strategy="least_loaded")
    small = uid("small")
    make_agent(svc, small, teams=[team], capacity=4)  # a call (5) never fits
    phone = open_ticket(svc, channel="phone", team_id=team)
    first = live(svc, phone.id)
    assert first.agent_id in (a, b) and first.agent_id != small
    big, other = first.agent_id, ({a, b} - {first.agent_id}).pop()
    accept(ch, first, big)
    assert ticket(svc, phone.id).assignee_id == big
    # big carries 5/10; the e-mails (1 each) go to the less loaded ones
    nxt = [live(svc, open_ticket(svc, team_id=team).id).agent_id for _ in range(3)]
    assert big not in nxt[:2] and set(nxt[:2]) == {other, small}
    agent = agents_pb2_grpc.AgentServiceStub(ch).GetAgent(
        agents_pb2.GetAgentRequest(name=f"agents/{big}"), metadata=agent_md(big)
    )
    assert agent.load >= 5
    phone2 = open_ticket(svc, channel="phone", team_id=team)
    assert live(svc, phone2.id).agent_id != small


def test_skills_strategy_needs_the_category_skill_and_the_language(svc):
    team = make_team(svc, uid("skills"), strategy="skills")
    plain, fa_billing, en_billing = uid("plain"), uid("fab"), uid("enb")
    make_agent(svc, plain, teams=[team])
    make_agent(svc, fa_billing, teams=[team], skills=["billing"], capacity=50)
    make_agent(svc, en_billing, teams=[team], skills=["billing"], languages=["en"])
    with svc.ctx.engine.begin() as conn:
        conn.execute(categories.update().where(categories.c.key == "billing").values(skill="billing"))
    billing = category_id(svc, "billing")
    for _ in range(3):
        assert live(svc, open_ticket(svc, team_id=team, category_id=billing).id).agent_id == fa_billing
    assert live(svc, open_ticket(svc, team_id=team, category_id=billing, language="en").id).agent_id == en_billing
    assert live(svc, open_ticket(svc, team_id=team, category_id=billing, language="de").id) is None  # waits


def test_decline_goes_to_the_next_agent_and_never_back_to_the_decliner(svc, ch):
    team, (a, b) = team_of(svc, 2)
    t = open_ticket(svc, team_id=team)
    first = live(svc, t.id)
    with pytest.raises(grpc.RpcError) as err:
        stub(ch).DeclineOffer(
            routing_pb2.DeclineOfferRequest(name=f"ticketOffers/{first.id}"), metadata=agent_md(first.agent_id)
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "reason" in err.value.details()
    declined = stub(ch).DeclineOffer(
        routing_pb2.DeclineOfferRequest(name=f"ticketOffers/{first.id}", reason="on a call"),
        metadata=agent_md(first.agent_id),
    )
    assert declined.state == routing_pb2.TicketOffer.STATE_DECLINED and declined.reason == "on a call"
    second = live(svc, t.id)
    assert second.agent_id != first.agent_id and second.attempt == 2
    e = events(svc, "ticket.offer_declined.v1", ev.OfferEvent, subject=f"tickets/{t.id}")
    assert [x.reason for x in e] == ["on a call"]
    stub(ch).DeclineOffer(
        routing_pb2.DeclineOfferRequest(name=f"ticketOffers/{second.id}", reason="not my area"),
        metadata=agent_md(second.agent_id),
    )
    assert live(svc, t.id) is None  # both declined: it waits
    with pytest.raises(grpc.RpcError) as err:  # an answered offer is closed
        accept(ch, second, second.agent_id)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "no longer open" in err.value.details()


def test_an_expired_offer_goes_to_the_next_agent_and_skips_who_let_it_expire(svc, ch):
    team, (a, b, c) = team_of(svc)
    t = open_ticket(svc, team_id=team)
    first = live(svc, t.id)
    expire_now(svc, first.id)
    second = live(svc, t.id)
    assert second is not None and second.agent_id != first.agent_id
    expire_now(svc, second.id)
    third = live(svc, t.id)
    assert third.agent_id not in (first.agent_id, second.agent_id)
    expire_now(svc, third.id)
    assert live(svc, t.id) is None
    states = [(o.agent_id, o.state, o.attempt) for o in offers(svc, t.id)]
    assert states == [(first.agent_id, "expired", 1), (second.agent_id, "expired", 2), (third.agent_id, "expired", 3)]
    assert len(events(svc, "ticket.offer_expired.v1", ev.OfferEvent, subject=f"tickets/{t.id}")) == 3
    # ListOffers shows the whole history, newest first
    listed = stub(ch).ListOffers(routing_pb2.ListOffersRequest(parent=f"tickets/{t.id}"), metadata=manager_md("boss"))
    assert [o.attempt for o in listed.offers] == [3, 2, 1]
    assert all(o.state == routing_pb2.TicketOffer.STATE_EXPIRED and o.HasField("answer_time") for o in listed.offers)


def test_list_offers_history_and_my_pending_offers(svc, ch):
    team, (a, b) = team_of(svc, 2)
    t = open_ticket(svc, team_id=team)
    first = live(svc, t.id)
    stub(ch).DeclineOffer(
        routing_pb2.DeclineOfferRequest(name=f"ticketOffers/{first.id}", reason="busy"),
        metadata=agent_md(first.agent_id),
    )
    second = live(svc, t.id)
    mine = stub(ch).ListOffers(routing_pb2.ListOffersRequest(parent="agents/me"), metadata=agent_md(second.agent_id))
    assert [o.name for o in mine.offers] == [f"ticketOffers/{second.id}"]
    accept(ch, second, second.agent_id)
    assert (
        not stub(ch)
        .ListOffers(routing_pb2.ListOffersRequest(parent="agents/me"), metadata=agent_md(second.agent_id))
        .offers
    )
    history = stub(ch).ListOffers(
        routing_pb2.ListOffersRequest(parent=f"tickets/{t.id}", page_size=1), metadata=agent_md(a)
    )
    assert len(history.offers) == 1 and history.next_page_token
    rest = stub(ch).ListOffers(
        routing_pb2.ListOffersRequest(parent=f"tickets/{t.id}", page_size=1, page_token=history.next_page_token),
        metadata=agent_md(a),
    )
    states = [history.offers[0].state, rest.offers[0].state]
    assert states == [routing_pb2.TicketOffer.STATE_ACCEPTED, routing_pb2.TicketOffer.STATE_DECLINED]
    with pytest.raises(grpc.RpcError) as err:  # another agent's offers are for managers
        stub(ch).ListOffers(
            routing_pb2.ListOffersRequest(parent=f"agents/{b}"), metadata=agent_md(a if b != a else "x")
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as err:
        stub(ch).ListOffers(routing_pb2.ListOffersRequest(parent=""), metadata=agent_md(a))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_two_threads_accepting_one_offer_make_exactly_one_assignment(svc, ch):
    team, (a,) = team_of(svc, 1)
    t = open_ticket(svc, team_id=team)
    offer = live(svc, t.id)
    with pytest.raises(grpc.RpcError) as err:
        accept(ch, offer, "someone-else")
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    barrier, results = threading.Barrier(2), []

    def go():
        barrier.wait()
        try:
            results.append(accept(ch, offer, a).state)
        except grpc.RpcError as e:
            results.append(e.code())

    threads = [threading.Thread(target=go) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    assert sorted(map(str, results)) == sorted(
        map(str, [routing_pb2.TicketOffer.STATE_ACCEPTED, grpc.StatusCode.FAILED_PRECONDITION])
    )
    assert ticket(svc, t.id).assignee_id == a
    assert len(events(svc, "ticket.assigned.v1", subject=f"tickets/{t.id}")) == 1
    assert len(events(svc, "ticket.offer_accepted.v1", subject=f"tickets/{t.id}")) == 1
    with svc.ctx.engine.connect() as conn:
        assert timers.get(conn, EXPIRE, str(offer.id)) is None  # the timeout was cancelled


def test_accept_racing_the_expiry_has_exactly_one_winner(svc, ch):
    for _ in range(4):
        team, (a, b) = team_of(svc, 2)
        t = open_ticket(svc, team_id=team)
        offer = live(svc, t.id)
        with svc.ctx.engine.begin() as conn:
            timers.reschedule(conn, EXPIRE, str(offer.id), PAST)
        barrier, outcome = threading.Barrier(2), {}

        def answer(offer=offer, barrier=barrier, outcome=outcome):
            barrier.wait()
            try:
                accept(ch, offer, offer.agent_id)
                outcome["accept"] = "won"
            except grpc.RpcError as e:
                outcome["accept"] = e.code()

        def fire(barrier=barrier):
            barrier.wait()
            rt(svc).timers.run_once()

        threads = [threading.Thread(target=answer), threading.Thread(target=fire)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(10)
        rt(svc).timers.run_once()
        state = {o.id: o.state for o in offers(svc, t.id)}[offer.id]
        if outcome["accept"] == "won":
            assert state == "accepted" and ticket(svc, t.id).assignee_id == offer.agent_id
            assert live(svc, t.id) is None and len(offers(svc, t.id)) == 1
        else:
            assert outcome["accept"] == grpc.StatusCode.FAILED_PRECONDITION
            assert state == "expired" and ticket(svc, t.id).assignee_id == ""
            assert live(svc, t.id).agent_id != offer.agent_id


def test_a_resolved_ticket_frees_room_and_a_waiting_ticket_is_offered_at_once(svc, ch):
    team, (a,) = team_of(svc, 1, capacity=1)
    first = open_ticket(svc, team_id=team)
    accept(ch, live(svc, first.id), a)
    waiting = open_ticket(svc, team_id=team)
    urgent = open_ticket(svc, team_id=team, priority="urgent")
    assert live(svc, waiting.id) is None and live(svc, urgent.id) is None  # full: they wait
    r = rt(svc)
    with r.uow.begin() as tx:
        r.tickets.change_state(tx, first.id, "resolved", a)
    assert live(svc, urgent.id).agent_id == a  # priority first, at once (no sweep)
    assert live(svc, waiting.id) is None  # a is full again
    with r.uow.begin() as tx:  # unassigned: offered again
        r.tickets.update(tx, urgent.id, {"assignee_id": ""}, "boss")
    assert live(svc, urgent.id) is not None or live(svc, waiting.id) is not None


def test_offline_agents_are_never_offered_and_going_online_takes_the_waiting_ones(svc, ch):
    team = make_team(svc, uid("presence"))
    off, on = uid("off"), uid("on")
    make_agent(svc, off, teams=[team], presence="offline")
    make_agent(svc, on, teams=[team], presence="online", capacity=2)
    ts = [open_ticket(svc, team_id=team) for _ in range(3)]
    assert [live(svc, t.id).agent_id if live(svc, t.id) else None for t in ts] == [on, on, None]
    agents_stub = agents_pb2_grpc.AgentServiceStub(ch)
    with pytest.raises(grpc.RpcError) as err:  # an agent sets only their own presence
        agents_stub.SetPresence(
            agents_pb2.SetPresenceRequest(name=f"agents/{off}", presence=agents_pb2.PRESENCE_ONLINE),
            metadata=agent_md(on),
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    agents_stub.SetPresence(
        agents_pb2.SetPresenceRequest(name=f"agents/{off}", presence=agents_pb2.PRESENCE_ONLINE), metadata=agent_md(off)
    )
    assert live(svc, ts[2].id).agent_id == off
    # going offline withdraws the pending offers; they go to someone with room (nobody: wait)
    agents_stub.SetPresence(
        agents_pb2.SetPresenceRequest(name=f"agents/{on}", presence=agents_pb2.PRESENCE_OFFLINE),
        metadata=manager_md("boss"),
    )
    states = [o.state for o in offers(svc, ts[0].id)]
    assert states[0] == "withdrawn" and live(svc, ts[0].id).agent_id == off


def test_after_call_work_holds_offers_until_busy_until_passes(svc):
    from support_svc.routing import AVAILABLE, set_busy_until

    team, (a,) = team_of(svc, 1)
    r = rt(svc)
    with r.uow.begin() as tx:
        set_busy_until(tx, a, dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    t = open_ticket(svc, team_id=team)
    assert live(svc, t.id) is None
    with svc.ctx.engine.begin() as conn:  # the hour passes
        conn.execute(agents.update().where(agents.c.id == a).values(busy_until=PAST))
        timers.reschedule(conn, AVAILABLE, a, PAST)
    r.timers.run_once()
    assert live(svc, t.id).agent_id == a


def test_a_pending_offer_survives_a_restart_and_still_expires_and_reoffers(databases, broker):
    url = databases.fresh("routing_restart")
    first = start_service(SPEC, url, broker.url, relay=False)
    try:
        team, (a, b) = team_of(first, 2)
        t = open_ticket(first, team_id=team)
        offer = live(first, t.id)
    finally:
        first.stop(0)
    second = start_service(SPEC, url, broker.url, relay=False)
    try:
        expire_now(second, offer.id)
        states = [(o.agent_id, o.state) for o in offers(second, t.id)]
        assert states[0] == (offer.agent_id, "expired")
        nxt = live(second, t.id)
        assert nxt is not None and nxt.agent_id != offer.agent_id
        with channel(second) as ch:
            accept(ch, nxt, nxt.agent_id)
        assert ticket(second, t.id).assignee_id == nxt.agent_id
    finally:
        second.stop(0)


def test_a_ticket_moved_or_assigned_by_hand_loses_its_offer(svc):
    team, (a, b) = team_of(svc, 2)
    other, (c,) = team_of(svc, 1)
    t = open_ticket(svc, team_id=team)
    first = live(svc, t.id)
    r = rt(svc)
    with r.uow.begin() as tx:
        r.tickets.update(tx, t.id, {"team_id": other}, "boss")
    assert offers(svc, t.id)[0].state == "withdrawn" and live(svc, t.id).agent_id == c
    (gone,) = events(svc, "ticket.offer_withdrawn.v1", ev.OfferEvent, subject=f"tickets/{t.id}")
    assert gone.agent == f"agents/{first.agent_id}" and gone.reason == "ticket moved to another team"
    with r.uow.begin() as tx:
        r.tickets.update(tx, t.id, {"assignee_id": a}, "boss")
    assert live(svc, t.id) is None
    with svc.ctx.engine.connect() as conn:
        assert timers.get(conn, EXPIRE, str(first.id)) is None
