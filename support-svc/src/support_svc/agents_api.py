"""AgentService, TeamService and CalendarService (proto/crm/support/v1/agents.proto): the people
of the desk, their teams and the calendars the teams work by.

Rules, in one place:
- an agent's id is their token subject; presence is set by the agent themself or a manager
  (agents.write); presence, busy_until and load are state, not edits (the etag stays);
- changes that give an agent room (online, capacity raised, added to a team) offer them the
  waiting tickets at once; going away/offline, deactivation and leaving a team withdraw their
  pending offers, which go to someone else (routing.Router);
- a team is deleted only without open tickets and when no category routes to it; it stays as a
  row (inactive) for its tickets' history;
- a calendar edit (its row or a day of its own) bumps its version, so every process's cached
  BusinessCalendar (calendars.py) is rebuilt; this process forgets it at once.
"""

from __future__ import annotations

import datetime as dt
import functools
import inspect
import re

import sqlalchemy as sa
from google.protobuf import empty_pb2
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.dialects.postgresql import insert as pg_insert

from crm.support.v1 import agents_pb2 as pb
from crm.support.v1 import agents_pb2_grpc
from crm_chassis import dates
from crm_chassis.auth import Principal
from crm_chassis.business_time import WEEKDAYS, parse_range
from crm_chassis.errors import AlreadyExists, FailedPrecondition, FieldViolation, InvalidArgument, PermissionDenied
from crm_chassis.filtering import (
    FieldType,
    FilterField,
    FilterSchema,
    keyset_page,
    parse_order_by,
    query_fingerprint,
    with_tiebreaker,
)
from crm_chassis.grpc_server import Registration
from crm_chassis.interceptors import current_principal
from crm_chassis.pagination import PageTokens, page_size
from crm_chassis.persian import format_jalali, jalali_year_bounds
from crm_chassis.resources import ResourceName, UpdateMask, check_etag, etag

from . import calendars as calendar_cache
from .routing import AGENT, load_column, router, ticket_offers
from .runtime import Support
from .tables import agents, calendar_days, calendars, categories, channel_weights, team_members, teams, tickets
from .ticketing import CHANNEL_ENUM, CHANNEL_OF, OPEN_STATES

TEAM = ResourceName("teams/{team_id}")
CALENDAR = ResourceName("calendars/{calendar_id}")

PRESENCE_OF = {pb.PRESENCE_ONLINE: "online", pb.PRESENCE_AWAY: "away", pb.PRESENCE_OFFLINE: "offline"}
PRESENCE_ENUM = {v: k for k, v in PRESENCE_OF.items()}
STRATEGY_OF = {
    pb.ROUTING_STRATEGY_UNSPECIFIED: "round_robin",
    pb.ROUTING_STRATEGY_ROUND_ROBIN: "round_robin",
    pb.ROUTING_STRATEGY_LEAST_LOADED: "least_loaded",
    pb.ROUTING_STRATEGY_SKILLS: "skills",
}
STRATEGY_ENUM = {"round_robin": pb.ROUTING_STRATEGY_ROUND_ROBIN, "least_loaded": pb.ROUTING_STRATEGY_LEAST_LOADED}
STRATEGY_ENUM["skills"] = pb.ROUTING_STRATEGY_SKILLS

NAME_LIMIT = 200
TEAM_NAME_LIMIT = 100
DESCRIPTION_LIMIT = 2000
SUBJECT_LIMIT = 128
EMAIL_LIMIT = 254
MAX_SKILLS = 50
MAX_MEMBERS = 500
MAX_RANGES = 10
DEFAULT_TIMEOUT = 120
SKILL = re.compile(r"[a-z0-9_-]{1,40}")
LANGUAGE = re.compile(r"[a-z]{2,3}")
EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
AGENT_ID = re.compile(r"[A-Za-z0-9._@-]{1,128}")
WEEKDAY_NAMES = ("sat", "sun", "mon", "tue", "wed", "thu", "fri")


# -- shared checks ------------------------------------------------------------------------------
def _text(value: str, field: str, limit: int, bad: list, required: bool = False) -> str:
    v = value.strip()
    if required and not v:
        bad.append(FieldViolation(field, "is required"))
    elif len(v) > limit:
        bad.append(FieldViolation(field, f"must be at most {limit} characters"))
    return v


def _email(value: str, field: str, bad: list) -> str:
    v = value.strip().lower()
    if v and (len(v) > EMAIL_LIMIT or not EMAIL.fullmatch(v)):
        bad.append(FieldViolation(field, f"must be an e-mail address (at most {EMAIL_LIMIT} characters)"))
    return v


def _keys(values, field: str, pattern: re.Pattern, what: str, bad: list, default=()) -> list[str]:
    out = list(dict.fromkeys(v.strip().lower() for v in values if v.strip())) or list(default)
    if len(out) > MAX_SKILLS:
        bad.append(FieldViolation(field, f"at most {MAX_SKILLS}"))
    for i, v in enumerate(out):
        if not pattern.fullmatch(v):
            bad.append(FieldViolation(f"{field}[{i}]", f"{v!r} is not {what}"))
    return out


def _ranges(specs, field: str, bad: list) -> list[list[str]]:
    """'HH:MM-HH:MM' texts as stored: [["08:00", "12:00"], ...], sorted."""
    specs = [s for s in specs if s.strip()]
    if len(specs) > MAX_RANGES:
        bad.append(FieldViolation(field, f"at most {MAX_RANGES} ranges a day"))
    out = []
    for i, s in enumerate(specs):
        try:
            a, b = parse_range(s)
        except ValueError as e:
            bad.append(FieldViolation(f"{field}[{i}]", str(e)))
            continue
        out.append([f"{a // 3600:02d}:{a % 3600 // 60:02d}", f"{b // 3600:02d}:{b % 3600 // 60:02d}"])
    return sorted(out)


