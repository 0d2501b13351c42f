"""SLA: business-time arithmetic of the clocks (pure functions, the clock passed in), policies over
gRPC, and the engine on real tickets: hooks, durable warn/breach timers fired with the clock
moved by back-dating a ticket's history, breach actions, pause and resume, the Zammad traps
(an update never overwrites the first response; an agent reply stops the update clock; a
deactivated policy releases its tickets) and a calendar edit recomputing a due time."""

from __future__ import annotations

import datetime as dt
import time
from zoneinfo import ZoneInfo

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2

from crm.support.v1 import sla_pb2 as pb
from crm.support.v1 import sla_pb2_grpc
from crm.support.v1 import support_events_pb2 as ev
from crm.support.v1 import ticket_pb2 as tpb
from crm_chassis import timers
from crm_chassis.business_time import BusinessCalendar
from support_svc import sla
from support_svc.sla import Interval, due_at, elapsed, ticket_sla
from support_svc.tables import calendars, teams, ticket_intervals, ticket_messages, tickets

from .conftest import ADMIN, add_message, agent_md, events, make_team, manager_md, open_ticket, rt, ticket

TEHRAN = ZoneInfo("Asia/Tehran")
BERLIN = ZoneInfo("Europe/Berlin")
H = 3600
ALWAYS = {d: [["00:00", "24:00"]] for d in ("sat", "sun", "mon", "tue", "wed", "thu", "fri")}


def t(y, mo, d, h=0, mi=0, tz=TEHRAN):
    return dt.datetime(y, mo, d, h, mi, tzinfo=tz)


# -- pure business-time arithmetic --------------------------------------------------------------
def test_elapsed_and_due_skip_the_tehran_weekend():
    cal = BusinessCalendar()  # Sat-Wed 08-16, Thu 08-12, Friday off, Iran's holidays
    start = t(2026, 1, 8, 11)  # Thursday 11:00: one business hour left that day
    iv = [Interval("open", start)]
    assert elapsed(iv, cal, start, None, t(2026, 1, 10, 9)) == 2 * H  # Thu 11-12 + Sat 08-09
    assert elapsed(iv, cal, start, None, t(2026, 1, 9, 15)) == 1 * H  # Friday counts nothing
    assert due_at(iv, cal, start, 3 * H, now=t(2026, 1, 8, 11, 30)) == t(2026, 1, 10, 10)


def test_due_skips_nowruz_from_the_holidays_package():
    start = t(2026, 3, 19, 11)  # Thursday before Nowruz (1405-01-01 = Saturday 2026-03-21)
    iv = [Interval("new", start)]
    with_holidays = BusinessCalendar()
    assert with_holidays.holiday(dt.date(2026, 3, 21)) is not None
    # Thu 11-12, then Fri 20 (off) and Sat 21 - Tue 24 (Nowruz): the next hour is Wed 25 08-09
    assert due_at(iv, with_holidays, start, 2 * H, now=start) == t(2026, 3, 25, 9)
    without = BusinessCalendar(holiday_country=None)
    assert due_at(iv, without, start, 2 * H, now=start) == t(2026, 3, 21, 9)


def test_a_day_with_two_ranges_skips_the_lunch_break():
    cal = BusinessCalendar(weekly={"sat": ["08:00-12:00", "13:00-17:00"]}, holiday_country=None)
    start = t(2026, 1, 10, 11, 30)  # Saturday
    iv = [Interval("open", start)]
    assert due_at(iv, cal, start, 1 * H, now=start) == t(2026, 1, 10, 13, 30)
    assert elapsed(iv, cal, start, None, t(2026, 1, 10, 14)) == 1.5 * H
    assert elapsed(iv, cal, start, None, t(2026, 1, 10, 12, 45)) == 0.5 * H


def test_tehran_has_no_dst_and_berlin_loses_an_hour_on_its_change_day():
    days = ("sat", "sun", "mon", "tue", "wed", "thu", "fri")
    week = {d: ["00:00-24:00"] for d in days}
    berlin = BusinessCalendar("Europe/Berlin", week, holiday_country=None)
    tehran = BusinessCalendar("Asia/Tehran", week, holiday_country=None)
    # 2026-03-29: Berlin goes from 02:00 to 03:00; a whole open day is 23 hours there
    b0, b1 = t(2026, 3, 29, tz=BERLIN), t(2026, 3, 30, tz=BERLIN)
    assert elapsed([Interval("open", b0)], berlin, b0, None, b1) == 23 * H
    assert due_at([Interval("open", b0)], berlin, b0, 3 * H, now=b0) == t(2026, 3, 29, 4, tz=BERLIN)
    t0, t1 = t(2026, 3, 22), t(2026, 3, 23)  # Tehran: 24 hours, every day, since 2022
    assert elapsed([Interval("open", t0)], tehran, t0, None, t1) == 24 * H
    autumn = t(2026, 10, 25, tz=BERLIN)  # back to winter time: 25 hours
    assert berlin.between(autumn, t(2026, 10, 26, tz=BERLIN)) == 25 * H


