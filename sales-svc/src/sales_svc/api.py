"""SalesService (proto/crm/sales/v1/sales_service.proto): teams.

A team is a manager and members (token subjects). access.py reads them: a sales manager sees
the records of the members of the teams they manage and the records assigned to those teams.
Teams are written by holders of teams.write: an admin (sales.records.all) any team; anyone
else only a team they manage, and may not give it to another manager (or they could not
undo it).
"""

from __future__ import annotations

import re

import sqlalchemy as sa
from google.protobuf import timestamp_pb2
from sqlalchemy.dialects import postgresql as pg

from crm.sales.v1 import sales_service_pb2 as pb
from crm.sales.v1 import sales_service_pb2_grpc
from crm_chassis import audit
from crm_chassis.auth import Principal
from crm_chassis.errors import AlreadyExists, FailedPrecondition, FieldViolation, InvalidArgument, PermissionDenied
from crm_chassis.filtering import (
    FieldType,
    FilterField,
    FilterSchema,
    column_condition,
    keyset_page,
    parse_order_by,
    query_fingerprint,
    with_tiebreaker,
)
from crm_chassis.grpc_server import Registration
from crm_chassis.interceptors import current_principal
from crm_chassis.pagination import PageTokens, page_size
from crm_chassis.resources import ResourceName, UpdateMask, changes, check_etag, etag

from . import access
from .rules_tables import assignment_rules
from .runtime import Sales
from .tables import invoices, leads, opportunities, orders, team_members, teams

TEAM = ResourceName("teams/{id}")
MAX_MEMBERS_PER_CALL = 1000
_SUBJECT = re.compile(r"[^\s\x00-\x1f]{1,200}")

TEAM_FILTERS = FilterSchema(
    FilterField("display_name", teams.c.name),
    FilterField("manager", teams.c.manager_id),
    FilterField(
        "member",
        lambda op, value: sa.exists().where(
            team_members.c.team_id == teams.c.id, column_condition(team_members.c.member_id, op, value)
        ),
        operators=frozenset({"="}),
    ),
    FilterField("create_time", teams.c.create_time, FieldType.TIMESTAMP),
)
TEAM_SORTABLE = {"display_name": teams.c.name, "create_time": teams.c.create_time}
TEAM_MASK = UpdateMask(["display_name", "manager", "description"])
_COLUMN = {"display_name": "name", "manager": "manager_id", "description": "description"}


def ts(value) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    t = timestamp_pb2.Timestamp()
    t.FromDatetime(value)
    return t


def subject(value: str, field: str) -> str:
    v = (value or "").strip()
    if not _SUBJECT.fullmatch(v):
        raise InvalidArgument.field(field, "must be a subject: 1-200 characters, no spaces")
    return v


def _text(value: str, field: str, limit: int, required: bool = False) -> str:
    v = (value or "").strip()
    if required and not v:
        raise InvalidArgument.field(field, "must not be empty")
    if len(v) > limit:
        raise InvalidArgument.field(field, f"must be at most {limit} characters")
    return v


def _subjects(values, field: str) -> list[str]:
    if not values:
        raise InvalidArgument.field(field, "name at least one member")
    if len(values) > MAX_MEMBERS_PER_CALL:
        raise InvalidArgument.field(field, f"at most {MAX_MEMBERS_PER_CALL} members per call")
    bad, out = [], []
    for i, v in enumerate(values):
        try:
            out.append(subject(v, f"{field}[{i}]"))
        except InvalidArgument as e:
            bad += e.violations
    if bad:
        raise InvalidArgument(bad[:20])
    return sorted(set(out))


def team_to_proto(row, members: list[str]) -> pb.Team:
    return pb.Team(
        name=TEAM.format(row.id),
        display_name=row.name,
        manager=row.manager_id,
        description=row.description,
        members=members,
        create_time=ts(row.create_time),
        update_time=ts(row.update_time),
        etag=etag(row.version),
    )