def _unique(exc: sa.exc.IntegrityError, message: str, field: str) -> None:
    if getattr(exc.orig, "sqlstate", None) == "23505":
        raise AlreadyExists(message, metadata={"field": field}) from None
    raise exc


def _set(msg, field: str, value) -> None:
    if value is not None:
        getattr(msg, field).FromDatetime(value)


# -- agents -------------------------------------------------------------------------------------
def _team_names():
    return (
        sa.select(
            sa.func.coalesce(
                sa.func.array_agg(aggregate_order_by(team_members.c.team_id, team_members.c.team_id)),
                sa.text("'{}'::uuid[]"),
            )
        )
        .where(team_members.c.agent_id == agents.c.id)
        .scalar_subquery()
        .label("team_ids")
    )


def agent_query():
    return sa.select(agents, _team_names(), load_column(agents.c.id).label("load"))


def agent_to_proto(row) -> pb.Agent:
    out = pb.Agent(
        name=AGENT.format(row.id),
        display_name=row.display_name,
        email=row.email,
        skills=list(row.skills),
        languages=list(row.languages),
        capacity=row.capacity,
        after_call_work_seconds=row.after_call_work_seconds,
        presence=PRESENCE_ENUM.get(row.presence, 0),
        active=row.active,
        teams=[TEAM.format(t) for t in (row.team_ids or [])],
        load=int(row.load or 0),
        etag=etag(row.version),
    )
    for f in ("presence_time", "busy_until", "create_time", "update_time"):
        _set(out, f, getattr(row, f))
    return out


def _team_filter(op: str, value):
    if not isinstance(value, str) or not TEAM.matches(value):
        raise ValueError("team takes a name like 'teams/<uuid>'")
    cond = sa.exists().where(team_members.c.agent_id == agents.c.id, team_members.c.team_id == value.split("/", 1)[1])
    return cond if op == "=" else sa.not_(cond)


def _has(column, op: str, value):
    if not isinstance(value, str):
        raise ValueError("takes a key, e.g. skill = billing")
    cond = column.any(value.lower())
    return cond if op == "=" else sa.not_(cond)


AGENT_FILTERS = FilterSchema(
    FilterField("team", _team_filter, operators=frozenset({"=", "!="})),
    FilterField("skills", agents.c.skills, FieldType.STRING_ARRAY),
    FilterField("skill", lambda op, value: _has(agents.c.skills, op, value), operators=frozenset({"=", "!="})),
    FilterField("languages", agents.c.languages, FieldType.STRING_ARRAY),
    FilterField(
        "presence",
        agents.c.presence,
        FieldType.ENUM,
        enum_values={k: v for p, v in PRESENCE_OF.items() for k in (v, v.upper(), pb.Presence.Name(p))},
    ),
    FilterField("active", agents.c.active, FieldType.BOOL),
    FilterField("display_name", agents.c.display_name),
    FilterField("capacity", agents.c.capacity, FieldType.INT),
)
AGENT_SORTABLE = {
    "display_name": agents.c.display_name,
    "create_time": agents.c.create_time,
    "presence_time": agents.c.presence_time,
}
AGENT_MASK = UpdateMask(
    ["display_name", "email", "skills", "languages", "capacity", "after_call_work_seconds"],
    immutable={
        "name": "create another agent",
        "presence": "use SetPresence",
        "active": "use DeactivateAgent",
        "teams": "use TeamService.AddTeamMembers / RemoveTeamMembers",
    },
)


def _agent_values(a: pb.Agent, paths, bad: list, prefix: str = "agent") -> dict:
    v: dict = {}
    for p in paths:
        where = f"{prefix}.{p}"
        if p == "display_name":
            v[p] = _text(a.display_name, where, NAME_LIMIT, bad, required=True)
        elif p == "email":
            v[p] = _email(a.email, where, bad)
        elif p == "skills":
            v[p] = _keys(a.skills, where, SKILL, "a skill key (a-z, 0-9, _ and -, at most 40)", bad)
        elif p == "languages":
            v[p] = _keys(a.languages, where, LANGUAGE, "an ISO 639-1 language code", bad, default=("fa",))
        elif p == "capacity":
            if not 1 <= a.capacity <= 1000:
                bad.append(FieldViolation(where, "must be 1..1000 weighted units"))
            v[p] = a.capacity
        elif p == "after_call_work_seconds":
            if not 0 <= a.after_call_work_seconds <= 3600:
                bad.append(FieldViolation(where, "must be 0..3600 seconds"))
            v[p] = a.after_call_work_seconds
    return v