def test_waiting_on_the_customer_pauses_and_resumes_the_clock():
    cal = BusinessCalendar(weekly={d: ["00:00-24:00"] for d in range(7)}, holiday_country=None)
    s = t(2026, 1, 10, 8)
    iv = [
        Interval("new", s, s + dt.timedelta(hours=1)),
        Interval("waiting_on_customer", s + dt.timedelta(hours=1), s + dt.timedelta(hours=3)),
        Interval("open", s + dt.timedelta(hours=3)),
    ]
    now = s + dt.timedelta(hours=4)
    assert elapsed(iv, cal, s, None, now) == 2 * H  # the two waiting hours do not count
    assert due_at(iv, cal, s, 3 * H, now) == now + dt.timedelta(hours=1)  # resumed: 1 h left
    waiting = [*iv[:2], Interval("waiting_on_customer", s + dt.timedelta(hours=1))]
    assert due_at(waiting[::2], cal, s, 3 * H, now) is None  # paused now: nothing is due
    # a due time already passed is the instant it passed, not "now"
    assert due_at(iv, cal, s, 1.5 * H, now) == s + dt.timedelta(hours=3, minutes=30)
    # resolved counts for nothing; a reopened ticket goes on from where it stopped
    reopened = [
        Interval("open", s, s + dt.timedelta(hours=1)),
        Interval("resolved", s + dt.timedelta(hours=1), s + dt.timedelta(hours=5)),
        Interval("reopened", s + dt.timedelta(hours=5)),
    ]
    assert elapsed(reopened, cal, s, None, s + dt.timedelta(hours=6)) == 2 * H


def test_clock_flags_met_breached_and_the_warning():
    cal = BusinessCalendar(weekly={d: ["00:00-24:00"] for d in range(7)}, holiday_country=None)
    s = t(2026, 1, 10, 8)
    iv = [Interval("open", s)]
    c = sla.clock(
        "first_response", iv, cal, s, s + dt.timedelta(minutes=20), 30 * 60, 10 * 60, s + dt.timedelta(hours=2)
    )
    assert c.met and not c.breached and not c.running and c.elapsed == 20 * 60
    late = sla.clock("first_response", iv, cal, s, None, 30 * 60, 10 * 60, s + dt.timedelta(hours=2))
    assert late.running and late.breached and not late.met
    assert late.due == s + dt.timedelta(minutes=30) and late.warn == s + dt.timedelta(minutes=20)


def test_a_calendar_without_open_hours_is_never_due_instead_of_failing_the_change():
    closed = BusinessCalendar(weekly={}, holiday_country=None)
    s = t(2026, 1, 10, 8)
    c = sla.clock("resolution", [Interval("open", s)], closed, s, None, 3600, 600, s + dt.timedelta(days=2))
    assert c.running and c.elapsed == 0 and c.due is None and c.warn is None and not c.breached


# -- policies over gRPC -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def stub(ch):
    return sla_pb2_grpc.SlaServiceStub(ch)


MANAGER = manager_md("maryam")


def always_calendar(svc, name: str) -> str:
    with svc.ctx.engine.begin() as conn:
        return str(
            conn.execute(
                calendars.insert().values(name=name, weekly_hours=ALWAYS, holiday_country="").returning(calendars.c.id)
            ).scalar()
        )


def policy(stub, name, **kw) -> pb.SlaPolicy:
    kw.setdefault("first_response_minutes", 30)
    return stub.CreateSlaPolicy(
        pb.CreateSlaPolicyRequest(sla_policy=pb.SlaPolicy(display_name=name, **kw)), metadata=MANAGER
    )


