"""AgentService, TeamService and CalendarService over gRPC (and one call through the gateway):
validation naming the field, permissions, etags, bulk membership, routing reacting to agent
changes, business calendars with several ranges a day, days of their own and Iran's holidays."""

from __future__ import annotations

import datetime as dt
import uuid
from zoneinfo import ZoneInfo

import grpc
import pytest
from google.protobuf import field_mask_pb2

from crm.support.v1 import agents_pb2 as pb
from crm.support.v1 import agents_pb2_grpc
from crm.type.v1 import date_pb2
from crm_chassis.errors import read_rpc_error
from support_svc import calendars as calendar_cache
from support_svc.routing import ticket_offers
from tests.support.harness import token

from .conftest import agent_md, make_team, manager_md, open_ticket, rt

BOSS = manager_md("boss")
TEHRAN = ZoneInfo("Asia/Tehran")


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def agents_api(ch):
    return agents_pb2_grpc.AgentServiceStub(ch)


@pytest.fixture(scope="module")
def teams_api(ch):
    return agents_pb2_grpc.TeamServiceStub(ch)


@pytest.fixture(scope="module")
def cal_api(ch):
    return agents_pb2_grpc.CalendarServiceStub(ch)


def fails(call, code, *fields):
    with pytest.raises(grpc.RpcError) as err:
        call()
    view = read_rpc_error(err.value)
    assert view.code == code, view
    for f in fields:
        assert f in [v.field for v in view.field_violations], view
    return view


def new_agent(agents_api, **kw):
    aid = uid("agent")
    a = agents_api.CreateAgent(
        pb.CreateAgentRequest(agent_id=aid, agent=pb.Agent(display_name=kw.pop("display_name", "مریم"), **kw)),
        metadata=BOSS,
    )
    return aid, a


def mask(*paths):
    return field_mask_pb2.FieldMask(paths=list(paths))


def live_offers(svc, agent_id):
    import sqlalchemy as sa

    with svc.ctx.engine.connect() as conn:
        return conn.execute(
            sa.select(ticket_offers).where(ticket_offers.c.agent_id == agent_id, ticket_offers.c.state == "offered")
        ).all()