class Agents:
    def __init__(self, support: Support):
        self.support = support
        self.uow = support.uow
        self.tokens = PageTokens(support.ctx.settings.jwt_secret, "agents")

    def _get(self, conn, agent_id: str, name: str):
        row = conn.execute(agent_query().where(agents.c.id == agent_id)).one_or_none()
        if row is None:
            raise AGENT.not_found(name)
        return row

    def _lock(self, conn, name: str, field: str = "name"):
        aid = AGENT.parse(name, field).id
        row = conn.execute(sa.select(agents).where(agents.c.id == aid).with_for_update()).one_or_none()
        if row is None:
            raise AGENT.not_found(name)
        return row

    def create(self, req: pb.CreateAgentRequest, principal: Principal) -> pb.Agent:
        bad: list[FieldViolation] = []
        agent_id = req.agent_id.strip()
        if not AGENT_ID.fullmatch(agent_id):
            bad.append(
                FieldViolation("agent_id", "is required: the agent's token subject (1..128 letters, digits, . _ @ -)")
            )
        a = req.agent
        paths = ["display_name", "email", "skills", "languages"]
        if a.capacity or "capacity" in [f.name for f, _ in a.ListFields()]:
            paths.append("capacity")
        paths.append("after_call_work_seconds")
        values = _agent_values(a, paths, bad)
        if not a.capacity:
            values.pop("capacity", None)  # the default, 10
        if bad:
            raise InvalidArgument(bad)
        name = AGENT.format(agent_id)
        try:
            with self.uow.begin() as tx:
                tx.execute(agents.insert().values(id=agent_id, **values))
                tx.audit(
                    name,
                    "agent.create",
                    principal,
                    [{"field": k, "old": "null", "new": str(v)} for k, v in values.items()],
                )
        except sa.exc.IntegrityError as exc:
            _unique(exc, f"agent {name} already exists", "agent_id")
        with self.uow.read() as conn:
            return agent_to_proto(self._get(conn, agent_id, name))

    def get(self, name: str) -> pb.Agent:
        aid = AGENT.parse(name).id
        with self.uow.read() as conn:
            return agent_to_proto(self._get(conn, aid, name))

    def list(self, req: pb.ListAgentsRequest) -> tuple[list[pb.Agent], str]:
        limit = page_size(req.page_size)
        where = [AGENT_FILTERS.compile(req.filter)]
        if not re.search(r"\bactive\b", req.filter or ""):
            where.append(agents.c.active)
        keys = parse_order_by(req.order_by.strip() or "display_name", AGENT_SORTABLE)
        order = with_tiebreaker(keys, agents.c.id, descending=keys[-1].descending)
        purpose = query_fingerprint(req.filter, req.order_by)
        with self.uow.read() as conn:
            rows, token = keyset_page(
                conn, agent_query().where(*where), order, self.tokens, purpose, limit, req.page_token
            )
        return [agent_to_proto(r) for r in rows], token

    def update(self, a: pb.Agent, mask, principal: Principal) -> pb.Agent:
        paths = AGENT_MASK.paths(mask)
        bad: list[FieldViolation] = []
        values = _agent_values(a, paths, bad)
        if bad:
            raise InvalidArgument(bad)
        with self.uow.begin() as tx:
            row = self._lock(tx.conn, a.name, "agent.name")
            check_etag(a.etag, row.version, a.name)
            changed = {k: v for k, v in values.items() if row._mapping[k] != v}
            if changed:
                tx.execute(
                    agents.update()
                    .where(agents.c.id == row.id)
                    .values(**changed, version=agents.c.version + 1, update_time=sa.func.now())
                )
                tx.audit(
                    a.name,
                    "agent.update",
                    principal,
                    [{"field": k, "old": str(row._mapping[k]), "new": str(v)} for k, v in changed.items()],
                )
                if changed.get("capacity", 0) > row.capacity or "skills" in changed or "languages" in changed:
                    router(self.support).fill(tx, row.id)
            out = self._get(tx.conn, row.id, a.name)
        return agent_to_proto(out)

    def set_presence(self, req: pb.SetPresenceRequest, principal: Principal) -> pb.Agent:
        presence = PRESENCE_OF.get(req.presence)
        if presence is None:
            raise InvalidArgument.field("presence", "is required: PRESENCE_ONLINE, PRESENCE_AWAY or PRESENCE_OFFLINE")
        aid = AGENT.parse(req.name).id
        if aid != principal.subject and not principal.has("agents.write"):
            raise PermissionDenied("an agent sets only their own presence", reason="NOT_YOUR_PRESENCE")
        with self.uow.begin() as tx:
            row = self._lock(tx.conn, req.name)
            if not row.active and presence != "offline":
                raise FailedPrecondition(f"{req.name} is deactivated", reason="AGENT_INACTIVE")
            r = router(self.support)
            if row.presence != presence:
                tx.execute(
                    agents.update().where(agents.c.id == aid).values(presence=presence, presence_time=sa.func.now())
                )
                tx.audit(
                    req.name, "agent.presence", principal, [{"field": "presence", "old": row.presence, "new": presence}]
                )
                if presence != "online":
                    r.withdraw(tx, ticket_offers.c.agent_id == aid, f"agent went {presence}")
            if presence == "online":  # (again: takes what waits now)
                r.fill(tx, aid)
            out = self._get(tx.conn, aid, req.name)
        return agent_to_proto(out)

    def deactivate(self, req: pb.DeactivateAgentRequest, principal: Principal) -> pb.Agent:
        with self.uow.begin() as tx:
            row = self._lock(tx.conn, req.name)
            check_etag(req.etag, row.version, req.name)
            if row.active:
                tx.execute(
                    agents.update()
                    .where(agents.c.id == row.id)
                    .values(
                        active=False,
                        presence="offline",
                        presence_time=sa.func.now(),
                        version=agents.c.version + 1,
                        update_time=sa.func.now(),
                    )
                )
                tx.audit(req.name, "agent.deactivate", principal, [{"field": "active", "old": "true", "new": "false"}])
                router(self.support).withdraw(tx, ticket_offers.c.agent_id == row.id, "agent deactivated")
            out = self._get(tx.conn, row.id, req.name)
        return agent_to_proto(out)

    # channel weights --------------------------------------------------------------------------
    def weights(self) -> pb.ListChannelWeightsResponse:
        with self.uow.read() as conn:
            rows = conn.execute(sa.select(channel_weights).order_by(channel_weights.c.channel)).all()
        return pb.ListChannelWeightsResponse(
            channel_weights=[
                pb.ChannelWeight(channel=CHANNEL_ENUM[r.channel], weight=r.weight)
                for r in rows
                if r.channel in CHANNEL_ENUM
            ]
        )

    def set_weight(self, req: pb.SetChannelWeightRequest, principal: Principal) -> pb.ChannelWeight:
        bad = []
        channel = CHANNEL_OF.get(req.channel_weight.channel)
        if channel is None:
            bad.append(FieldViolation("channel_weight.channel", "is required: a channel (CHANNEL_PHONE, ...)"))
        if not 1 <= req.channel_weight.weight <= 100:
            bad.append(FieldViolation("channel_weight.weight", "must be 1..100"))
        if bad:
            raise InvalidArgument(bad)
        stmt = pg_insert(channel_weights).values(channel=channel, weight=req.channel_weight.weight)
        with self.uow.begin() as tx:
            tx.execute(stmt.on_conflict_do_update(index_elements=["channel"], set_={"weight": stmt.excluded.weight}))
            tx.audit(
                f"channelWeights/{channel}",
                "channel_weight.set",
                principal,
                [{"field": "weight", "old": "", "new": str(req.channel_weight.weight)}],
            )
        return pb.ChannelWeight(channel=req.channel_weight.channel, weight=req.channel_weight.weight)


