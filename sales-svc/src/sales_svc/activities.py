"""ActivityService (proto/crm/sales/v1/activities.proto): calls, meetings, tasks and e-mails
about a lead, an opportunity or a customer; the caller's agenda (overdue, due today in
Asia/Tehran); reminders as durable timers that publish activity.reminder_due.v1.

Rules, in one place:
- an activity is about exactly one lead, opportunity or customer; a lead or opportunity must
  exist (not deleted) and be visible to the caller; its customer is copied onto the activity;
- the owner defaults to the caller, and any other owner or a team goes through
  `Scope.require_assign`; every read applies `Scope.visible` on the activity's owner and team;
- remind_time needs a due_time and is not after it; the reminder timer (kind
  `activity.reminder`, key the activity id) is set in the transaction that sets remind_time,
  moved when it changes, cancelled when the activity is completed, deleted or its reminder
  cleared;
- logging (creating) or completing an activity on a lead sets the lead's touch_time (the
  untouched-lead reassignment reads it); the lead's version does not move (not an edit).
"""

from __future__ import annotations

import datetime as dt
import re

import sqlalchemy as sa
from google.protobuf import empty_pb2

from crm.sales.v1 import activities_pb2 as pb
from crm.sales.v1 import activities_pb2_grpc, sales_events_pb2
from crm_chassis import audit, dates, timers
from crm_chassis.auth import Principal
from crm_chassis.errors import FailedPrecondition, FieldViolation, InvalidArgument
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
from crm_chassis.resources import ResourceName, UpdateMask, changes, check_etag, etag, same_requester
from crm_chassis.uow import Transaction

from .access import OWNER_LIMIT, Scope
from .runtime import Sales
from .tables import UUID, customer_refs, leads, metadata, opportunities, teams

MAX_DURATION = 7 * 24 * 3600  # a call or meeting of a week at most
DURATION_RULE = f"must be 0..{MAX_DURATION} seconds (a week)"

REMINDER = "activity.reminder"  # timer kind; key: the activity id

KINDS = ("call", "meeting", "task", "email")
DIRECTIONS = ("inbound", "outbound")
DIRECTED = ("call", "email")  # the kinds that have a direction
# A call's outcome is one of these; other kinds take a free key of the same shape.
CALL_OUTCOMES = ("answered", "no_answer", "busy", "left_message", "wrong_number", "callback_requested")
OUTCOME_KEY = re.compile(r"[a-z0-9_]{1,40}")

KIND_OF = {pb.Activity.KIND_CALL: "call", pb.Activity.KIND_MEETING: "meeting"}
KIND_OF |= {pb.Activity.KIND_TASK: "task", pb.Activity.KIND_EMAIL: "email"}
KIND_ENUM = {v: k for k, v in KIND_OF.items()}
DIRECTION_OF = {pb.Activity.DIRECTION_INBOUND: "inbound", pb.Activity.DIRECTION_OUTBOUND: "outbound"}
DIRECTION_ENUM = {v: k for k, v in DIRECTION_OF.items()}

SUBJECT_LIMIT = 300
DESCRIPTION_LIMIT = 10_000