def test_create_get_and_validation_of_agents(agents_api):
    aid, a = new_agent(agents_api, email="Maryam@Example.ir", skills=["Billing", "network"], capacity=8)
    assert a.name == f"agents/{aid}" and a.email == "maryam@example.ir" and list(a.skills) == ["billing", "network"]
    assert list(a.languages) == ["fa"] and a.capacity == 8 and a.after_call_work_seconds == 0
    assert a.presence == pb.PRESENCE_OFFLINE and a.active and a.etag and a.load == 0
    assert agents_api.GetAgent(pb.GetAgentRequest(name=a.name), metadata=agent_md(aid)) == a
    fails(
        lambda: agents_api.CreateAgent(
            pb.CreateAgentRequest(
                agent_id="bad id!", agent=pb.Agent(display_name="", capacity=5000, skills=["no spaces"], email="x")
            ),
            metadata=BOSS,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "agent_id",
        "agent.display_name",
        "agent.capacity",
        "agent.skills[0]",
        "agent.email",
    )
    fails(
        lambda: agents_api.CreateAgent(
            pb.CreateAgentRequest(agent_id=aid, agent=pb.Agent(display_name="x")), metadata=BOSS
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    fails(
        lambda: agents_api.CreateAgent(
            pb.CreateAgentRequest(agent_id=uid("x"), agent=pb.Agent(display_name="x")), metadata=agent_md(aid)
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    fails(
        lambda: agents_api.GetAgent(pb.GetAgentRequest(name="agents/nobody"), metadata=BOSS), grpc.StatusCode.NOT_FOUND
    )


def test_update_with_mask_and_etag(agents_api):
    aid, a = new_agent(agents_api)
    a.display_name, a.capacity = "مریم رضایی", 12
    updated = agents_api.UpdateAgent(
        pb.UpdateAgentRequest(agent=a, update_mask=mask("display_name", "capacity")), metadata=BOSS
    )
    assert updated.display_name == "مریم رضایی" and updated.capacity == 12 and updated.etag != a.etag
    fails(
        lambda: agents_api.UpdateAgent(pb.UpdateAgentRequest(agent=a, update_mask=mask("capacity")), metadata=BOSS),
        grpc.StatusCode.ABORTED,
    )
    fails(
        lambda: agents_api.UpdateAgent(
            pb.UpdateAgentRequest(agent=updated, update_mask=mask("presence")), metadata=BOSS
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "update_mask",
    )
    updated.after_call_work_seconds = 99999
    fails(
        lambda: agents_api.UpdateAgent(
            pb.UpdateAgentRequest(agent=updated, update_mask=mask("after_call_work_seconds")), metadata=BOSS
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "agent.after_call_work_seconds",
    )


def test_teams_members_filters_and_raising_capacity_offers_at_once(svc, agents_api, teams_api):
    x, _ = new_agent(agents_api, capacity=1, skills=["field"])
    y, _ = new_agent(agents_api, capacity=1)
    team = teams_api.CreateTeam(
        pb.CreateTeamRequest(
            team=pb.Team(display_name=uid("فنی"), strategy=pb.ROUTING_STRATEGY_LEAST_LOADED, offer_timeout_seconds=30)
        ),
        metadata=BOSS,
    )
    assert team.strategy == pb.ROUTING_STRATEGY_LEAST_LOADED and team.offer_timeout_seconds == 30 and not team.members
    fails(
        lambda: teams_api.CreateTeam(
            pb.CreateTeamRequest(team=pb.Team(display_name="t", offer_timeout_seconds=5, calendar="calendars/x")),
            metadata=BOSS,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "team.offer_timeout_seconds",
        "team.calendar",
    )
    fails(
        lambda: teams_api.CreateTeam(pb.CreateTeamRequest(team=pb.Team(display_name=team.display_name)), metadata=BOSS),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    fails(
        lambda: teams_api.AddTeamMembers(
            pb.AddTeamMembersRequest(team=team.name, agents=[f"agents/{x}", "agents/ghost"]), metadata=BOSS
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "agents[1]",
    )
    team = teams_api.AddTeamMembers(
        pb.AddTeamMembersRequest(team=team.name, agents=[f"agents/{x}", f"agents/{y}", f"agents/{x}"]), metadata=BOSS
    )
    assert sorted(team.members) == sorted([f"agents/{x}", f"agents/{y}"])
    listed = agents_api.ListAgents(
        pb.ListAgentsRequest(filter=f'team = "{team.name}" AND skills:field'), metadata=agent_md(y)
    )
    assert [a.name for a in listed.agents] == [f"agents/{x}"] and list(listed.agents[0].teams) == [team.name]
    by_skill = agents_api.ListAgents(
        pb.ListAgentsRequest(filter=f'team = "{team.name}" AND skill != field'), metadata=BOSS
    )
    assert [a.name for a in by_skill.agents] == [f"agents/{y}"]
    fails(
        lambda: agents_api.ListAgents(pb.ListAgentsRequest(filter="colour = red"), metadata=BOSS),
        grpc.StatusCode.INVALID_ARGUMENT,
        "filter",
    )
    # both online with room for one e-mail each; a third ticket waits until x has room
    for who in (x, y):
        agents_api.SetPresence(
            pb.SetPresenceRequest(name=f"agents/{who}", presence=pb.PRESENCE_ONLINE), metadata=agent_md(who)
        )
    online = agents_api.ListAgents(
        pb.ListAgentsRequest(filter=f'team = "{team.name}" AND presence = ONLINE'), metadata=BOSS
    )
    assert len(online.agents) == 2
    tid = team.name.split("/")[1]
    tickets = [open_ticket(svc, team_id=tid) for _ in range(3)]
    assert len(live_offers(svc, x)) == 1 and len(live_offers(svc, y)) == 1
    ax = agents_api.GetAgent(pb.GetAgentRequest(name=f"agents/{x}"), metadata=BOSS)
    assert ax.load == 1
    ax.capacity = 3
    agents_api.UpdateAgent(pb.UpdateAgentRequest(agent=ax, update_mask=mask("capacity")), metadata=BOSS)
    assert len(live_offers(svc, x)) == 2  # the waiting one, at once
    # leaving the team withdraws the offers; deleting a team with open tickets is refused
    teams_api.RemoveTeamMembers(pb.RemoveTeamMembersRequest(team=team.name, agents=[f"agents/{x}"]), metadata=BOSS)
    assert not live_offers(svc, x)
    fails(
        lambda: teams_api.DeleteTeam(pb.DeleteTeamRequest(name=team.name), metadata=BOSS),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    r = rt(svc)
    with r.uow.begin() as tx:
        for t in tickets:
            r.tickets.change_state(tx, t.id, "closed", "boss")
    teams_api.DeleteTeam(pb.DeleteTeamRequest(name=team.name), metadata=BOSS)
    gone = teams_api.GetTeam(pb.GetTeamRequest(name=team.name), metadata=BOSS)
    assert gone.deleted and not gone.members
    names = [t.name for t in teams_api.ListTeams(pb.ListTeamsRequest(page_size=1000), metadata=BOSS).teams]
    assert team.name not in names


def test_deactivated_agents_lose_their_offers(svc, agents_api):
    aid, _ = new_agent(agents_api)
    team = make_team(svc, uid("deact"))
    from support_svc.tables import team_members

    with svc.ctx.engine.begin() as conn:
        conn.execute(team_members.insert().values(team_id=team, agent_id=aid))
    agents_api.SetPresence(
        pb.SetPresenceRequest(name=f"agents/{aid}", presence=pb.PRESENCE_ONLINE), metadata=agent_md(aid)
    )
    open_ticket(svc, team_id=team)
    assert len(live_offers(svc, aid)) == 1
    a = agents_api.DeactivateAgent(pb.DeactivateAgentRequest(name=f"agents/{aid}"), metadata=BOSS)
    assert not a.active and a.presence == pb.PRESENCE_OFFLINE and not live_offers(svc, aid)
    fails(
        lambda: agents_api.SetPresence(
            pb.SetPresenceRequest(name=f"agents/{aid}", presence=pb.PRESENCE_ONLINE), metadata=agent_md(aid)
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    fails(
        lambda: agents_api.SetPresence(pb.SetPresenceRequest(name=f"agents/{aid}"), metadata=agent_md(aid)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "presence",
    )


def test_channel_weights(agents_api):
    weights = {
        w.channel: w.weight
        for w in agents_api.ListChannelWeights(pb.ListChannelWeightsRequest(), metadata=BOSS).channel_weights
    }
    from crm.support.v1 import ticket_pb2

    assert weights[ticket_pb2.CHANNEL_PHONE] == 5 and weights[ticket_pb2.CHANNEL_EMAIL] == 1
    agents_api.SetChannelWeight(
        pb.SetChannelWeightRequest(channel_weight=pb.ChannelWeight(channel=ticket_pb2.CHANNEL_FAX, weight=3)),
        metadata=BOSS,
    )
    weights = {
        w.channel: w.weight
        for w in agents_api.ListChannelWeights(pb.ListChannelWeightsRequest(), metadata=BOSS).channel_weights
    }
    assert weights[ticket_pb2.CHANNEL_FAX] == 3
    fails(
        lambda: agents_api.SetChannelWeight(
            pb.SetChannelWeightRequest(channel_weight=pb.ChannelWeight(weight=0)), metadata=BOSS
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "channel_weight.channel",
        "channel_weight.weight",
    )


def _date(d: dt.date) -> date_pb2.Date:
    return date_pb2.Date(year=d.year, month=d.month, day=d.day)


def test_calendars_two_ranges_a_day_extra_closed_day_and_a_worked_holiday(svc, cal_api, teams_api):
    weekly = {day: pb.DayHours(ranges=["08:00-12:00", "13:00-17:00"]) for day in ("sat", "sun", "mon", "tue", "wed")}
    weekly["thu"] = pb.DayHours(ranges=["08:00-12:00"])
    cal = cal_api.CreateCalendar(
        pb.CreateCalendarRequest(calendar=pb.Calendar(display_name=uid("ستاد"), weekly_hours=weekly)), metadata=BOSS
    )
    assert cal.timezone == "Asia/Tehran" and cal.holiday_country == "IR"
    assert list(cal.weekly_hours["sat"].ranges) == ["08:00-12:00", "13:00-17:00"] and "fri" not in cal.weekly_hours
    fails(
        lambda: cal_api.CreateCalendar(
            pb.CreateCalendarRequest(
                calendar=pb.Calendar(
                    display_name="bad",
                    timezone="Mars/Olympus",
                    weekly_hours={
                        "sat": pb.DayHours(ranges=["12:00-08:00"]),
                        "someday": pb.DayHours(ranges=["08:00-09:00"]),
                    },
                    holiday_country="XX",
                )
            ),
            metadata=BOSS,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "calendar.timezone",
        "calendar.weekly_hours[sat].ranges[0]",
        "calendar.weekly_hours[someday]",
        "calendar.holiday_country",
    )
    fails(
        lambda: cal_api.CreateCalendar(
            pb.CreateCalendarRequest(calendar=pb.Calendar(display_name="closed")), metadata=BOSS
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "calendar.weekly_hours",
    )
    fails(
        lambda: cal_api.CreateCalendar(
            pb.CreateCalendarRequest(calendar=pb.Calendar(display_name="x", weekly_hours=weekly)),
            metadata=agent_md("a"),
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    team = teams_api.CreateTeam(
        pb.CreateTeamRequest(team=pb.Team(display_name=uid("cal"), calendar=cal.name)), metadata=BOSS
    )
    tid = team.name.split("/")[1]

    def business():
        with svc.ctx.engine.connect() as conn:
            return calendar_cache.calendar_of_team(conn, tid)

    sat = dt.date(2026, 5, 2)  # a Saturday, no holiday
    assert sat.weekday() == 5
    at = lambda d, h, m=0: dt.datetime(d.year, d.month, d.day, h, m, tzinfo=TEHRAN)  # noqa: E731
    b = business()
    assert b.is_open(at(sat, 9)) and not b.is_open(at(sat, 12, 30)) and b.is_open(at(sat, 13, 30))
    # an extra closed day
    cal_api.SetCalendarDay(
        pb.SetCalendarDayRequest(
            calendar=cal.name, calendar_day=pb.CalendarDay(day=_date(sat), closed=True, display_name="تعطیل اعلام‌شده")
        ),
        metadata=BOSS,
    )
    assert not business().is_open(at(sat, 9))
    # Nowruz (a public holiday) worked with hours of its own
    nowruz = dt.date(2026, 3, 21)
    assert not business().is_open(at(nowruz, 10))
    day = cal_api.SetCalendarDay(
        pb.SetCalendarDayRequest(
            calendar=cal.name,
            calendar_day=pb.CalendarDay(day=_date(nowruz), ranges=["09:00-13:00"], display_name="کشیک نوروز"),
        ),
        metadata=BOSS,
    )
    assert list(day.ranges) == ["09:00-13:00"] and not day.closed
    assert business().is_open(at(nowruz, 10)) and not business().is_open(at(nowruz, 14))
    fails(
        lambda: cal_api.SetCalendarDay(
            pb.SetCalendarDayRequest(calendar=cal.name, calendar_day=pb.CalendarDay(day=_date(sat))), metadata=BOSS
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "calendar_day.ranges",
    )
    fails(
        lambda: cal_api.SetCalendarDay(
            pb.SetCalendarDayRequest(calendar=cal.name, calendar_day=pb.CalendarDay(closed=True)), metadata=BOSS
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "calendar_day.day",
    )
    # ListHolidays for 1405: Nowruz (worked here), the lunar days marked, the later ones estimated
    hs = cal_api.ListHolidays(pb.ListHolidaysRequest(calendar=cal.name, year=1405), metadata=agent_md("a")).holidays
    public = [h for h in hs if h.source == pb.Holiday.SOURCE_PUBLIC]
    first = public[0]
    assert (first.day.year, first.day.month, first.day.day) == (2026, 3, 21) and first.jalali_day == "1405/01/01"
    assert "نوروز" in first.display_name and not first.closed and list(first.ranges) == ["09:00-13:00"]
    assert all(dt.date(2026, 3, 21) <= dt.date(h.day.year, h.day.month, h.day.day) < dt.date(2027, 3, 21) for h in hs)
    lunar = [h for h in public if h.lunar]
    assert len(lunar) >= 10 and any("عاشورا" in h.display_name for h in lunar)
    assert any(h.estimated for h in lunar) and not any(h.estimated for h in public if not h.lunar)
    assert not any(h.lunar for h in public if "نوروز" in h.display_name and "فطر" not in h.display_name)
    own = [(h.day.month, h.closed, h.display_name) for h in hs if h.source == pb.Holiday.SOURCE_CALENDAR]
    assert own == [(3, False, "کشیک نوروز"), (5, True, "تعطیل اعلام‌شده")]
    fails(
        lambda: cal_api.ListHolidays(pb.ListHolidaysRequest(calendar=cal.name, year=7), metadata=BOSS),
        grpc.StatusCode.INVALID_ARGUMENT,
        "year",
    )
    # the closed day removed: open again; removing it twice is NOT_FOUND
    cal_api.DeleteCalendarDay(pb.DeleteCalendarDayRequest(calendar=cal.name, day=_date(sat)), metadata=BOSS)
    assert business().is_open(at(sat, 9))
    fails(
        lambda: cal_api.DeleteCalendarDay(
            pb.DeleteCalendarDayRequest(calendar=cal.name, day=_date(sat)), metadata=BOSS
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    # an update with a stale etag is refused; a good one changes the hours
    cal2 = cal_api.GetCalendar(pb.GetCalendarRequest(name=cal.name), metadata=BOSS)
    assert cal2.etag != cal.etag  # days of its own moved the version (other processes' caches)
    fails(
        lambda: cal_api.UpdateCalendar(
            pb.UpdateCalendarRequest(calendar=cal, update_mask=mask("timezone")), metadata=BOSS
        ),
        grpc.StatusCode.ABORTED,
    )
    cal2.weekly_hours["sat"].ClearField("ranges")
    cal2.weekly_hours["sat"].ranges.append("10:00-11:00")
    cal_api.UpdateCalendar(pb.UpdateCalendarRequest(calendar=cal2, update_mask=mask("weekly_hours")), metadata=BOSS)
    assert not business().is_open(at(sat, 9)) and business().is_open(at(sat, 10, 30))


def test_presence_through_the_gateway(svc, agents_api):
    from crm_gateway import create_app
    from crm_gateway.clients import Clients

    aid, _ = new_agent(agents_api)
    addr = "127.0.0.1:9"
    http = create_app(
        Clients({"customer": addr, "sales": addr, "support": f"127.0.0.1:{svc.port}", "reporting": addr})
    ).test_client()
    resp = http.post(
        f"/v1/agents/{aid}:setPresence",
        json={"presence": "PRESENCE_AWAY"},
        headers={"Authorization": f"Bearer {token('support_agent', aid)}"},
    )
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.get_json()["presence"] == "PRESENCE_AWAY"
    resp = http.post(
        f"/v1/agents/{aid}:setPresence",
        json={"presence": "PRESENCE_ONLINE"},
        headers={"Authorization": f"Bearer {token('support_agent', 'someone-else')}"},
    )
    assert resp.status_code == 403