# -- teams --------------------------------------------------------------------------------------
def _members():
    return (
        sa.select(
            sa.func.coalesce(
                sa.func.array_agg(aggregate_order_by(team_members.c.agent_id, team_members.c.agent_id)),
                sa.text("'{}'::text[]"),
            )
        )
        .where(team_members.c.team_id == teams.c.id)
        .scalar_subquery()
        .label("member_ids")
    )


def team_to_proto(row) -> pb.Team:
    out = pb.Team(
        name=TEAM.format(row.id),
        display_name=row.name,
        description=row.description,
        manager=row.manager_id,
        calendar=CALENDAR.format(row.calendar_id) if row.calendar_id else "",
        strategy=STRATEGY_ENUM.get(row.strategy, pb.ROUTING_STRATEGY_ROUND_ROBIN),
        offer_timeout_seconds=row.offer_timeout_seconds,
        email_address=row.email_address,
        members=[AGENT.format(m) for m in (row.member_ids or [])],
        deleted=not row.active,
        etag=etag(row.version),
    )
    _set(out, "create_time", row.create_time)
    _set(out, "update_time", row.update_time)
    return out


TEAM_MASK = UpdateMask(
    ["display_name", "description", "manager", "calendar", "strategy", "offer_timeout_seconds", "email_address"],
    immutable={"members": "use AddTeamMembers / RemoveTeamMembers", "deleted": "use DeleteTeam"},
)
TEAM_COLUMN = {"display_name": "name", "manager": "manager_id", "calendar": "calendar_id"}


def _team_values(t: pb.Team, paths, bad: list) -> dict:
    v: dict = {}
    for p in paths:
        where = f"team.{p}"
        if p == "display_name":
            v["name"] = _text(t.display_name, where, TEAM_NAME_LIMIT, bad, required=True)
        elif p == "description":
            v["description"] = _text(t.description, where, DESCRIPTION_LIMIT, bad)
        elif p == "manager":
            v["manager_id"] = _text(t.manager, where, SUBJECT_LIMIT, bad)
        elif p == "calendar":
            v["calendar_id"] = None
            if t.calendar:
                try:
                    v["calendar_id"] = CALENDAR.parse(t.calendar, where).id
                except InvalidArgument as e:
                    bad.extend(e.violations)
        elif p == "strategy":
            if t.strategy not in STRATEGY_OF:
                bad.append(FieldViolation(where, "is not a known strategy"))
            v["strategy"] = STRATEGY_OF.get(t.strategy, "round_robin")
        elif p == "offer_timeout_seconds":
            seconds = t.offer_timeout_seconds or DEFAULT_TIMEOUT
            if not 10 <= seconds <= 3600:
                bad.append(FieldViolation(where, "must be 10..3600 seconds (0 for the default, 120)"))
            v["offer_timeout_seconds"] = seconds
        elif p == "email_address":
            v["email_address"] = _email(t.email_address, where, bad)
    return v