def members_of(conn, team_id: str) -> list[str]:
    return list(
        conn.execute(
            sa.select(team_members.c.member_id)
            .where(team_members.c.team_id == team_id)
            .order_by(team_members.c.member_id)
        ).scalars()
    )


class Teams:
    def __init__(self, sales: Sales):
        self.sales = sales
        self.uow = sales.uow
        self.tokens = PageTokens(sales.ctx.settings.jwt_secret, "teams")

    # -- helpers -------------------------------------------------------------------------
    def _row(self, conn, name: str, field: str = "name", lock: bool = False):
        tid = TEAM.parse(name, field).id
        q = sa.select(teams).where(teams.c.id == tid)
        row = conn.execute(q.with_for_update() if lock else q).one_or_none()
        if row is None:
            raise TEAM.not_found(name)
        return row

    @staticmethod
    def _may_write(principal: Principal, row) -> None:
        if principal.has(access.ALL) or row.manager_id == principal.subject:
            return
        raise PermissionDenied(
            f"only the team's manager ({row.manager_id or 'none'}) or an admin may change teams/{row.id}",
            reason="NOT_TEAM_MANAGER",
            metadata={"name": TEAM.format(row.id)},
        )

    @staticmethod
    def _may_manage(principal: Principal, manager: str, field: str) -> None:
        if principal.has(access.ALL) or manager == principal.subject:
            return
        raise PermissionDenied(
            f"{field}: only an admin may make someone else ({manager}) a team's manager",
            reason="NOT_TEAM_MANAGER",
            metadata={"field": field},
        )

    def _bump(self, conn, tid: str):
        return conn.execute(
            teams.update()
            .where(teams.c.id == tid)
            .values(version=teams.c.version + 1, update_time=sa.func.now())
            .returning(*teams.c)
        ).one()

    # -- use cases -----------------------------------------------------------------------
    def create(self, t: pb.Team, request_id: str, principal: Principal) -> pb.Team:
        bad: list[FieldViolation] = []
        values = {}
        for key, fn in (
            ("name", lambda: _text(t.display_name, "team.display_name", 100, required=True)),
            ("description", lambda: _text(t.description, "team.description", 2000)),
            ("manager_id", lambda: subject(t.manager or principal.subject, "team.manager")),
            ("members", lambda: _subjects(list(t.members), "team.members") if t.members else []),
            ("request_id", lambda: _text(request_id, "request_id", 200) or None),
        ):
            try:
                values[key] = fn()
            except InvalidArgument as e:
                bad += e.violations
        if bad:
            raise InvalidArgument(bad)
        members = values.pop("members")
        self._may_manage(principal, values["manager_id"], "team.manager")
        with self.uow.begin() as tx:
            conn = tx.conn
            if values["request_id"]:
                done = conn.execute(sa.select(teams).where(teams.c.request_id == values["request_id"])).one_or_none()
                if done is not None:
                    return team_to_proto(done, members_of(conn, done.id))
            try:
                with conn.begin_nested():
                    row = conn.execute(teams.insert().values(**values).returning(*teams.c)).one()
            except sa.exc.IntegrityError as exc:
                if "request_id" in str(exc.orig):  # the same request, committed meanwhile
                    raise AlreadyExists("this request_id was used by a concurrent call; retry it") from None
                raise AlreadyExists(
                    f"a team named {values['name']!r} already exists",
                    reason="TEAM_EXISTS",
                    metadata={"field": "team.display_name"},
                ) from None
            if members:
                conn.execute(team_members.insert(), [{"team_id": row.id, "member_id": m} for m in members])
            name = TEAM.format(row.id)
            tx.audit(
                name,
                "team.create",
                principal,
                [
                    audit.change("display_name", "null", audit.value(row.name)),
                    audit.change("manager", "null", audit.value(row.manager_id)),
                    *([audit.change("members", "null", audit.value(members))] if members else []),
                ],
            )
        return team_to_proto(row, members)

    def get(self, name: str) -> pb.Team:
        with self.uow.read() as conn:
            row = self._row(conn, name)
            return team_to_proto(row, members_of(conn, row.id))

    def list(self, size: int, token: str, filter_text: str, order_by: str) -> tuple[list[pb.Team], str]:
        where = TEAM_FILTERS.compile(filter_text)
        order = with_tiebreaker(parse_order_by(order_by.strip() or "display_name", TEAM_SORTABLE), teams.c.id)
        members = (
            sa.select(pg.array_agg(pg.aggregate_order_by(team_members.c.member_id, team_members.c.member_id)))
            .where(team_members.c.team_id == teams.c.id)
            .scalar_subquery()
            .label("members")
        )
        with self.uow.read() as conn:
            rows, nxt = keyset_page(
                conn,
                sa.select(*teams.c, members).where(where),
                order,
                self.tokens,
                query_fingerprint(filter_text, order_by),
                page_size(size),
                token,
            )
        return [team_to_proto(r, list(r.members or [])) for r in rows], nxt

    def update(self, t: pb.Team, mask, principal: Principal) -> pb.Team:
        paths = TEAM_MASK.paths(mask)
        TEAM.parse(t.name, "team.name")
        convert = {
            "display_name": lambda: _text(t.display_name, "team.display_name", 100, required=True),
            "manager": lambda: subject(t.manager, "team.manager"),
            "description": lambda: _text(t.description, "team.description", 2000),
        }
        bad, values = [], {}
        for p in paths:
            try:
                values[_COLUMN[p]] = convert[p]()
            except InvalidArgument as e:
                bad += e.violations
        if bad:
            raise InvalidArgument(bad)
        with self.uow.begin() as tx:
            conn = tx.conn
            row = self._row(conn, t.name, "team.name", lock=True)
            self._may_write(principal, row)
            check_etag(t.etag, row.version, t.name)
            if "manager_id" in values:
                self._may_manage(principal, values["manager_id"], "team.manager")
            diff = changes(row._mapping, values)
            if diff:
                try:
                    with conn.begin_nested():
                        row = conn.execute(
                            teams.update()
                            .where(teams.c.id == row.id)
                            .values(
                                **{c.field: values[c.field] for c in diff},
                                version=teams.c.version + 1,
                                update_time=sa.func.now(),
                            )
                            .returning(*teams.c)
                        ).one()
                except sa.exc.IntegrityError:
                    raise AlreadyExists(
                        f"a team named {values.get('name')!r} already exists",
                        reason="TEAM_EXISTS",
                        metadata={"field": "team.display_name"},
                    ) from None
                public = {v: k for k, v in _COLUMN.items()}
                tx.audit(
                    t.name,
                    "team.update",
                    principal,
                    [audit.change(public[c.field], audit.value(c.old), audit.value(c.new)) for c in diff],
                )
            return team_to_proto(row, members_of(conn, row.id))

    def delete(self, name: str, given_etag: str, principal: Principal) -> int:
        with self.uow.begin() as tx:
            conn = tx.conn
            row = self._row(conn, name, lock=True)
            self._may_write(principal, row)
            check_etag(given_etag, row.version, name)
            users = []
            for label, table in (
                ("leads", leads),
                ("opportunities", opportunities),
                ("orders", orders),
                ("invoices", invoices),
                ("assignment rules", assignment_rules),
            ):
                n = conn.execute(sa.select(sa.func.count()).where(table.c.team_id == row.id)).scalar_one()
                if n:
                    users.append(f"{n} {label}")
            if users:
                raise FailedPrecondition(
                    f"{name} is still referenced by {', '.join(users)}: reassign them to another team first",
                    reason="TEAM_IN_USE",
                    metadata={"name": name, "rule": "a team in use by records or rules cannot be deleted"},
                )
            members = members_of(conn, row.id)
            conn.execute(teams.delete().where(teams.c.id == row.id))
            tx.audit(
                name,
                "team.delete",
                principal,
                [
                    audit.change("display_name", audit.value(row.name), "null"),
                    audit.change("members", audit.value(members), "null"),
                ],
            )
        return len(members)

    def add_members(self, name: str, values, principal: Principal) -> tuple[int, pb.Team]:
        TEAM.parse(name, "team")
        subjects = _subjects(values, "members")
        with self.uow.begin() as tx:
            conn = tx.conn
            row = self._row(conn, name, "team", lock=True)
            self._may_write(principal, row)
            added = list(
                conn.execute(
                    pg.insert(team_members)
                    .values([{"team_id": row.id, "member_id": m} for m in subjects])
                    .on_conflict_do_nothing()
                    .returning(team_members.c.member_id)
                ).scalars()
            )
            if added:
                row = self._bump(conn, row.id)
                tx.audit(
                    name, "team.add_members", principal, [audit.change("members", "null", audit.value(sorted(added)))]
                )
            return len(added), team_to_proto(row, members_of(conn, row.id))

    def remove_members(self, name: str, values, principal: Principal) -> tuple[int, pb.Team]:
        TEAM.parse(name, "team")
        subjects = _subjects(values, "members")
        with self.uow.begin() as tx:
            conn = tx.conn
            row = self._row(conn, name, "team", lock=True)
            self._may_write(principal, row)
            removed = list(
                conn.execute(
                    team_members.delete()
                    .where(team_members.c.team_id == row.id, team_members.c.member_id.in_(subjects))
                    .returning(team_members.c.member_id)
                ).scalars()
            )
            if removed:
                row = self._bump(conn, row.id)
                tx.audit(
                    name,
                    "team.remove_members",
                    principal,
                    [audit.change("members", audit.value(sorted(removed)), "null")],
                )
            return len(removed), team_to_proto(row, members_of(conn, row.id))

    def list_members(self, name: str, size: int, token: str) -> tuple[list[pb.TeamMember], str]:
        with self.uow.read() as conn:
            row = self._row(conn, name, "team")
            rows, nxt = keyset_page(
                conn,
                sa.select(team_members).where(team_members.c.team_id == row.id),
                [(team_members.c.member_id, False)],
                self.tokens,
                f"members:{row.id}",
                page_size(size),
                token,
            )
        return [pb.TeamMember(member=r.member_id, join_time=ts(r.join_time)) for r in rows], nxt


