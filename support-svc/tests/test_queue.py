"""The live queue view: counts per team and agent from the tickets, live offers and SLA clocks
of a hand-built desk, one team filter, the at-risk list soonest first, and bad input."""

from __future__ import annotations

import datetime as dt
import uuid

import grpc
import pytest
import sqlalchemy as sa

from crm.support.v1 import queue_pb2 as pb
from crm.support.v1 import queue_pb2_grpc
from support_svc import queue
from support_svc.routing import ticket_offers

from .conftest import ADMIN, agent_md, make_agent, make_team, open_ticket, rt


@pytest.fixture(scope="module")
def stub(ch):
    return queue_pb2_grpc.QueueServiceStub(ch)


def clock(svc, ticket_id, **values):
    """Set a ticket's SLA clock row as the SLA part would (first_response_due, ..._breached)."""
    with svc.ctx.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM ticket_sla WHERE ticket_id = :t"), {"t": ticket_id})
        cols = ", ".join(["ticket_id", *values])
        params = ", ".join([":ticket_id", *(f":{k}" for k in values)])
        conn.execute(sa.text(f"INSERT INTO ticket_sla ({cols}) VALUES ({params})"), {"ticket_id": ticket_id, **values})


def test_the_view_counts_a_hand_built_desk(svc, stub):
    u = uuid.uuid4().hex[:6]
    team = make_team(svc, f"queue-{u}", offer_timeout_seconds=600)
    other = make_team(svc, f"queue-other-{u}")
    a1 = make_agent(svc, f"qa1-{u}", teams=[team], capacity=10)
    make_agent(svc, f"qa2-{u}", teams=[team], presence="offline")
    # Opening offers the first ticket to the only online agent (routing's hook); the rest wait.
    offered = open_ticket(svc, team_id=team)
    waiting = [open_ticket(svc, team_id=team, channel="phone") for _ in range(2)]  # weight 5 each
    mine = open_ticket(svc, team_id=team)
    r = rt(svc)
    with r.uow.begin() as tx:
        r.tickets.update(tx, mine.id, {"assignee_id": a1}, "ada")
        r.tickets.change_state(tx, waiting[1].id, "waiting_on_customer", "ada")
    done = open_ticket(svc, team_id=team)
    with r.uow.begin() as tx:
        r.tickets.change_state(tx, done.id, "resolved", "ada")
    open_ticket(svc, team_id=other)
    now = dt.datetime.now(dt.UTC)
    clock(svc, mine.id, first_response_due=now + dt.timedelta(minutes=10))
    clock(svc, waiting[0].id, first_response_due=now - dt.timedelta(minutes=5), first_response_breached=True)
    clock(svc, offered.id, resolution_due=now + dt.timedelta(hours=5))

    with svc.ctx.engine.connect() as conn:
        live = conn.execute(
            sa.select(sa.func.count()).where(ticket_offers.c.team_id == team, ticket_offers.c.state == "offered")
        ).scalar()
    view = stub.GetQueueView(pb.GetQueueViewRequest(team=f"teams/{team}"), metadata=agent_md("omid"))
    assert [t.team for t in view.teams] == [f"teams/{team}"]
    t = view.teams[0]
    assert (t.open, t.waiting_on_customer, t.waiting_on_third_party) == (3, 1, 0)
    assert live >= 1 and t.being_offered == live
    assert t.unassigned == 3 - 1 - live  # open, not assigned (mine), not being offered
    assert (t.about_to_breach, t.breached, t.agents_online) == (1, 1, 1)
    assert t.oldest_unassigned_time.ToDatetime(dt.UTC) <= offered.create_time
    agents = {a.agent: a for a in view.agents}
    assert set(agents) == {f"agents/qa1-{u}", f"agents/qa2-{u}"}
    me = agents[f"agents/qa1-{u}"]
    assert me.assigned_open == 1 and me.about_to_breach == 1 and me.presence == "online"
    assert me.pending_offers == live and me.load >= 1 and me.capacity == 10
    at_risk = [x.ticket for x in view.at_risk]
    # Breached first (its due time is past), then the one due in 10 minutes; 5 hours is beyond the horizon.
    assert at_risk == [f"tickets/{waiting[0].id}", f"tickets/{mine.id}"]
    assert view.at_risk[0].breached and view.at_risk[0].metric == "first_response"
    assert view.at_risk[1].metric == "first_response" and not view.at_risk[1].breached
    wide = stub.GetQueueView(pb.GetQueueViewRequest(team=f"teams/{team}", horizon_minutes=600), metadata=ADMIN)
    assert wide.teams[0].about_to_breach == 2 and len(wide.at_risk) == 3
    everyone = stub.GetQueueView(pb.GetQueueViewRequest(), metadata=ADMIN)
    assert {f"teams/{team}", f"teams/{other}"} <= {x.team for x in everyone.teams}