class Teams:
    def __init__(self, support: Support):
        self.support = support
        self.uow = support.uow
        self.tokens = PageTokens(support.ctx.settings.jwt_secret, "teams")

    @staticmethod
    def _get(conn, team_id: str, name: str):
        row = conn.execute(sa.select(teams, _members()).where(teams.c.id == team_id)).one_or_none()
        if row is None:
            raise TEAM.not_found(name)
        return row

    @staticmethod
    def _lock(conn, name: str, field: str = "name", active: bool = True):
        tid = TEAM.parse(name, field).id
        row = conn.execute(sa.select(teams).where(teams.c.id == tid).with_for_update()).one_or_none()
        if row is None:
            raise TEAM.not_found(name)
        if active and not row.active:
            raise FailedPrecondition(f"team {name} was deleted", reason="TEAM_DELETED")
        return row

    @staticmethod
    def _check_refs(conn, values: dict, team_id: str | None = None) -> None:
        cid = values.get("calendar_id")
        if cid and conn.execute(sa.select(calendars.c.id).where(calendars.c.id == cid)).first() is None:
            raise InvalidArgument.field(
                "team.calendar", f"calendar {CALENDAR.format(values['calendar_id'])} does not exist"
            )
        if values.get("email_address"):
            q = sa.select(teams.c.id).where(teams.c.email_address == values["email_address"], teams.c.active)
            if team_id:
                q = q.where(teams.c.id != team_id)
            if conn.execute(q).first() is not None:
                raise AlreadyExists(
                    "another team already receives mail at that address", metadata={"field": "team.email_address"}
                )

    def create(self, t: pb.Team, principal: Principal) -> pb.Team:
        bad: list[FieldViolation] = []
        values = _team_values(t, TEAM_MASK.updatable, bad)
        if bad:
            raise InvalidArgument(bad)
        try:
            with self.uow.begin() as tx:
                self._check_refs(tx.conn, values)
                tid = tx.execute(teams.insert().values(**values).returning(teams.c.id)).scalar()
                tx.audit(
                    TEAM.format(tid),
                    "team.create",
                    principal,
                    [{"field": k, "old": "null", "new": str(v)} for k, v in values.items()],
                )
                row = self._get(tx.conn, tid, TEAM.format(tid))
        except sa.exc.IntegrityError as exc:
            _unique(exc, f"a team named {values['name']!r} already exists", "team.display_name")
        return team_to_proto(row)

    def get(self, name: str) -> pb.Team:
        tid = TEAM.parse(name).id
        with self.uow.read() as conn:
            return team_to_proto(self._get(conn, tid, name))

    def list(self, req: pb.ListTeamsRequest) -> tuple[list[pb.Team], str]:
        limit = page_size(req.page_size)
        q = sa.select(teams, _members())
        if not req.show_deleted:
            q = q.where(teams.c.active)
        order = [(teams.c.name, False), (teams.c.id, False)]
        with self.uow.read() as conn:
            rows, token = keyset_page(conn, q, order, self.tokens, f"deleted={req.show_deleted}", limit, req.page_token)
        return [team_to_proto(r) for r in rows], token

    def update(self, t: pb.Team, mask, principal: Principal) -> pb.Team:
        paths = TEAM_MASK.paths(mask)
        bad: list[FieldViolation] = []
        values = _team_values(t, paths, bad)
        if bad:
            raise InvalidArgument(bad)
        try:
            with self.uow.begin() as tx:
                row = self._lock(tx.conn, t.name, "team.name")
                check_etag(t.etag, row.version, t.name)
                changed = {k: v for k, v in values.items() if row._mapping[k] != v}
                if changed:
                    self._check_refs(tx.conn, changed, row.id)
                    tx.execute(
                        teams.update()
                        .where(teams.c.id == row.id)
                        .values(**changed, version=teams.c.version + 1, update_time=sa.func.now())
                    )
                    tx.audit(
                        t.name,
                        "team.update",
                        principal,
                        [{"field": k, "old": str(row._mapping[k]), "new": str(v)} for k, v in changed.items()],
                    )
                out = self._get(tx.conn, row.id, t.name)
        except sa.exc.IntegrityError as exc:
            _unique(exc, f"a team named {values.get('name')!r} already exists", "team.display_name")
        return team_to_proto(out)

    def delete(self, req: pb.DeleteTeamRequest, principal: Principal) -> None:
        with self.uow.begin() as tx:
            row = self._lock(tx.conn, req.name)
            check_etag(req.etag, row.version, req.name)
            open_count = tx.execute(
                sa.select(sa.func.count()).where(tickets.c.team_id == row.id, tickets.c.state.in_(OPEN_STATES))
            ).scalar()
            if open_count:
                raise FailedPrecondition(
                    f"team {req.name} has {open_count} open tickets; move or close them first",
                    reason="TEAM_HAS_OPEN_TICKETS",
                    metadata={"open_tickets": str(open_count)},
                )
            cat = tx.execute(
                sa.select(categories.c.key).where(categories.c.team_id == row.id, categories.c.active)
            ).first()
            if cat is not None:
                raise FailedPrecondition(
                    f"category {cat.key!r} routes its tickets to team {req.name}; change it first",
                    reason="TEAM_IS_CATEGORY_DEFAULT",
                    metadata={"category": cat.key},
                )
            tx.execute(team_members.delete().where(team_members.c.team_id == row.id))
            tx.execute(
                teams.update()
                .where(teams.c.id == row.id)
                .values(active=False, email_address="", version=teams.c.version + 1, update_time=sa.func.now())
            )
            tx.audit(req.name, "team.delete", principal, [{"field": "active", "old": "true", "new": "false"}])

    def _agent_ids(self, names, bad: list) -> list[str]:
        if not names:
            bad.append(FieldViolation("agents", "name at least one agent (agents/{agent_id})"))
        if len(names) > MAX_MEMBERS:
            bad.append(FieldViolation("agents", f"at most {MAX_MEMBERS} at once"))
        ids = []
        for i, n in enumerate(names):
            try:
                ids.append(AGENT.parse(n, f"agents[{i}]").id)
            except InvalidArgument as e:
                bad.extend(e.violations)
        return list(dict.fromkeys(ids))

    def add_members(self, req: pb.AddTeamMembersRequest, principal: Principal) -> pb.Team:
        bad: list[FieldViolation] = []
        ids = self._agent_ids(list(req.agents), bad)
        if bad:
            raise InvalidArgument(bad)
        with self.uow.begin() as tx:
            row = self._lock(tx.conn, req.team, "team")
            found = set(tx.execute(sa.select(agents.c.id).where(agents.c.id.in_(ids), agents.c.active)).scalars())
            missing = [
                FieldViolation(f"agents[{i}]", f"{AGENT.format(a)} is not an active agent")
                for i, a in enumerate(ids)
                if a not in found
            ]
            if missing:
                raise InvalidArgument(missing)
            added = (
                tx.execute(
                    pg_insert(team_members)
                    .values([{"team_id": row.id, "agent_id": a} for a in ids])
                    .on_conflict_do_nothing()
                    .returning(team_members.c.agent_id)
                )
                .scalars()
                .all()
            )
            if added:
                tx.audit(
                    req.team, "team.add_members", principal, [{"field": "members", "old": "", "new": ",".join(added)}]
                )
                r = router(self.support)
                for a in sorted(added):
                    r.fill(tx, a)
            out = self._get(tx.conn, row.id, req.team)
        return team_to_proto(out)

    def remove_members(self, req: pb.RemoveTeamMembersRequest, principal: Principal) -> pb.Team:
        bad: list[FieldViolation] = []
        ids = self._agent_ids(list(req.agents), bad)
        if bad:
            raise InvalidArgument(bad)
        with self.uow.begin() as tx:
            row = self._lock(tx.conn, req.team, "team")
            removed = (
                tx.execute(
                    team_members.delete()
                    .where(team_members.c.team_id == row.id, team_members.c.agent_id.in_(ids))
                    .returning(team_members.c.agent_id)
                )
                .scalars()
                .all()
            )
            if removed:
                tx.audit(
                    req.team,
                    "team.remove_members",
                    principal,
                    [{"field": "members", "old": ",".join(removed), "new": ""}],
                )
                o = ticket_offers.c
                router(self.support).withdraw(
                    tx, sa.and_(o.team_id == row.id, o.agent_id.in_(removed)), "agent left the team"
                )
            out = self._get(tx.conn, row.id, req.team)
        return team_to_proto(out)