def backdate(svc, tid, minutes: float) -> None:
    """Move the ticket's history `minutes` into the past (as if opened then)."""
    d = sa.literal(dt.timedelta(minutes=minutes), sa.Interval)
    with svc.ctx.engine.begin() as conn:
        conn.execute(
            tickets.update()
            .where(tickets.c.id == tid)
            .values(
                create_time=tickets.c.create_time - d,
                first_response_time=tickets.c.first_response_time - d,
                last_customer_message_time=tickets.c.last_customer_message_time - d,
                last_agent_message_time=tickets.c.last_agent_message_time - d,
                resolve_time=tickets.c.resolve_time - d,
            )
        )
        conn.execute(
            ticket_intervals.update()
            .where(ticket_intervals.c.ticket_id == tid)
            .values(start_time=ticket_intervals.c.start_time - d, end_time=ticket_intervals.c.end_time - d)
        )
        conn.execute(
            ticket_messages.update()
            .where(ticket_messages.c.ticket_id == tid)
            .values(create_time=ticket_messages.c.create_time - d)
        )


def state(svc, tid):
    with svc.ctx.engine.connect() as conn:
        return conn.execute(sa.select(ticket_sla).where(ticket_sla.c.ticket_id == tid)).one_or_none()


def timer(svc, kind, tid, metric):
    with svc.ctx.engine.connect() as conn:
        return timers.get(conn, kind, f"{tid}:{metric}")


def settle(svc, seconds: float = 5.0) -> None:
    """Fire the due SLA timers now. The service's own timer worker runs too and may have
    claimed some: wait (briefly) until none is due any more."""
    t = timers.timers
    due = sa.select(sa.func.count()).where(
        t.c.kind.in_(sla.KINDS), t.c.state == "scheduled", t.c.next_attempt_at <= sa.func.now()
    )
    deadline = time.monotonic() + seconds
    while True:
        rt(svc).timers.run_once()
        with svc.ctx.engine.connect() as conn:
            if not conn.execute(due).scalar() or time.monotonic() > deadline:
                return
        time.sleep(0.05)