def test_bad_input_names_the_field_and_an_unknown_team_is_not_found(stub):
    for req, field in (
        (pb.GetQueueViewRequest(horizon_minutes=-1), "horizon_minutes"),
        (pb.GetQueueViewRequest(at_risk_limit=500), "at_risk_limit"),
        (pb.GetQueueViewRequest(team="teams/nope"), "team"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            stub.GetQueueView(req, metadata=ADMIN)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.GetQueueView(pb.GetQueueViewRequest(team=f"teams/{uuid.uuid4()}"), metadata=ADMIN)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


RECOUNT = """
SELECT team_id::text, assignee_id, state, channel, sla_breached, count(*) AS n FROM tickets
 WHERE state NOT IN ('resolved', 'closed') GROUP BY 1, 2, 3, 4, 5
"""
ROLLED = """
SELECT team_id::text, assignee_id, state, channel, breached, sum(n)::bigint AS n
  FROM (SELECT team_id, assignee_id, state, channel, breached, n FROM queue_rollup
        UNION ALL SELECT team_id, assignee_id, state, channel, breached, n FROM queue_deltas) c
 GROUP BY 1, 2, 3, 4, 5 HAVING sum(n) <> 0
"""


def counts(svc, sql: str) -> set:
    with svc.ctx.engine.connect() as conn:
        return {tuple(r) for r in conn.execute(sa.text(sql))}


def test_the_rollup_counts_what_the_tickets_say_through_every_kind_of_change(svc, stub):
    u = uuid.uuid4().hex[:6]
    team, other = make_team(svc, f"roll-{u}"), make_team(svc, f"roll-other-{u}")
    agent = make_agent(svc, f"roll-{u}", teams=[team], capacity=50)
    ts = [open_ticket(svc, team_id=team, channel=ch) for ch in ("email", "phone", "email", "web")]
    r = rt(svc)
    with r.uow.begin() as tx:
        r.tickets.update(tx, ts[0].id, {"assignee_id": agent}, "ada")
        r.tickets.update(tx, ts[1].id, {"team_id": other}, "ada")  # moves between teams
        r.tickets.change_state(tx, ts[2].id, "waiting_on_customer", "ada")
        r.tickets.change_state(tx, ts[3].id, "resolved", "ada")  # leaves the counts
    clock(svc, ts[0].id, first_response_due=dt.datetime.now(dt.UTC), first_response_breached=True)
    assert counts(svc, ROLLED) == counts(svc, RECOUNT)
    before = stub.GetQueueView(pb.GetQueueViewRequest(), metadata=ADMIN)
    mine = {t.team: t for t in before.teams}[f"teams/{team}"]
    assert (mine.open, mine.waiting_on_customer, mine.breached) == (1, 1, 1)
    assert {t.team: t for t in before.teams}[f"teams/{other}"].open >= 1
    with svc.ctx.engine.begin() as conn:
        queue.compact(conn)
        assert conn.execute(sa.text("SELECT count(*) FROM queue_deltas")).scalar() == 0
    assert counts(svc, ROLLED) == counts(svc, RECOUNT)  # nothing counted twice or lost
    after = stub.GetQueueView(pb.GetQueueViewRequest(), metadata=ADMIN)
    assert list(after.teams) == list(before.teams) and list(after.agents) == list(before.agents)
    with svc.ctx.engine.begin() as conn:  # a breach lifted by the SLA part moves the count back
        conn.execute(
            sa.text("UPDATE ticket_sla SET first_response_breached = false WHERE ticket_id = :t"), {"t": ts[0].id}
        )
    assert counts(svc, ROLLED) == counts(svc, RECOUNT)
    assert {t.team: t for t in stub.GetQueueView(pb.GetQueueViewRequest(), metadata=ADMIN).teams}[
        f"teams/{team}"
    ].breached == 0


def test_changes_of_one_team_do_not_wait_on_each_other_and_an_open_delta_waits_for_its_commit(svc):
    u = uuid.uuid4().hex[:6]
    team = make_team(svc, f"roll-hot-{u}")
    insert = sa.text("INSERT INTO tickets (subject, channel, team_id, state) VALUES (:s, 'email', :t, 'new')")
    with svc.ctx.engine.connect() as holder:  # a change of the team, not committed yet
        holder.begin()
        holder.execute(insert, {"s": "held", "t": team})
        with svc.ctx.engine.begin() as conn:  # another change of the team meanwhile
            conn.execute(sa.text("SET LOCAL lock_timeout = '1s'"))  # a shared counter row would time out
            conn.execute(insert, {"s": "free", "t": team})
        with svc.ctx.engine.begin() as conn:
            queue.compact(conn)  # folds what is committed; the held delta stays
        holder.commit()
    with svc.ctx.engine.connect() as conn:
        left = conn.execute(sa.text("SELECT coalesce(sum(n), 0) FROM queue_deltas WHERE team_id = :t"), {"t": team})
        assert left.scalar() == 1  # the held ticket's delta, for the next compaction
    assert counts(svc, ROLLED) == counts(svc, RECOUNT)