# -- calendars ----------------------------------------------------------------------------------
def calendar_to_proto(row) -> pb.Calendar:
    out = pb.Calendar(
        name=CALENDAR.format(row.id),
        display_name=row.name,
        timezone=row.timezone,
        holiday_country=row.holiday_country or "NONE",
        etag=etag(row.version),
    )
    for day, ranges in (row.weekly_hours or {}).items():
        out.weekly_hours[day].ranges.extend(f"{a}-{b}" for a, b in ranges)
    _set(out, "create_time", row.create_time)
    _set(out, "update_time", row.update_time)
    return out


CALENDAR_MASK = UpdateMask(["display_name", "timezone", "weekly_hours", "holiday_country"])


@functools.cache
def _countries() -> frozenset[str]:
    import holidays

    return frozenset(holidays.list_supported_countries())


def _calendar_values(c: pb.Calendar, paths, bad: list) -> dict:
    v: dict = {}
    for p in paths:
        where = f"calendar.{p}"
        if p == "display_name":
            v["name"] = _text(c.display_name, where, TEAM_NAME_LIMIT, bad, required=True)
        elif p == "timezone":
            tz = c.timezone.strip() or "Asia/Tehran"
            if not dates.is_time_zone(tz):
                bad.append(FieldViolation(where, f"{tz!r} is not an IANA time zone (e.g. Asia/Tehran)"))
            v["timezone"] = tz
        elif p == "weekly_hours":
            weekly = {}
            for day, hours in c.weekly_hours.items():
                key = day.strip().lower()[:3]
                if key not in WEEKDAYS:
                    bad.append(FieldViolation(f"{where}[{day}]", f"a weekday is one of {', '.join(WEEKDAY_NAMES)}"))
                    continue
                ranges = _ranges(hours.ranges, f"{where}[{key}].ranges", bad)
                if ranges:
                    weekly[key] = ranges
            if not weekly and not any(b.field.startswith(where) for b in bad):
                bad.append(FieldViolation(where, "give the hours of at least one weekday, e.g. sat: 08:00-16:00"))
            v["weekly_hours"] = weekly
        elif p == "holiday_country":
            country = c.holiday_country.strip().upper() or "IR"
            if country == "NONE":
                country = ""
            elif country not in _countries():
                bad.append(FieldViolation(where, f"{country!r} is not a country the holidays package knows (or NONE)"))
            v["holiday_country"] = country
    return v