activities = sa.Table(
    "activities",
    metadata,
    sa.Column("id", UUID, primary_key=True, server_default=sa.text("gen_random_uuid()")),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("regarding", sa.Text, nullable=False),  # leads/{id}, opportunities/{id} or customers/{id}
    sa.Column("lead_id", UUID),
    sa.Column("opportunity_id", UUID),
    sa.Column("customer_id", sa.Text, nullable=False, server_default=""),  # customer-svc id, "" if unknown
    sa.Column("owner_id", sa.Text, nullable=False),
    sa.Column("team_id", UUID, sa.ForeignKey("teams.id")),
    sa.Column("due_time", sa.DateTime(timezone=True)),
    sa.Column("remind_time", sa.DateTime(timezone=True)),
    sa.Column("duration_seconds", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("outcome", sa.Text, nullable=False, server_default=""),
    sa.Column("direction", sa.Text, nullable=False, server_default=""),
    sa.Column("done", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("complete_time", sa.DateTime(timezone=True)),
    sa.Column("creator", sa.Text, nullable=False, server_default=""),
    sa.Column("request_id", sa.Text, unique=True),
    sa.Column("version", sa.Integer, nullable=False, server_default="1"),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("update_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.CheckConstraint(f"kind IN {KINDS!r}", name="activities_kind"),
    sa.CheckConstraint("direction IN ('', 'inbound', 'outbound')", name="activities_direction"),
    sa.CheckConstraint("num_nonnulls(lead_id, opportunity_id) <= 1", name="activities_one_regarding"),
    sa.CheckConstraint("remind_time IS NULL OR remind_time <= due_time", name="activities_remind_before_due"),
)
a = activities.c
# The pages of a List: everyone's (admin), by owner (rep, manager), by team, per regarding record
# and per customer, newest first.
sa.Index("activities_page", a.create_time.desc(), a.id.desc())
sa.Index("activities_owner_page", a.owner_id, a.create_time.desc(), a.id.desc())
sa.Index("activities_team_page", a.team_id, a.create_time.desc(), a.id.desc())
sa.Index("activities_regarding_page", a.regarding, a.create_time.desc(), a.id.desc())
sa.Index(
    "activities_customer_page", a.customer_id, a.create_time.desc(), a.id.desc(), postgresql_where=a.customer_id != ""
)
# The agenda: the caller's open activities by due time (overdue) and all of them by due time (today).
sa.Index("activities_agenda_open", a.owner_id, a.due_time, a.id, postgresql_where=sa.not_(a.done))
sa.Index("activities_agenda", a.owner_id, a.due_time, a.id)

ACTIVITY = ResourceName("activities/{id}")
LEAD = ResourceName("leads/{id}")
OPPORTUNITY = ResourceName("opportunities/{id}")
CUSTOMER = ResourceName("customers/{id}")
TEAM = ResourceName("teams/{id}")


def clock() -> dt.datetime:
    """Now (UTC): the agenda's reference time."""
    return dt.datetime.now(dt.UTC)


def tehran_day(now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """The Asia/Tehran calendar day holding `now`, as [start, end) aware datetimes."""
    day = now.astimezone(dates.TEHRAN).date()
    start, end = dates.start_of_day(day), dates.end_of_day(day)
    return start, end


# -- filtering and ordering -------------------------------------------------------------------
def _enum_names(mapping: dict, prefix: str) -> dict[str, str]:
    """CALL, KIND_CALL and call all name "call"."""
    out = {}
    for key in mapping:
        out[key.upper()] = out[key] = out[f"{prefix}_{key.upper()}"] = key
    return out


def _name_filter(column, pattern: ResourceName, field: str, bare: bool = True):
    """A filter on a full resource name (customers/{id}) over a column that keeps the bare id
    (or, not `bare`, the name itself: lead and opportunity are read from regarding)."""

    def compile_(op: str, value):
        if value is None:
            raise ValueError(f"{field} takes a name; for none, filter on regarding")
        if not isinstance(value, str) or not pattern.matches(value):
            raise ValueError(f"{field} takes a name like {pattern.format('…')!r}")
        stored = value.split("/", 1)[1] if bare else value
        if op == "=":
            return column == stored
        if op == "!=":
            return column.is_distinct_from(stored)
        raise ValueError(f"{field} takes only = and !=")

    return compile_


FILTERS = FilterSchema(
    FilterField("kind", a.kind, FieldType.ENUM, enum_values=_enum_names(KIND_ENUM, "KIND")),
    FilterField("direction", a.direction, FieldType.ENUM, enum_values=_enum_names(DIRECTION_ENUM, "DIRECTION")),
    FilterField("owner", a.owner_id),
    FilterField("team", _name_filter(a.team_id, TEAM, "team"), operators=frozenset({"=", "!="})),
    FilterField("regarding", a.regarding, operators=frozenset({"=", "!="})),
    FilterField("lead", _name_filter(a.regarding, LEAD, "lead", bare=False), operators=frozenset({"=", "!="})),
    FilterField(
        "opportunity",
        _name_filter(a.regarding, OPPORTUNITY, "opportunity", bare=False),
        operators=frozenset({"=", "!="}),
    ),
    FilterField("customer", _name_filter(a.customer_id, CUSTOMER, "customer"), operators=frozenset({"=", "!="})),
    FilterField("done", a.done, FieldType.BOOL),
    FilterField("outcome", a.outcome),
    FilterField("subject", a.subject),
    FilterField("due_time", a.due_time, FieldType.TIMESTAMP),
    FilterField("remind_time", a.remind_time, FieldType.TIMESTAMP),
    FilterField("complete_time", a.complete_time, FieldType.TIMESTAMP),
    FilterField("create_time", a.create_time, FieldType.TIMESTAMP),
)
SORTABLE = {
    "due_time": a.due_time,
    "remind_time": a.remind_time,
    "complete_time": a.complete_time,
    "create_time": a.create_time,
    "update_time": a.update_time,
}
AGENDA_ORDER = [(a.due_time, False), (a.id, False)]  # oldest due first

UPDATABLE = [
    "subject",
    "description",
    "owner",
    "team",
    "due_time",
    "remind_time",
    "duration_seconds",
    "outcome",
    "direction",
]
MASK = UpdateMask(
    UPDATABLE,
    immutable={
        "kind": "create another activity instead",
        "lead": "create another activity instead",
        "opportunity": "create another activity instead",
        "customer": "create another activity instead",
        "regarding": "create another activity instead",
        "done": "use CompleteActivity",
        "complete_time": "use CompleteActivity",
    },
)
COLUMN_OF = {"owner": "owner_id", "team": "team_id"}  # the other paths are their own column


# -- conversions ------------------------------------------------------------------------------
def _ts(message, field: str) -> dt.datetime | None:
    return getattr(message, field).ToDatetime(tzinfo=dt.UTC) if message.HasField(field) else None


def _set_ts(target, field: str, value: dt.datetime | None) -> None:
    if value is not None:
        getattr(target, field).FromDatetime(value)


def to_proto(row) -> pb.Activity:
    out = pb.Activity(
        name=ACTIVITY.format(row.id),
        kind=KIND_ENUM[row.kind],
        subject=row.subject,
        description=row.description,
        lead=LEAD.format(row.lead_id) if row.lead_id else "",
        opportunity=OPPORTUNITY.format(row.opportunity_id) if row.opportunity_id else "",
        customer=CUSTOMER.format(row.customer_id) if row.customer_id else "",
        regarding=row.regarding,
        owner=row.owner_id,
        team=TEAM.format(row.team_id) if row.team_id else "",
        duration_seconds=row.duration_seconds,
        outcome=row.outcome,
        direction=DIRECTION_ENUM.get(row.direction, pb.Activity.DIRECTION_UNSPECIFIED),
        done=row.done,
        creator=row.creator,
        etag=etag(row.version),
    )
    for f in ("due_time", "remind_time", "complete_time", "create_time", "update_time"):
        _set_ts(out, f, getattr(row, f))
    return out


def to_event(row, event_time: dt.datetime) -> sales_events_pb2.ActivityEvent:
    """The ActivityEvent of a stored row: flat facts, no personal data."""
    ev = sales_events_pb2.ActivityEvent(
        activity=ACTIVITY.format(row.id),
        kind=row.kind,
        subject=row.subject,
        regarding=row.regarding,
        customer=CUSTOMER.format(row.customer_id) if row.customer_id else "",
        owner=row.owner_id,
        outcome=row.outcome,
        duration_seconds=row.duration_seconds,
    )
    for f in ("due_time", "remind_time", "complete_time"):
        _set_ts(ev, f, getattr(row, f))
    ev.event_time.FromDatetime(event_time)
    return ev


def _check_outcome(kind: str, outcome: str, field: str, bad: list[FieldViolation]) -> None:
    if not outcome:
        return
    if kind == "call":
        if outcome not in CALL_OUTCOMES:
            bad.append(FieldViolation(field, f"a call's outcome is one of {', '.join(CALL_OUTCOMES)}"))
    elif not OUTCOME_KEY.fullmatch(outcome):
        bad.append(FieldViolation(field, "must be a key of lower-case letters, digits and '_' (at most 40)"))


def _check_text(value: str, field: str, limit: int, bad: list[FieldViolation], required: bool = False) -> str:
    v = value.strip()
    if required and not v:
        bad.append(FieldViolation(field, "must not be empty"))
    elif len(v) > limit:
        bad.append(FieldViolation(field, f"must be at most {limit} characters"))
    return v


def _check_times(due, remind, bad: list[FieldViolation], field: str = "activity.remind_time") -> None:
    if remind is None:
        return
    if due is None:
        bad.append(FieldViolation(field, "a reminder needs a due_time"))
    elif remind > due:
        bad.append(FieldViolation(field, "must not be after due_time"))


def _check_direction(kind: str, direction: str, field: str, bad: list[FieldViolation]) -> None:
    if direction and kind not in DIRECTED:
        bad.append(FieldViolation(field, "only calls and e-mails have a direction"))


def _parse(pattern: ResourceName, value: str, field: str, bad: list[FieldViolation]) -> str | None:
    try:
        return pattern.parse(value, field).id
    except InvalidArgument as e:
        bad.extend(e.violations)
        return None


# -- the use cases ------------------------------------------------------------------------------
class Activities:
    def __init__(self, sales: Sales):
        self.sales = sales
        self.uow = sales.uow
        self.tokens = PageTokens(sales.ctx.settings.jwt_secret, "activities")

    # create -----------------------------------------------------------------------------------
    def create(self, act: pb.Activity, request_id: str, principal: Principal) -> pb.Activity:
        bad: list[FieldViolation] = []
        if len(request_id) > 128:
            bad.append(FieldViolation("request_id", "must be at most 128 characters"))
        kind = KIND_OF.get(act.kind)
        if kind is None:
            bad.append(FieldViolation("activity.kind", "is required: KIND_CALL, KIND_MEETING, KIND_TASK or KIND_EMAIL"))
        subject = _check_text(act.subject, "activity.subject", SUBJECT_LIMIT, bad, required=True)
        description = _check_text(act.description, "activity.description", DESCRIPTION_LIMIT, bad)
        given = [(f, getattr(act, f)) for f in ("lead", "opportunity", "customer") if getattr(act, f)]
        lead_id = opportunity_id = customer_id = None
        if not given:
            bad.append(
                FieldViolation(
                    "activity.regarding", "give exactly one of activity.lead, activity.opportunity, activity.customer"
                )
            )
        elif len(given) > 1:
            names = ", ".join(f"activity.{f}" for f, _ in given)
            for f, _ in given:
                bad.append(
                    FieldViolation(f"activity.{f}", f"give only one of {names}: an activity is about one record")
                )
        else:
            f, value = given[0]
            pattern = {"lead": LEAD, "opportunity": OPPORTUNITY, "customer": CUSTOMER}[f]
            parsed = _parse(pattern, value, f"activity.{f}", bad)
            if f == "lead":
                lead_id = parsed
            elif f == "opportunity":
                opportunity_id = parsed
            else:
                customer_id = parsed
        owner = _check_text(act.owner, "activity.owner", OWNER_LIMIT, bad) or principal.subject
        team_id = _parse(TEAM, act.team, "activity.team", bad) if act.team else None
        due, remind = _ts(act, "due_time"), _ts(act, "remind_time")
        _check_times(due, remind, bad)
        if not 0 <= act.duration_seconds <= MAX_DURATION:
            bad.append(FieldViolation("activity.duration_seconds", DURATION_RULE))
        direction = DIRECTION_OF.get(act.direction, "")
        if act.direction and not direction:
            bad.append(FieldViolation("activity.direction", "is not a known direction"))
        if kind:
            _check_outcome(kind, act.outcome.strip(), "activity.outcome", bad)
            _check_direction(kind, direction, "activity.direction", bad)
        if bad:
            raise InvalidArgument(bad)

        scope = Scope.of(principal)
        try:
            with self.uow.begin() as tx:
                if request_id:
                    existing = self._by_request_id(tx.conn, request_id, principal)
                    if existing is not None:
                        return to_proto(existing)
                if lead_id:
                    customer_id = self._visible_record(tx.conn, leads, lead_id, scope, LEAD, "activity.lead")
                elif opportunity_id:
                    customer_id = self._visible_record(
                        tx.conn, opportunities, opportunity_id, scope, OPPORTUNITY, "activity.opportunity"
                    )
                else:
                    self._check_customer(tx.conn, customer_id)
                self._check_team(tx.conn, team_id)
                scope.require_assign(tx.conn, owner, team_id, field="activity.owner")
                row = tx.execute(
                    activities.insert()
                    .values(
                        kind=kind,
                        subject=subject,
                        description=description,
                        regarding=given[0][1],
                        lead_id=lead_id,
                        opportunity_id=opportunity_id,
                        customer_id=customer_id or "",
                        owner_id=owner,
                        team_id=team_id,
                        due_time=due,
                        remind_time=remind,
                        duration_seconds=act.duration_seconds,
                        outcome=act.outcome.strip(),
                        direction=direction,
                        done=act.done,
                        complete_time=sa.func.now() if act.done else None,
                        creator=principal.subject,
                        request_id=request_id or None,
                    )
                    .returning(*activities.c)
                ).one()
                name = ACTIVITY.format(row.id)
                if lead_id:
                    touch_lead(tx, lead_id)
                if remind is not None and not row.done:
                    timers.schedule(tx.conn, REMINDER, row.id, remind)
                tx.publish("activity.created.v1", to_event(row, row.create_time), subject=name)
                if row.done:
                    tx.publish("activity.completed.v1", to_event(row, row.create_time), subject=name)
                tx.audit(name, "activity.create", principal, _audit_new(row))
        except sa.exc.IntegrityError:
            if request_id:  # a concurrent retry with the same request_id committed first
                with self.uow.read() as conn:
                    existing = self._by_request_id(conn, request_id, principal)
                    if existing is not None:
                        return to_proto(existing)
            raise
        return to_proto(row)

    @staticmethod
    def _by_request_id(conn: sa.Connection, request_id: str, principal: Principal):
        row = conn.execute(sa.select(activities).where(a.request_id == request_id)).one_or_none()
        if row is not None:
            same_requester(row.creator, principal, "activity")
        return row

    @staticmethod
    def _visible_record(conn, table: sa.Table, rid: str, scope: Scope, pattern: ResourceName, field: str) -> str:
        """The customer id of a live lead or opportunity the caller may see; else INVALID_ARGUMENT."""
        found = conn.execute(
            sa.select(table.c.customer_id).where(
                table.c.id == rid, table.c.delete_time.is_(None), scope.visible(table.c.owner_id, table.c.team_id)
            )
        ).one_or_none()
        if found is None:
            raise InvalidArgument.field(field, f"{pattern.singular} {pattern.format(rid)} does not exist")
        return found.customer_id or ""

    @staticmethod
    def _check_customer(conn, customer_id: str) -> None:
        """A customer sales knows as deleted or merged away is refused; one not (yet) in the
        projection is taken on trust (customer-svc's events may lag)."""
        ref = conn.execute(
            sa.select(customer_refs.c.deleted, customer_refs.c.merged_into).where(
                customer_refs.c.customer_id == customer_id
            )
        ).one_or_none()
        if ref is not None and ref.deleted:
            raise InvalidArgument.field("activity.customer", f"customer {CUSTOMER.format(customer_id)} was deleted")
        if ref is not None and ref.merged_into:
            raise InvalidArgument.field(
                "activity.customer",
                f"customer {CUSTOMER.format(customer_id)} was merged into {CUSTOMER.format(ref.merged_into)}",
            )

    @staticmethod
    def _check_team(conn, team_id: str | None, field: str = "activity.team") -> None:
        if team_id and not conn.execute(sa.select(sa.exists().where(teams.c.id == team_id))).scalar():
            raise InvalidArgument.field(field, f"team {TEAM.format(team_id)} does not exist")

    # read -------------------------------------------------------------------------------------
    def _locked(self, conn, name: str, principal: Principal, field: str = "name"):
        aid = ACTIVITY.parse(name, field).id
        row = conn.execute(
            sa.select(activities)
            .where(a.id == aid, Scope.of(principal).visible(a.owner_id, a.team_id))
            .with_for_update()
        ).one_or_none()
        if row is None:
            raise ACTIVITY.not_found(name)
        return row

    def get(self, name: str, principal: Principal) -> pb.Activity:
        aid = ACTIVITY.parse(name).id
        with self.uow.read() as conn:
            row = conn.execute(
                sa.select(activities).where(a.id == aid, Scope.of(principal).visible(a.owner_id, a.team_id))
            ).one_or_none()
        if row is None:
            raise ACTIVITY.not_found(name)
        return to_proto(row)

    def list(self, req: pb.ListActivitiesRequest, principal: Principal) -> tuple[list[pb.Activity], str]:
        limit = page_size(req.page_size)
        where = [Scope.of(principal).visible(a.owner_id, a.team_id), FILTERS.compile(req.filter)]
        if req.parent:
            collection = req.parent.split("/", 1)[0]
            pattern = {"leads": LEAD, "opportunities": OPPORTUNITY, "customers": CUSTOMER}.get(collection)
            if pattern is None:
                raise InvalidArgument.field("parent", "must be leads/{id}, opportunities/{id}, customers/{id} or empty")
            pid = pattern.parse(req.parent, "parent").id
            # regarding is the name as given (the lead's or opportunity's), customer_id the bare id
            if collection == "customers":  # (!= "" lets the partial index serve a generic plan too)
                where += [a.customer_id == pid, a.customer_id != ""]
            else:
                where.append(a.regarding == req.parent)
        view = req.view
        if view:
            if req.order_by.strip():
                raise InvalidArgument.field("order_by", "a view has its own order (oldest due first); leave it empty")
            now = clock()
            where.append(a.owner_id == principal.subject)
            if view == pb.ListActivitiesRequest.VIEW_OVERDUE:
                where += [sa.not_(a.done), a.due_time < now]
            elif view == pb.ListActivitiesRequest.VIEW_TODAY:
                start, end = tehran_day(now)
                where += [a.due_time >= start, a.due_time < end]
            else:
                raise InvalidArgument.field("view", "is not a known view: VIEW_OVERDUE or VIEW_TODAY")
            order = AGENDA_ORDER
        else:
            # blank (or only spaces) is the default order, AIP-132; "a, ," stays a bad order_by
            keys = parse_order_by(req.order_by.strip() or "create_time desc", SORTABLE)
            order = with_tiebreaker(keys, a.id, descending=keys[-1].descending)
        purpose = query_fingerprint(req.filter, req.order_by, parent=req.parent, view=int(view))
        with self.uow.read() as conn:
            rows, token = keyset_page(
                conn, sa.select(activities).where(*where), order, self.tokens, purpose, limit, req.page_token
            )
        return [to_proto(r) for r in rows], token

    # update -----------------------------------------------------------------------------------
    def update(self, act: pb.Activity, update_mask, principal: Principal) -> pb.Activity:
        paths = MASK.paths(update_mask)
        bad: list[FieldViolation] = []
        new: dict = {}
        for p in paths:
            where = f"activity.{p}"
            if p == "subject":
                new[p] = _check_text(act.subject, where, SUBJECT_LIMIT, bad, required=True)
            elif p == "description":
                new[p] = _check_text(act.description, where, DESCRIPTION_LIMIT, bad)
            elif p == "owner":
                new[p] = _check_text(act.owner, where, OWNER_LIMIT, bad, required=True)
            elif p == "team":
                new[p] = _parse(TEAM, act.team, where, bad) if act.team else None
            elif p in ("due_time", "remind_time"):
                new[p] = _ts(act, p)
            elif p == "duration_seconds":
                if not 0 <= act.duration_seconds <= MAX_DURATION:
                    bad.append(FieldViolation(where, DURATION_RULE))
                new[p] = act.duration_seconds
            elif p == "outcome":
                new[p] = act.outcome.strip()
            elif p == "direction":
                new[p] = DIRECTION_OF.get(act.direction, "")
                if act.direction and not new[p]:
                    bad.append(FieldViolation(where, "is not a known direction"))
        if bad:
            raise InvalidArgument(bad)
        with self.uow.begin() as tx:
            row = self._locked(tx.conn, act.name, principal, "activity.name")
            check_etag(act.etag, row.version, act.name)
            old = {p: row._mapping[COLUMN_OF.get(p, p)] for p in UPDATABLE}
            merged = {**old, **new}
            _check_times(merged["due_time"], merged["remind_time"], bad)
            if "due_time" in new and "remind_time" not in new and bad:
                bad = [FieldViolation("activity.due_time", "must not be before remind_time (move or clear it too)")]
            _check_outcome(row.kind, merged["outcome"], "activity.outcome", bad)
            _check_direction(row.kind, merged["direction"], "activity.direction", bad)
            if bad:
                raise InvalidArgument(bad)
            diff = changes(old, merged, paths)
            if not diff:
                return to_proto(row)
            changed = {c.field for c in diff}
            if changed & {"owner", "team"}:
                self._check_team(tx.conn, merged["team"])
                Scope.of(principal).require_assign(tx.conn, merged["owner"], merged["team"], field="activity.owner")
            values = {COLUMN_OF.get(f, f): merged[f] for f in changed}
            updated = tx.execute(
                activities.update()
                .where(a.id == row.id)
                .values(**values, version=a.version + 1, update_time=sa.func.now())
                .returning(*activities.c)
            ).one()
            if "remind_time" in changed and not updated.done:
                if updated.remind_time is None:
                    timers.cancel(tx.conn, REMINDER, row.id)
                else:
                    timers.schedule(tx.conn, REMINDER, row.id, updated.remind_time)
            tx.audit(act.name, "activity.update", principal, [c.as_audit() for c in diff])
        return to_proto(updated)

    # complete ---------------------------------------------------------------------------------
    def complete(self, req: pb.CompleteActivityRequest, principal: Principal) -> pb.Activity:
        with self.uow.begin() as tx:
            row = self._locked(tx.conn, req.name, principal)
            check_etag(req.etag, row.version, req.name)
            if row.done:
                raise FailedPrecondition(
                    f"{req.name} is already done", reason="ACTIVITY_ALREADY_DONE", metadata={"name": req.name}
                )
            bad: list[FieldViolation] = []
            outcome = req.outcome.strip() or row.outcome
            _check_outcome(row.kind, outcome, "outcome", bad)
            if not 0 <= req.duration_seconds <= MAX_DURATION:  # 2^63-1 seconds was taken
                bad.append(FieldViolation("duration_seconds", DURATION_RULE))
            if bad:
                raise InvalidArgument(bad)
            duration = req.duration_seconds or row.duration_seconds
            done = tx.execute(
                activities.update()
                .where(a.id == row.id)
                .values(
                    done=True,
                    complete_time=sa.func.now(),
                    outcome=outcome,
                    duration_seconds=duration,
                    version=a.version + 1,
                    update_time=sa.func.now(),
                )
                .returning(*activities.c)
            ).one()
            timers.cancel(tx.conn, REMINDER, row.id)
            if row.lead_id:
                touch_lead(tx, row.lead_id)
            tx.publish("activity.completed.v1", to_event(done, done.complete_time), subject=req.name)
            tx.audit(
                req.name,
                "activity.complete",
                principal,
                [c.as_audit() for c in changes(row._mapping, done._mapping, ["done", "outcome", "duration_seconds"])],
            )
        return to_proto(done)

    # delete -----------------------------------------------------------------------------------
    def delete(self, req: pb.DeleteActivityRequest, principal: Principal) -> None:
        with self.uow.begin() as tx:
            row = self._locked(tx.conn, req.name, principal)
            check_etag(req.etag, row.version, req.name)
            tx.execute(activities.delete().where(a.id == row.id))
            timers.cancel(tx.conn, REMINDER, row.id)
            tx.audit(req.name, "activity.delete", principal, [])

    # the reminder timer -----------------------------------------------------------------------
    def fire_reminder(self, conn: sa.Connection, timer: timers.Timer) -> None:
        """activity.reminder: publish activity.reminder_due.v1, committed with the firing. The
        worker fires each (kind, key, due_at) exactly once in this database; the broker may see
        the event more than once, so a consumer de-duplicates on subject + remind_time."""
        row = conn.execute(sa.select(activities).where(a.id == timer.key)).one_or_none()
        if row is None or row.done or row.remind_time is None:
            return  # deleted or completed meanwhile (their transaction also cancelled the timer)
        with self.uow.joined(conn) as tx:
            tx.publish(
                "activity.reminder_due.v1", to_event(row, timer.fired_at or clock()), subject=ACTIVITY.format(row.id)
            )


def touch_lead(tx: Transaction, lead_id: str) -> None:
    """The lead's owner acted on it now (the untouched-lead rule reads touch_time). Not an edit
    of the lead: its version and etag stay."""
    tx.execute(leads.update().where(leads.c.id == lead_id).values(touch_time=sa.func.now()))


def _audit_new(row) -> list[dict]:
    fields = ["kind", "subject", "regarding", "customer_id", "owner_id", "team_id", "due_time", "remind_time"]
    fields += ["duration_seconds", "outcome", "direction", "done"]
    return [audit.change(f, "null", audit.value(row._mapping[f])) for f in fields if row._mapping[f] not in (None, "")]


class ActivityServicer(activities_pb2_grpc.ActivityServiceServicer):
    def __init__(self, uc: Activities):
        self.uc = uc

    def CreateActivity(self, request, context):
        return self.uc.create(request.activity, request.request_id, current_principal())

    def GetActivity(self, request, context):
        return self.uc.get(request.name, current_principal())

    def ListActivities(self, request, context):
        items, token = self.uc.list(request, current_principal())
        return pb.ListActivitiesResponse(activities=items, next_page_token=token)

    def UpdateActivity(self, request, context):
        return self.uc.update(request.activity, request.update_mask, current_principal())

    def CompleteActivity(self, request, context):
        return self.uc.complete(request, current_principal())

    def DeleteActivity(self, request, context):
        self.uc.delete(request, current_principal())
        return empty_pb2.Empty()


def use_cases(sales: Sales) -> Activities:
    return sales.once("activities", lambda: Activities(sales))


def registration(sales: Sales) -> Registration:
    return Registration.of(ActivityServicer(use_cases(sales)))


def timer_handlers(sales: Sales) -> None:
    sales.timers.register(REMINDER, use_cases(sales).fire_reminder)