def fire_now(svc, tid, metric, kind=sla.BREACH):
    """Move the timer into the past and fire it."""
    with svc.ctx.engine.begin() as conn:
        timers.reschedule(conn, kind, f"{tid}:{metric}", dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
    settle(svc)


def recompute(stub, **kw) -> int:
    return stub.RecomputeSla(pb.RecomputeSlaRequest(**kw), metadata=MANAGER).ticket_count


def test_policies_are_validated_and_read_with_their_fields(svc, stub):
    with pytest.raises(grpc.RpcError) as e:
        stub.CreateSlaPolicy(
            pb.CreateSlaPolicyRequest(
                sla_policy=pb.SlaPolicy(
                    display_name="",
                    priorities=[tpb.PRIORITY_UNSPECIFIED],
                    categories=["teams/x"],
                    first_response_minutes=-1,
                )
            ),
            metadata=MANAGER,
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = {v.field for v in _violations(e.value)}
    assert {"sla_policy.display_name", "sla_policy.priorities[0]", "sla_policy.categories[0]"} <= fields
    assert "sla_policy.first_response_minutes" in fields
    with pytest.raises(grpc.RpcError) as e:
        policy(stub, "warn too late", first_response_minutes=10, warning_before_minutes=10)
    assert {v.field for v in _violations(e.value)} == {"sla_policy.warning_before_minutes"}
    with pytest.raises(grpc.RpcError) as e:
        policy(stub, "no target", first_response_minutes=0)
    assert {v.field for v in _violations(e.value)} == {"sla_policy.first_response_minutes"}
    with pytest.raises(grpc.RpcError) as e:  # an agent reads but does not write policies
        stub.CreateSlaPolicy(
            pb.CreateSlaPolicyRequest(sla_policy=pb.SlaPolicy(display_name="x")), metadata=agent_md("a")
        )
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED

    req = pb.CreateSlaPolicyRequest(
        sla_policy=pb.SlaPolicy(
            display_name="VIP",
            position=5,
            priorities=[tpb.PRIORITY_URGENT],
            customer_ranks=["ranks/7d1f8a52-3c1e-4e55-9a2b-0c5f1e2d3a4b"],
            first_response_minutes=15,
            resolution_minutes=240,
            warning_before_minutes=5,
            breach_actions=[pb.SLA_BREACH_ACTION_NOTIFY_MANAGER],
        ),
        request_id="vip-1",
    )
    made = stub.CreateSlaPolicy(req, metadata=MANAGER)
    assert stub.CreateSlaPolicy(req, metadata=MANAGER).name == made.name  # a retry: the same one
    got = stub.GetSlaPolicy(pb.GetSlaPolicyRequest(name=made.name), metadata=agent_md("a"))
    assert (
        got.active
        and got.customer_ranks == ["ranks/7d1f8a52-3c1e-4e55-9a2b-0c5f1e2d3a4b"]
        and list(got.priorities) == [tpb.PRIORITY_URGENT]
    )
    with pytest.raises(grpc.RpcError) as e:
        policy(stub, "VIP")
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    listed = stub.ListSlaPolicies(pb.ListSlaPoliciesRequest(filter='display_name = "VIP"'), metadata=agent_md("a"))
    assert [x.name for x in listed.sla_policies] == [made.name]

    upd = pb.UpdateSlaPolicyRequest(
        sla_policy=pb.SlaPolicy(name=made.name, first_response_minutes=20, etag=got.etag),
        update_mask=field_mask_pb2.FieldMask(paths=["first_response_minutes"]),
    )
    changed = stub.UpdateSlaPolicy(upd, metadata=MANAGER)
    assert changed.first_response_minutes == 20 and changed.etag != got.etag
    with pytest.raises(grpc.RpcError) as e:  # the etag it was read with is stale now
        stub.UpdateSlaPolicy(upd, metadata=MANAGER)
    assert e.value.code() == grpc.StatusCode.ABORTED
    off = stub.DeactivateSlaPolicy(pb.DeactivateSlaPolicyRequest(name=made.name), metadata=MANAGER)
    assert not off.active


def _violations(err):
    from crm_chassis.errors import read_rpc_error

    return read_rpc_error(err).field_violations


# -- the engine on tickets ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def desk(svc, stub):
    """A team on an always-open calendar with a manager, and policies that only its tickets'
    priorities select (low: fast first response; high: next response; urgent: resolution)."""
    cal = always_calendar(svc, "24/7")
    team = make_team(svc, "sla desk", manager_id="maryam", calendar_id=cal)
    return {"team": team, "calendar": cal}


def test_opening_selects_the_policy_and_arms_timers_and_an_update_never_overwrites_the_first_response(svc, stub, desk):
    p = policy(stub, "low first", position=1, priorities=[tpb.PRIORITY_LOW], first_response_minutes=30,
               warning_before_minutes=10)  # fmt: skip
    tk = open_ticket(svc, priority="low", team_id=desk["team"])
    s = state(svc, tk.id)
    assert s.policy_id == p.name.split("/")[1]
    assert abs((s.first_response_due - tk.create_time).total_seconds() - 30 * 60) < 5
    assert timer(svc, sla.BREACH, tk.id, "first_response").due_at == s.first_response_due
    assert timer(svc, sla.WARN, tk.id, "first_response") is not None

    backdate(svc, tk.id, 12)  # opened 12 minutes ago: the reply comes in time
    add_message(svc, tk.id, "agent", "در حال بررسی هستیم")
    first = ticket(svc, tk.id)
    s = state(svc, tk.id)
    assert s.first_response_met and 11 * 60 <= s.first_response_seconds <= 13 * 60
    assert timer(svc, sla.BREACH, tk.id, "first_response") is None  # stopped: nothing pending
    (fr,) = events(svc, "ticket.first_responded.v1", ev.TicketEvent, subject=f"tickets/{tk.id}")
    assert fr.sla_policy == p.name and fr.sla_first_response_met and fr.first_response_business_seconds >= 11 * 60

    r = rt(svc)  # later replies and edits leave the first response where it is
    add_message(svc, tk.id, "customer", "ممنون، منتظرم")
    add_message(svc, tk.id, "agent", "ارسال شد")
    with r.uow.begin() as tx:
        r.tickets.update(tx, tk.id, {"subject": "کالا خراب رسید (پیگیری)"}, "agent-1")
    assert ticket(svc, tk.id).first_response_time == first.first_response_time
    assert state(svc, tk.id).first_response_seconds == s.first_response_seconds
    got = stub.GetTicketSla(pb.GetTicketSlaRequest(name=f"tickets/{tk.id}/sla"), metadata=agent_md("a"))
    (m,) = got.metrics
    assert m.metric == "first_response" and m.met and not m.running and m.target_minutes == 30


def test_a_breach_fires_once_with_its_actions_after_the_warning(svc, stub, desk):
    make_agent_row(svc, "agent-9")
    p = policy(
        stub,
        "normal breach",
        position=2,
        priorities=[tpb.PRIORITY_NORMAL],
        first_response_minutes=10,
        warning_before_minutes=5,
        breach_actions=[
            pb.SLA_BREACH_ACTION_NOTIFY_MANAGER,
            pb.SLA_BREACH_ACTION_RAISE_PRIORITY,
            pb.SLA_BREACH_ACTION_REASSIGN,
        ],
    )
    tk = open_ticket(svc, priority="normal", team_id=desk["team"], assignee_id="agent-9")
    backdate(svc, tk.id, 20)  # nobody answered for 20 minutes
    assert recompute(stub, policy=p.name) >= 1
    s = state(svc, tk.id)
    assert s.first_response_due < dt.datetime.now(dt.UTC)  # due in the past: the timers are due now
    settle(svc)
    subject = f"tickets/{tk.id}"
    (warning,) = events(svc, "ticket.sla_warning.v1", ev.SlaEvent, subject=subject)
    (breach,) = events(svc, "ticket.sla_breached.v1", ev.SlaEvent, subject=subject)
    assert warning.metric == breach.metric == "first_response" and breach.policy == p.name
    assert list(breach.actions) == ["notify_manager", "raise_priority", "reassign"]
    assert breach.assignee == "agents/agent-9" and breach.team == f"teams/{desk['team']}"
    after = ticket(svc, tk.id)
    assert after.priority == "high" and after.assignee_id == ""
    (esc,) = events(svc, "ticket.escalated.v1", ev.TicketEvent, subject=subject)
    assert esc.priority == tpb.PRIORITY_HIGH and esc.reason == "sla first_response breached"
    with svc.ctx.engine.connect() as conn:
        notes = (
            conn.execute(
                sa.select(ticket_messages.c.body).where(
                    ticket_messages.c.ticket_id == tk.id, ticket_messages.c.kind == "system"
                )
            )
            .scalars()
            .all()
        )
    assert len(notes) == 1 and "agents/maryam" in notes[0]
    # high priority matches no policy of this desk's yet: the ticket has none now; nothing fires again
    settle(svc)
    assert len(events(svc, "ticket.sla_breached.v1", subject=subject)) == 1


def make_agent_row(svc, agent_id):
    from .conftest import make_agent

    with svc.ctx.engine.connect() as conn:
        from support_svc.tables import agents

        if conn.execute(sa.select(agents.c.id).where(agents.c.id == agent_id)).scalar():
            return
    make_agent(svc, agent_id)


def test_waiting_on_the_customer_cancels_the_timers_and_resuming_rearms_them(svc, stub, desk):
    policy(stub, "urgent resolution", position=3, priorities=[tpb.PRIORITY_URGENT], first_response_minutes=0,
           resolution_minutes=60)  # fmt: skip
    tk = open_ticket(svc, priority="urgent", team_id=desk["team"])
    before = state(svc, tk.id).resolution_due
    assert timer(svc, sla.BREACH, tk.id, "resolution") is not None
    r = rt(svc)
    with r.uow.begin() as tx:
        r.tickets.change_state(tx, tk.id, "waiting_on_customer", "agent-1")
    s = state(svc, tk.id)
    assert s.resolution_due is None and timer(svc, sla.BREACH, tk.id, "resolution") is None
    got = stub.GetTicketSla(pb.GetTicketSlaRequest(name=f"tickets/{tk.id}/sla"), metadata=agent_md("a"))
    assert got.metrics[0].paused and not got.metrics[0].HasField("due_time")
    backdate(svc, tk.id, 30)  # and the customer took 30 minutes to answer
    add_message(svc, tk.id, "customer", "این هم عکس")  # ends the waiting: the clock resumes
    s = state(svc, tk.id)
    assert ticket(svc, tk.id).state == "open" and s.resolution_due is not None
    # opened 30 minutes ago, all of them waiting: due an hour from now, not in 30 minutes
    opened = ticket(svc, tk.id).create_time
    assert s.resolution_due - opened > dt.timedelta(minutes=89) and s.resolution_due >= before
    assert timer(svc, sla.BREACH, tk.id, "resolution").due_at == s.resolution_due
    # a firing that finds the clock paused does nothing and arms nothing
    with r.uow.begin() as tx:
        r.tickets.change_state(tx, tk.id, "waiting_on_customer", "agent-1")
    with svc.ctx.engine.begin() as conn:
        timers.schedule(conn, sla.BREACH, f"{tk.id}:resolution", dt.datetime.now(dt.UTC) - dt.timedelta(hours=2))
    settle(svc)
    assert events(svc, "ticket.sla_breached.v1", subject=f"tickets/{tk.id}") == []
    assert timer(svc, sla.BREACH, tk.id, "resolution") is None
    # resolved in time: the event says so; waiting did not count
    with r.uow.begin() as tx:
        r.tickets.change_state(tx, tk.id, "resolved", "agent-1")
    (done,) = events(svc, "ticket.resolved.v1", ev.TicketEvent, subject=f"tickets/{tk.id}")
    assert done.sla_resolution_met and done.resolution_business_seconds < 120
    assert state(svc, tk.id).resolution_met and timer(svc, sla.BREACH, tk.id, "resolution") is None
    # a customer message reopens it: the resolution clock goes on from where it stopped
    add_message(svc, tk.id, "customer", "دوباره خراب شد")
    s = state(svc, tk.id)
    assert ticket(svc, tk.id).state == "reopened" and not s.resolution_met
    assert timer(svc, sla.BREACH, tk.id, "resolution").due_at == s.resolution_due
    assert s.resolution_due - dt.datetime.now(dt.UTC) > dt.timedelta(minutes=57)


def test_an_agent_reply_stops_the_update_clock_and_no_breach_fires_later(svc, stub, desk):
    team = make_team(svc, "next desk", calendar_id=desk["calendar"])
    policy(stub, "next response", position=4, categories=[], priorities=[tpb.PRIORITY_HIGH], first_response_minutes=0,
           next_response_minutes=20)  # fmt: skip
    tk = open_ticket(svc, priority="high", team_id=team)
    add_message(svc, tk.id, "agent", "سلام")
    assert state(svc, tk.id).next_response_due is None  # nobody waits for a reply
    add_message(svc, tk.id, "customer", "پس کی؟")
    first_wait = state(svc, tk.id)
    assert first_wait.next_response_due is not None and timer(svc, sla.BREACH, tk.id, "next_response")
    add_message(svc, tk.id, "customer", "هنوز منتظرم")  # a second message does not restart the wait
    assert state(svc, tk.id).next_response_start == first_wait.next_response_start
    add_message(svc, tk.id, "agent", "فردا می‌رسد")
    s = state(svc, tk.id)
    assert s.next_response_due is None and s.next_response_start is None
    assert timer(svc, sla.BREACH, tk.id, "next_response") is None
    with svc.ctx.engine.begin() as conn:  # a stale firing (say, from before the reply) breaches nothing
        timers.schedule(conn, sla.BREACH, f"{tk.id}:next_response", dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
    backdate(svc, tk.id, 60)
    settle(svc)
    assert events(svc, "ticket.sla_breached.v1", subject=f"tickets/{tk.id}") == []


def test_a_deactivated_policy_releases_its_tickets_to_the_next_one_or_none(svc, stub, desk):
    team = make_team(svc, "release desk", calendar_id=desk["calendar"])
    cat = category_of(svc)
    a = policy(stub, "complaints A", position=10, categories=[f"categories/{cat}"], first_response_minutes=10)
    b = policy(stub, "complaints B", position=11, categories=[f"categories/{cat}"], first_response_minutes=90)
    tk = open_ticket(svc, priority="normal", team_id=team, category_id=cat)
    # (policies of earlier tests may come first: only A and B stay active)
    for x in list_all(stub):
        if x.active and x.name not in (a.name, b.name):
            stub.DeactivateSlaPolicy(pb.DeactivateSlaPolicyRequest(name=x.name), metadata=MANAGER)
    assert str(state(svc, tk.id).policy_id) == a.name.split("/")[1]
    due_a = state(svc, tk.id).first_response_due
    stub.DeactivateSlaPolicy(pb.DeactivateSlaPolicyRequest(name=a.name), metadata=MANAGER)
    s = state(svc, tk.id)
    assert str(s.policy_id) == b.name.split("/")[1]
    assert s.first_response_due - due_a > dt.timedelta(minutes=79)
    assert timer(svc, sla.BREACH, tk.id, "first_response").due_at == s.first_response_due
    stub.DeactivateSlaPolicy(pb.DeactivateSlaPolicyRequest(name=b.name), metadata=MANAGER)
    s = state(svc, tk.id)
    assert s.policy_id is None and s.first_response_due is None
    assert timer(svc, sla.BREACH, tk.id, "first_response") is None
    backdate(svc, tk.id, 120)
    settle(svc)
    assert events(svc, "ticket.sla_breached.v1", subject=f"tickets/{tk.id}") == []  # nobody fires for A
    # an update naming active=true brings B back onto its open tickets
    cur = stub.GetSlaPolicy(pb.GetSlaPolicyRequest(name=b.name), metadata=MANAGER)
    stub.UpdateSlaPolicy(
        pb.UpdateSlaPolicyRequest(
            sla_policy=pb.SlaPolicy(name=b.name, active=True, etag=cur.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["active"]),
        ),
        metadata=MANAGER,
    )
    assert str(state(svc, tk.id).policy_id) == b.name.split("/")[1]


def list_all(stub):
    return stub.ListSlaPolicies(pb.ListSlaPoliciesRequest(page_size=1000), metadata=MANAGER).sla_policies


def category_of(svc) -> str:
    from support_svc.tables import categories

    with svc.ctx.engine.connect() as conn:
        return str(conn.execute(sa.select(categories.c.id).order_by(categories.c.key).limit(1)).scalar_one())


def test_a_calendar_edit_recomputes_an_open_tickets_due_time(svc, stub, desk):
    with svc.ctx.engine.begin() as conn:  # office hours: one hour a day, every day
        one_hour = {d: [["08:00", "09:00"]] for d in ALWAYS}
        cal = str(
            conn.execute(
                calendars.insert()
                .values(name="one hour", weekly_hours=one_hour, holiday_country="")
                .returning(calendars.c.id)
            ).scalar()
        )
    team = make_team(svc, "calendar desk", calendar_id=cal)
    policy(stub, "low calendar", position=0, priorities=[tpb.PRIORITY_LOW], first_response_minutes=120)
    tk = open_ticket(svc, priority="low", team_id=team)
    slow = state(svc, tk.id).first_response_due
    assert slow - tk.create_time > dt.timedelta(hours=24)  # two business hours = two days
    with svc.ctx.engine.begin() as conn:  # the admin opens the desk around the clock
        conn.execute(
            calendars.update().where(calendars.c.id == cal).values(weekly_hours=ALWAYS, version=calendars.c.version + 1)
        )
    assert recompute(stub, calendar=f"calendars/{cal}") == 1
    fast = state(svc, tk.id).first_response_due
    assert abs((fast - tk.create_time).total_seconds() - 2 * H) < 5
    assert timer(svc, sla.BREACH, tk.id, "first_response").due_at == fast
    with pytest.raises(grpc.RpcError) as e:
        recompute(stub, calendar="calendars/not-a-uuid-but-a-name", policy="slaPolicies/x")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with svc.ctx.engine.connect() as conn:  # the team row is untouched by all this
        assert conn.execute(sa.select(teams.c.calendar_id).where(teams.c.id == team)).scalar() == cal


def test_admin_reads_ticket_sla_of_a_ticket_without_policy(svc, stub):
    tk = open_ticket(svc, priority="normal")
    got = stub.GetTicketSla(pb.GetTicketSlaRequest(name=f"tickets/{tk.id}/sla"), metadata=ADMIN)
    assert got.name == f"tickets/{tk.id}/sla"
    with pytest.raises(grpc.RpcError) as e:
        stub.GetTicketSla(
            pb.GetTicketSlaRequest(name="tickets/00000000-0000-0000-0000-000000000000/sla"), metadata=ADMIN
        )
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_policies_over_http_through_the_gateway(svc):
    from crm_gateway import create_app
    from crm_gateway.clients import Clients
    from tests.support.harness import assert_problem, token

    http = create_app(
        Clients(
            {
                "customer": "127.0.0.1:9",
                "sales": "127.0.0.1:9",
                "support": f"127.0.0.1:{svc.port}",
                "reporting": "127.0.0.1:9",
            }
        )
    ).test_client()
    manager = {"Authorization": f"Bearer {token('support_manager', 'maryam')}"}
    agent = {"Authorization": f"Bearer {token('support_agent', 'omid')}"}
    made = http.post(
        "/v1/slaPolicies",
        json={"displayName": "http web form", "position": 50, "priorities": ["PRIORITY_LOW"], "resolutionMinutes": 480,
              "breachActions": ["SLA_BREACH_ACTION_NOTIFY_MANAGER"]},
        headers=manager,
    )  # fmt: skip
    assert made.status_code == 201, made.get_data(as_text=True)
    name = made.get_json()["name"]
    got = http.get(f"/v1/{name}", headers=agent)
    assert got.status_code == 200 and got.get_json()["resolutionMinutes"] == 480
    assert_problem(http.post("/v1/slaPolicies", json={"displayName": "x"}, headers=agent), 403)
    assert_problem(
        http.post("/v1/slaPolicies", json={"displayName": "", "firstResponseMinutes": 5}, headers=manager),
        400,
        "display_name",  # the gateway names fields within the body
    )
    tk = open_ticket(svc, priority="low", subject="http sla")
    got = http.get(f"/v1/tickets/{tk.id}/sla", headers=agent)
    assert got.status_code == 200 and got.get_json()["name"] == f"tickets/{tk.id}/sla"
    off = http.post(f"/v1/{name}:deactivate", json={}, headers=manager)
    assert off.status_code == 200 and not off.get_json().get("active", False)
    count = http.post("/v1/slaPolicies:recompute", json={"policy": name}, headers=manager)
    assert count.status_code == 200, count.get_data(as_text=True)


def test_the_customer_rank_selects_a_policy_and_a_locked_ticket_delays_the_firing(svc, stub, desk):
    from support_svc.tables import customer_refs

    gold = "ranks/0b9d3c1e-5a4f-4e2b-8c7d-6e5f4a3b2c1d"
    with svc.ctx.engine.begin() as conn:
        conn.execute(customer_refs.insert().values(customer_id="c-gold", display_name="Gold", rank=gold, version=1))
        conn.execute(customer_refs.insert().values(customer_id="c-plain", display_name="Plain", version=1))
    p = policy(stub, "gold customers", position=0, customer_ranks=[gold], first_response_minutes=10)
    plain = open_ticket(svc, team_id=desk["team"], customer_id="c-plain")
    vip = open_ticket(svc, team_id=desk["team"], customer_id="c-gold")
    assert str(state(svc, vip.id).policy_id) == p.name.split("/")[1]
    assert state(svc, plain.id).policy_id is None or str(state(svc, plain.id).policy_id) != p.name.split("/")[1]

    backdate(svc, vip.id, 15)
    assert recompute(stub, policy=p.name) == 1  # only the gold customer's ticket is concerned
    assert state(svc, vip.id).first_response_due < dt.datetime.now(dt.UTC)
    with svc.ctx.engine.connect() as holder:  # an agent's change holds the ticket right now
        holder.execute(sa.select(tickets.c.id).where(tickets.c.id == vip.id).with_for_update())
        settle(svc)
        t1 = timer(svc, sla.BREACH, vip.id, "first_response")
        assert t1 is not None and t1.attempts >= 1 and "lock" in (t1.last_error or "").lower()
        assert events(svc, "ticket.sla_breached.v1", subject=f"tickets/{vip.id}") == []
        holder.rollback()
    fire_now(svc, vip.id, "first_response")  # the retry finds the ticket free
    (breach,) = events(svc, "ticket.sla_breached.v1", ev.SlaEvent, subject=f"tickets/{vip.id}")
    assert breach.policy == p.name and breach.customer == "customers/c-gold" and list(breach.actions) == []
    assert state(svc, vip.id).first_response_breached
    # the policy changed so that it no longer matches: its ticket is let go at once
    cur = stub.GetSlaPolicy(pb.GetSlaPolicyRequest(name=p.name), metadata=MANAGER)
    stub.UpdateSlaPolicy(
        pb.UpdateSlaPolicyRequest(
            sla_policy=pb.SlaPolicy(
                name=p.name, customer_ranks=["ranks/1b9d3c1e-5a4f-4e2b-8c7d-6e5f4a3b2c1d"], etag=cur.etag
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["customer_ranks"]),
        ),
        metadata=MANAGER,
    )
    assert str(state(svc, vip.id).policy_id) != p.name.split("/")[1]


def test_recompute_goes_in_batches_and_skips_closed_tickets(svc, desk):
    ids = [str(open_ticket(svc, team_id=desk["team"], subject=f"batch {i}").id) for i in range(5)]
    r = rt(svc)
    with r.uow.begin() as tx:
        r.tickets.change_state(tx, ids[0], "closed", "agent-1")
    with svc.ctx.engine.begin() as conn:  # as if opened before the SLA part existed
        conn.execute(ticket_sla.delete().where(ticket_sla.c.ticket_id.in_(ids)))
    assert sla.engine(r).recompute_ids(ids, batch=2) == 4
    assert [state(svc, i) is not None for i in ids] == [False, True, True, True, True]