class SalesServicer(sales_service_pb2_grpc.SalesServiceServicer):
    def __init__(self, sales: Sales):
        self.sales = sales
        self.teams = Teams(sales)

    def CreateTeam(self, request, context):
        return self.teams.create(request.team, request.request_id, current_principal())

    def GetTeam(self, request, context):
        return self.teams.get(request.name)

    def ListTeams(self, request, context):
        items, token = self.teams.list(request.page_size, request.page_token, request.filter, request.order_by)
        return pb.ListTeamsResponse(teams=items, next_page_token=token)

    def UpdateTeam(self, request, context):
        return self.teams.update(request.team, request.update_mask, current_principal())

    def DeleteTeam(self, request, context):
        n = self.teams.delete(request.name, request.etag, current_principal())
        return pb.DeleteTeamResponse(removed_members=n)

    def AddTeamMembers(self, request, context):
        n, team = self.teams.add_members(request.team, list(request.members), current_principal())
        return pb.AddTeamMembersResponse(added=n, team=team)

    def RemoveTeamMembers(self, request, context):
        n, team = self.teams.remove_members(request.team, list(request.members), current_principal())
        return pb.RemoveTeamMembersResponse(removed=n, team=team)

    def ListTeamMembers(self, request, context):
        items, token = self.teams.list_members(request.team, request.page_size, request.page_token)
        return pb.ListTeamMembersResponse(members=items, next_page_token=token)


def registration(sales: Sales) -> Registration:
    return Registration.of(SalesServicer(sales))