class Calendars:
    def __init__(self, support: Support):
        self.support = support
        self.uow = support.uow
        self.tokens = PageTokens(support.ctx.settings.jwt_secret, "calendars")

    @staticmethod
    def _get(conn, cid: str, name: str):
        row = conn.execute(sa.select(calendars).where(calendars.c.id == cid)).one_or_none()
        if row is None:
            raise CALENDAR.not_found(name)
        return row

    @staticmethod
    def _lock(conn, name: str, field: str = "name"):
        cid = CALENDAR.parse(name, field).id
        row = conn.execute(sa.select(calendars).where(calendars.c.id == cid).with_for_update()).one_or_none()
        if row is None:
            raise CALENDAR.not_found(name)
        return row

    def create(self, c: pb.Calendar, principal: Principal) -> pb.Calendar:
        bad: list[FieldViolation] = []
        values = _calendar_values(c, CALENDAR_MASK.updatable, bad)
        if bad:
            raise InvalidArgument(bad)
        try:
            with self.uow.begin() as tx:
                row = tx.execute(calendars.insert().values(**values).returning(calendars)).one()
                tx.audit(
                    CALENDAR.format(row.id),
                    "calendar.create",
                    principal,
                    [{"field": k, "old": "null", "new": str(v)} for k, v in values.items()],
                )
        except sa.exc.IntegrityError as exc:
            _unique(exc, f"a calendar named {values['name']!r} already exists", "calendar.display_name")
        return calendar_to_proto(row)

    def get(self, name: str) -> pb.Calendar:
        cid = CALENDAR.parse(name).id
        with self.uow.read() as conn:
            return calendar_to_proto(self._get(conn, cid, name))

    def list(self, req: pb.ListCalendarsRequest) -> tuple[list[pb.Calendar], str]:
        limit = page_size(req.page_size)
        order = [(calendars.c.name, False), (calendars.c.id, False)]
        with self.uow.read() as conn:
            rows, token = keyset_page(conn, sa.select(calendars), order, self.tokens, "", limit, req.page_token)
        return [calendar_to_proto(r) for r in rows], token

    def update(self, c: pb.Calendar, mask, principal: Principal) -> pb.Calendar:
        paths = CALENDAR_MASK.paths(mask)
        bad: list[FieldViolation] = []
        values = _calendar_values(c, paths, bad)
        if bad:
            raise InvalidArgument(bad)
        try:
            with self.uow.begin() as tx:
                row = self._lock(tx.conn, c.name, "calendar.name")
                check_etag(c.etag, row.version, c.name)
                changed = {k: v for k, v in values.items() if row._mapping[k] != v}
                if changed:
                    row = tx.execute(
                        calendars.update()
                        .where(calendars.c.id == row.id)
                        .values(**changed, version=calendars.c.version + 1, update_time=sa.func.now())
                        .returning(calendars)
                    ).one()
                    tx.audit(
                        c.name,
                        "calendar.update",
                        principal,
                        [{"field": k, "old": "", "new": str(v)} for k, v in changed.items()],
                    )
        except sa.exc.IntegrityError as exc:
            _unique(exc, f"a calendar named {values.get('name')!r} already exists", "calendar.display_name")
        calendar_cache.forget(row.id)
        return calendar_to_proto(row)

    def _touch(self, tx, cid: str) -> None:
        tx.execute(
            calendars.update()
            .where(calendars.c.id == cid)
            .values(version=calendars.c.version + 1, update_time=sa.func.now())
        )

    def set_day(self, req: pb.SetCalendarDayRequest, principal: Principal) -> pb.CalendarDay:
        d = req.calendar_day
        bad: list[FieldViolation] = []
        day = dates.from_proto(d.day, "calendar_day.day", bad)
        if day is None and not bad:
            bad.append(FieldViolation("calendar_day.day", "is required"))
        ranges = _ranges(d.ranges, "calendar_day.ranges", bad)
        if d.closed and ranges:
            bad.append(
                FieldViolation("calendar_day.ranges", "a closed day has no hours; leave them out or set closed false")
            )
        if not d.closed and not ranges and not any(b.field.startswith("calendar_day.ranges") for b in bad):
            bad.append(FieldViolation("calendar_day.ranges", "give the day's hours (HH:MM-HH:MM), or set closed"))
        label = _text(d.display_name, "calendar_day.display_name", NAME_LIMIT, bad)
        if bad:
            raise InvalidArgument(bad)
        with self.uow.begin() as tx:
            row = self._lock(tx.conn, req.calendar, "calendar")
            values = {"kind": "closed" if d.closed else "open", "ranges": [] if d.closed else ranges, "name": label}
            stmt = pg_insert(calendar_days).values(calendar_id=row.id, day=day, **values)
            tx.execute(stmt.on_conflict_do_update(index_elements=["calendar_id", "day"], set_=values))
            self._touch(tx, row.id)
            tx.audit(
                req.calendar, "calendar.set_day", principal, [{"field": day.isoformat(), "old": "", "new": str(values)}]
            )
        calendar_cache.forget(row.id)
        return pb.CalendarDay(
            calendar=req.calendar,
            day=dates.to_proto(day),
            closed=d.closed,
            ranges=[f"{a}-{b}" for a, b in values["ranges"]],
            display_name=label,
        )

    def delete_day(self, req: pb.DeleteCalendarDayRequest, principal: Principal) -> None:
        day = dates.from_proto(req.day, "day")
        if day is None:
            raise InvalidArgument.field("day", "is required")
        with self.uow.begin() as tx:
            row = self._lock(tx.conn, req.calendar, "calendar")
            gone = tx.execute(
                calendar_days.delete().where(calendar_days.c.calendar_id == row.id, calendar_days.c.day == day)
            ).rowcount
            if not gone:
                raise NotFoundDay(req.calendar, day)
            self._touch(tx, row.id)
            tx.audit(
                req.calendar, "calendar.delete_day", principal, [{"field": day.isoformat(), "old": "set", "new": ""}]
            )
        calendar_cache.forget(row.id)

    def holidays(self, req: pb.ListHolidaysRequest) -> pb.ListHolidaysResponse:
        if 1300 <= req.year <= 1500:
            start, end = jalali_year_bounds(req.year)
        elif 1980 <= req.year <= 2100:
            start, end = dt.date(req.year, 1, 1), dt.date(req.year + 1, 1, 1)
        else:
            raise InvalidArgument.field(
                "year", "must be a Solar Hijri year (1300..1500) or a Gregorian one (1980..2100)"
            )
        cid = CALENDAR.parse(req.calendar, "calendar").id
        with self.uow.read() as conn:
            row = self._get(conn, cid, req.calendar)
            own = conn.execute(
                sa.select(calendar_days)
                .where(calendar_days.c.calendar_id == cid, calendar_days.c.day >= start, calendar_days.c.day < end)
                .order_by(calendar_days.c.day)
            ).all()
        own_by_day = {d.day: d for d in own}
        out = []
        if row.holiday_country:
            for year in range(start.year, (end - dt.timedelta(days=1)).year + 1):
                for day, (name, lunar, estimated) in sorted(public_holidays(row.holiday_country, year).items()):
                    if not start <= day < end:
                        continue
                    mine = own_by_day.get(day)
                    h = pb.Holiday(
                        day=dates.to_proto(day),
                        jalali_day=format_jalali(day),
                        display_name=name,
                        source=pb.Holiday.SOURCE_PUBLIC,
                        closed=not (mine is not None and mine.kind == "open"),
                        lunar=lunar,
                        estimated=estimated,
                    )
                    if mine is not None and mine.kind == "open":
                        h.ranges.extend(f"{a}-{b}" for a, b in mine.ranges)
                    out.append(h)
        for d in own:
            out.append(
                pb.Holiday(
                    day=dates.to_proto(d.day),
                    jalali_day=format_jalali(d.day),
                    display_name=d.name,
                    source=pb.Holiday.SOURCE_CALENDAR,
                    closed=d.kind == "closed",
                    ranges=[f"{a}-{b}" for a, b in d.ranges],
                )
            )
        out.sort(key=lambda h: ((h.day.year, h.day.month, h.day.day), h.source))
        return pb.ListHolidaysResponse(holidays=out)


def NotFoundDay(calendar: str, day: dt.date):  # noqa: N802 (an error's constructor)
    from crm_chassis.errors import NotFound

    return NotFound(
        f"calendar {calendar} has no day of its own on {day.isoformat()}",
        reason="CALENDAR_DAY_NOT_FOUND",
        metadata={"calendar": calendar, "day": day.isoformat()},
    )


@functools.lru_cache(maxsize=64)
def public_holidays(country: str, year: int) -> dict[dt.date, tuple[str, bool, bool]]:
    """day -> (name in the country's language, lunar, estimated) from the `holidays` package.

    estimated: the package computed the date (its "(estimated)" label, found by comparing with
    the same year without the label). lunar: an Islamic holiday, found the same way in a year
    far enough ahead that the package estimates every lunar date."""
    import holidays

    base = holidays.country_holidays(country, years=year)
    cls = type(base)
    language = getattr(base, "default_language", None)
    if "islamic_show_estimated" not in inspect.signature(cls.__init__).parameters:
        h = holidays.country_holidays(country, years=year, language=language)
        return {d: (n, False, False) for d, n in h.items()}
    shown = cls(years=year, language=language)
    plain = cls(years=year, language=language, islamic_show_estimated=False)
    lunar_names = _lunar_names(cls, language)
    out = {}
    for d, name in shown.items():
        bare = plain.get(d, name)
        lunar = any(part.strip() in lunar_names for part in bare.split(";"))
        out[d] = (name, lunar, name != bare)
    return out


@functools.lru_cache(maxsize=16)
def _lunar_names(cls, language) -> frozenset[str]:
    far = dt.date.today().year + 40
    shown = cls(years=far, language=language)
    plain = cls(years=far, language=language, islamic_show_estimated=False)
    names = set()
    for d, name in shown.items():
        if name != plain.get(d):
            names.update(p.strip() for p in plain[d].split(";"))
    return frozenset(names)


# -- servicers -------------------------------------------------------------------------------
class AgentServicer(agents_pb2_grpc.AgentServiceServicer):
    def __init__(self, uc: Agents):
        self.uc = uc

    def CreateAgent(self, request, context):
        return self.uc.create(request, current_principal())

    def GetAgent(self, request, context):
        return self.uc.get(request.name)

    def ListAgents(self, request, context):
        items, token = self.uc.list(request)
        return pb.ListAgentsResponse(agents=items, next_page_token=token)

    def UpdateAgent(self, request, context):
        return self.uc.update(request.agent, request.update_mask, current_principal())

    def SetPresence(self, request, context):
        return self.uc.set_presence(request, current_principal())

    def DeactivateAgent(self, request, context):
        return self.uc.deactivate(request, current_principal())

    def ListChannelWeights(self, request, context):
        return self.uc.weights()

    def SetChannelWeight(self, request, context):
        return self.uc.set_weight(request, current_principal())


class TeamServicer(agents_pb2_grpc.TeamServiceServicer):
    def __init__(self, uc: Teams):
        self.uc = uc

    def CreateTeam(self, request, context):
        return self.uc.create(request.team, current_principal())

    def GetTeam(self, request, context):
        return self.uc.get(request.name)

    def ListTeams(self, request, context):
        items, token = self.uc.list(request)
        return pb.ListTeamsResponse(teams=items, next_page_token=token)

    def UpdateTeam(self, request, context):
        return self.uc.update(request.team, request.update_mask, current_principal())

    def DeleteTeam(self, request, context):
        self.uc.delete(request, current_principal())
        return empty_pb2.Empty()

    def AddTeamMembers(self, request, context):
        return self.uc.add_members(request, current_principal())

    def RemoveTeamMembers(self, request, context):
        return self.uc.remove_members(request, current_principal())


class CalendarServicer(agents_pb2_grpc.CalendarServiceServicer):
    def __init__(self, uc: Calendars):
        self.uc = uc

    def CreateCalendar(self, request, context):
        return self.uc.create(request.calendar, current_principal())

    def GetCalendar(self, request, context):
        return self.uc.get(request.name)

    def ListCalendars(self, request, context):
        items, token = self.uc.list(request)
        return pb.ListCalendarsResponse(calendars=items, next_page_token=token)

    def UpdateCalendar(self, request, context):
        return self.uc.update(request.calendar, request.update_mask, current_principal())

    def SetCalendarDay(self, request, context):
        return self.uc.set_day(request, current_principal())

    def DeleteCalendarDay(self, request, context):
        self.uc.delete_day(request, current_principal())
        return empty_pb2.Empty()

    def ListHolidays(self, request, context):
        return self.uc.holidays(request)


def registration(support: Support) -> list[Registration]:
    """AgentService, TeamService and CalendarService."""
    return [
        Registration.of(AgentServicer(support.once("agents", lambda: Agents(support)))),
        Registration.of(TeamServicer(support.once("teams", lambda: Teams(support)))),
        Registration.of(CalendarServicer(support.once("calendars", lambda: Calendars(support)))),
    ]
