"""SlaService (proto/crm/support/v1/sla.proto): SLA policies (create, get, list, update,
deactivate), recomputing open tickets after a policy or calendar edit, and one ticket's SLA state.

Every policy change keeps the invariant of sla.py (an open ticket's policy is the first active
one it matches): the change commits first, then the open tickets it concerns (found by one
statement: those of the policy and those it matches) are recomputed in batches, each its own
transaction. A crash between leaves tickets on their previous state; RecomputeSla redoes it.
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

from crm.support.v1 import sla_pb2 as pb
from crm.support.v1 import sla_pb2_grpc
from crm_chassis.auth import Principal
from crm_chassis.errors import AlreadyExists, FieldViolation, InvalidArgument
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
from crm_chassis.resources import ResourceName, UpdateMask, changes, check_etag, etag

from . import calendars as calendar_rows
from .runtime import Support
from .sla import ACTIONS, METRICS, POLICY, Engine, engine, sla_policies
from .tables import calendars, categories, tickets
from .ticketing import PRIORITIES, PRIORITY_ENUM, PRIORITY_OF

TICKET = ResourceName("tickets/{ticket_id}")  # its SLA is the singleton tickets/{ticket_id}/sla
CATEGORY = ResourceName("categories/{category_id}")
RANK = ResourceName("ranks/{rank_id}")
CALENDAR = ResourceName("calendars/{calendar_id}")

NAME_LIMIT = 200
DESCRIPTION_LIMIT = 2000
LIST_LIMIT = 50
MAX_MINUTES = 525_600  # a year of minutes
MAX_POSITION = 1_000_000
ACTION_ENUM = {a: pb.SlaBreachAction.Value(f"SLA_BREACH_ACTION_{a.upper()}") for a in ACTIONS}
ACTION_OF = {v: k for k, v in ACTION_ENUM.items()}

p = sla_policies.c
FILTERS = FilterSchema(
    FilterField("display_name", p.display_name),
    FilterField("active", p.active, FieldType.BOOL),
    FilterField("position", p.position, FieldType.INT),
    FilterField("create_time", p.create_time, FieldType.TIMESTAMP),
    FilterField("update_time", p.update_time, FieldType.TIMESTAMP),
)
SORTABLE = {
    "position": p.position,
    "display_name": p.display_name,
    "create_time": p.create_time,
    "update_time": p.update_time,
}
FIELDS = [
    "display_name",
    "description",
    "position",
    "priorities",
    "categories",
    "customer_ranks",
    "first_response_minutes",
    "next_response_minutes",
    "resolution_minutes",
    "warning_before_minutes",
    "breach_actions",
]
MASK = UpdateMask(
    [*FIELDS, "active"],
    immutable={"name": "", "create_time": "", "update_time": "", "etag": "give it as the etag to check"},
    field="update_mask",
)
COLUMN_OF = {"categories": "category_ids", "customer_ranks": "ranks"}


def to_proto(row) -> pb.SlaPolicy:
    out = pb.SlaPolicy(
        name=POLICY.format(row.id),
        display_name=row.display_name,
        description=row.description,
        position=row.position,
        priorities=[PRIORITY_ENUM[x] for x in row.priorities],
        categories=[CATEGORY.format(c) for c in row.category_ids],
        customer_ranks=list(row.ranks),
        first_response_minutes=row.first_response_minutes,
        next_response_minutes=row.next_response_minutes,
        resolution_minutes=row.resolution_minutes,
        warning_before_minutes=row.warning_before_minutes,
        breach_actions=[ACTION_ENUM[a] for a in row.breach_actions],
        active=row.active,
        etag=etag(row.version),
    )
    out.create_time.FromDatetime(row.create_time)
    out.update_time.FromDatetime(row.update_time)
    return out


# -- reading the fields of a policy message ---------------------------------------------------
def _field(msg: pb.SlaPolicy, name: str, bad: list[FieldViolation]):
    """The stored value of one field of the message (column name, value), problems in `bad`."""
    where = f"sla_policy.{name}"
    if name == "display_name":
        v = msg.display_name.strip()
        if not v:
            bad.append(FieldViolation(where, "is required"))
        elif len(v) > NAME_LIMIT:
            bad.append(FieldViolation(where, f"may be at most {NAME_LIMIT} characters"))
        return v
    if name == "description":
        if len(msg.description) > DESCRIPTION_LIMIT:
            bad.append(FieldViolation(where, f"may be at most {DESCRIPTION_LIMIT} characters"))
        return msg.description.strip()
    if name == "position":
        if not 0 <= msg.position <= MAX_POSITION:
            bad.append(FieldViolation(where, f"must be 0..{MAX_POSITION}"))
        return msg.position
    if name == "priorities":
        out = []
        for i, v in enumerate(msg.priorities):
            if v not in PRIORITY_OF:
                bad.append(FieldViolation(f"{where}[{i}]", f"must be one of {', '.join(PRIORITIES)}"))
            elif PRIORITY_OF[v] not in out:
                out.append(PRIORITY_OF[v])
        return out
    if name in ("categories", "customer_ranks"):
        pattern = CATEGORY if name == "categories" else RANK
        values = list(msg.categories if name == "categories" else msg.customer_ranks)
        if len(values) > LIST_LIMIT:
            bad.append(FieldViolation(where, f"may name at most {LIST_LIMIT}"))
            return []
        out = []
        for i, v in enumerate(values):
            if not pattern.matches(v):
                bad.append(FieldViolation(f"{where}[{i}]", f"must be a name like {pattern.format('…')!r}"))
                continue
            stored = pattern.parse(v, f"{where}[{i}]").id if name == "categories" else v
            if stored not in out:
                out.append(stored)
        return out
    if name.endswith("_minutes"):
        v = getattr(msg, name)
        if not 0 <= v <= MAX_MINUTES:
            bad.append(FieldViolation(where, f"must be 0..{MAX_MINUTES} business minutes (0: no target)"))
        return v
    if name == "breach_actions":
        out = []
        for i, v in enumerate(msg.breach_actions):
            if v not in ACTION_OF:
                bad.append(FieldViolation(f"{where}[{i}]", f"must be one of {', '.join(ACTIONS)}"))
            elif ACTION_OF[v] in out:
                bad.append(FieldViolation(f"{where}[{i}]", f"{ACTION_OF[v]} is given twice"))
            else:
                out.append(ACTION_OF[v])
        return out
    if name == "active":
        return msg.active
    raise AssertionError(name)


def _check_whole(values: dict, bad: list[FieldViolation]) -> None:
    """Rules across fields: a target at least, the warning before every target."""
    targets = [values[f"{m}_minutes"] for m in METRICS if values.get(f"{m}_minutes")]
    if not targets:
        bad.append(
            FieldViolation(
                "sla_policy.first_response_minutes",
                "give at least one target (first_response_minutes, next_response_minutes or resolution_minutes)",
            )
        )
    elif values.get("warning_before_minutes", 0) >= min(targets):
        bad.append(FieldViolation("sla_policy.warning_before_minutes", "must be less than every target given"))


def _check_categories(conn: sa.Connection, ids: list[str]) -> None:
    if not ids:
        return
    found = {str(i) for i in conn.execute(sa.select(categories.c.id).where(categories.c.id.in_(ids))).scalars()}
    bad = [
        FieldViolation(f"sla_policy.categories[{i}]", f"{CATEGORY.format(c)} does not exist")
        for i, c in enumerate(ids)
        if c not in found
    ]
    if bad:
        raise InvalidArgument(bad)


def _column_values(values: dict) -> dict:
    return {COLUMN_OF.get(k, k): v for k, v in values.items()}


# -- the use cases ----------------------------------------------------------------------------
class SlaPolicies:
    def __init__(self, support: Support):
        self.support = support
        self.uow = support.uow
        self.engine: Engine = engine(support)
        self.tokens = PageTokens(support.ctx.settings.jwt_secret, "slaPolicies")

    def create(self, msg: pb.SlaPolicy, request_id: str, principal: Principal) -> pb.SlaPolicy:
        bad: list[FieldViolation] = []
        if len(request_id) > 128:
            bad.append(FieldViolation("request_id", "may be at most 128 characters"))
        values = {f: _field(msg, f, bad) for f in FIELDS}
        _check_whole(values, bad)
        if bad:
            raise InvalidArgument(bad)
        try:
            with self.uow.begin() as tx:
                if request_id:
                    seen = tx.conn.execute(sa.select(sla_policies).where(p.request_id == request_id)).one_or_none()
                    if seen is not None:
                        return to_proto(seen)
                _check_categories(tx.conn, values["categories"])
                row = tx.conn.execute(
                    sla_policies.insert()
                    .values(**_column_values(values), creator=principal.subject, request_id=request_id)
                    .returning(sla_policies)
                ).one()
                name = POLICY.format(row.id)
                tx.audit(
                    name,
                    "sla_policy.create",
                    principal,
                    [{"field": k, "old": "", "new": str(v)} for k, v in values.items()],
                )
        except sa.exc.IntegrityError as exc:
            if "request_id" in str(exc.orig) and request_id:
                with self.uow.read() as conn:
                    return to_proto(conn.execute(sa.select(sla_policies).where(p.request_id == request_id)).one())
            raise AlreadyExists(
                f"an SLA policy named {values['display_name']!r} exists", metadata={"field": "sla_policy.display_name"}
            ) from None
        self._apply(row.id)
        return to_proto(row)

    def _apply(self, policy_id: str) -> int:
        """Recompute the open tickets the policy concerns (its own and those it matches)."""
        with self.uow.read() as conn:
            ids = self.engine.tickets_of_policy(conn, str(policy_id))
        return self.engine.recompute_ids(ids)

    def get(self, name: str) -> pb.SlaPolicy:
        pid = POLICY.parse(name).id
        with self.uow.read() as conn:
            row = conn.execute(sa.select(sla_policies).where(p.id == pid)).one_or_none()
        if row is None:
            raise POLICY.not_found(name)
        return to_proto(row)

    def list(self, req: pb.ListSlaPoliciesRequest) -> tuple[list[pb.SlaPolicy], str]:
        limit = page_size(req.page_size)
        where = FILTERS.compile(req.filter)
        keys = parse_order_by(req.order_by.strip() or "position", SORTABLE)
        order = with_tiebreaker(keys, p.id, descending=keys[-1].descending)
        purpose = query_fingerprint(req.filter, req.order_by)
        with self.uow.read() as conn:
            rows, token = keyset_page(
                conn, sa.select(sla_policies).where(where), order, self.tokens, purpose, limit, req.page_token
            )
        return [to_proto(r) for r in rows], token

    def _locked(self, conn, name: str, field: str):
        pid = POLICY.parse(name, field).id
        row = conn.execute(sa.select(sla_policies).where(p.id == pid).with_for_update()).one_or_none()
        if row is None:
            raise POLICY.not_found(name)
        return row

    def update(self, msg: pb.SlaPolicy, mask, principal: Principal) -> pb.SlaPolicy:
        paths = MASK.paths(mask)
        if paths == MASK.updatable and list(getattr(mask, "paths", [])) == ["*"]:
            paths = list(FIELDS)  # "*" leaves active alone (DeactivateSlaPolicy)
        bad: list[FieldViolation] = []
        new = {f: _field(msg, f, bad) for f in paths}
        if bad:
            raise InvalidArgument(bad)
        released: list[str] = []
        try:
            with self.uow.begin() as tx:
                row = self._locked(tx.conn, msg.name, "sla_policy.name")
                check_etag(msg.etag, row.version, msg.name)
                old = {f: row._mapping[COLUMN_OF.get(f, f)] for f in [*FIELDS, "active"]}
                old["categories"] = [str(c) for c in old["categories"]]
                merged = {**old, **new}
                _check_whole(merged, bad)
                if bad:
                    raise InvalidArgument(bad)
                diff = changes(old, merged, paths)
                if not diff:
                    return to_proto(row)
                changed = {c.field for c in diff}
                if "categories" in changed:
                    _check_categories(tx.conn, merged["categories"])
                row = tx.conn.execute(
                    sla_policies.update()
                    .where(p.id == row.id)
                    .values(
                        **_column_values({f: merged[f] for f in changed}),
                        version=p.version + 1,
                        update_time=sa.func.now(),
                    )
                    .returning(sla_policies)
                ).one()
                if "active" in changed and not row.active:
                    released = self.engine.release(tx.conn, str(row.id))
                tx.audit(msg.name, "sla_policy.update", principal, [c.as_audit() for c in diff])
        except sa.exc.IntegrityError:
            raise AlreadyExists(
                f"an SLA policy named {merged['display_name']!r} exists", metadata={"field": "sla_policy.display_name"}
            ) from None
        self.engine.recompute_ids(released)
        self._apply(row.id)
        return to_proto(row)

    def deactivate(self, name: str, etag_value: str, principal: Principal) -> pb.SlaPolicy:
        with self.uow.begin() as tx:
            row = self._locked(tx.conn, name, "name")
            check_etag(etag_value, row.version, name)
            if not row.active:
                return to_proto(row)
            row = tx.conn.execute(
                sla_policies.update()
                .where(p.id == row.id)
                .values(active=False, version=p.version + 1, update_time=sa.func.now())
                .returning(sla_policies)
            ).one()
            released = self.engine.release(tx.conn, str(row.id))
            tx.audit(
                name,
                "sla_policy.deactivate",
                principal,
                [
                    {"field": "active", "old": "true", "new": "false"},
                    {"field": "tickets", "old": "", "new": str(len(released))},
                ],
            )
        self.engine.recompute_ids(released)
        return to_proto(row)

    def recompute(self, req: pb.RecomputeSlaRequest) -> int:
        if req.policy and req.calendar:
            raise InvalidArgument.field("calendar", "give either policy or calendar, not both")
        with self.uow.read() as conn:
            if req.policy:
                pid = POLICY.parse(req.policy, "policy").id
                if conn.execute(sa.select(p.id).where(p.id == pid)).scalar() is None:
                    raise POLICY.not_found(req.policy)
                ids = self.engine.tickets_of_policy(conn, pid)
            elif req.calendar:
                cid = CALENDAR.parse(req.calendar, "calendar").id
                if conn.execute(sa.select(calendars.c.id).where(calendars.c.id == cid)).scalar() is None:
                    raise CALENDAR.not_found(req.calendar)
                calendar_rows.forget(cid)
                ids = self.engine.tickets_of_calendar(conn, cid)
            else:
                ids = self.engine.tickets_of_calendar(conn, None)
        return self.engine.recompute_ids(ids)

    def ticket_sla(self, name: str) -> pb.TicketSla:
        if not name.endswith("/sla"):
            raise InvalidArgument.field("name", "must be tickets/{ticket_id}/sla")
        tid = TICKET.parse(name.removesuffix("/sla")).id
        with self.uow.read() as conn:
            row = conn.execute(sa.select(tickets).where(tickets.c.id == tid)).one_or_none()
            if row is None:
                raise TICKET.not_found(name.removesuffix("/sla"))
            now = conn.execute(sa.select(sa.func.now())).scalar()
            (s,) = self.engine.compute(conn, [row], now)
        out = pb.TicketSla(name=f"{TICKET.format(tid)}/sla", policy=POLICY.format(s.policy.id) if s.policy else "")
        out.compute_time.FromDatetime(now)
        for m in METRICS:
            c = s.clocks.get(m)
            if c is None:
                continue
            item = pb.SlaMetric(
                metric=m,
                target_minutes=c.target_seconds // 60,
                elapsed_business_seconds=int(c.elapsed),
                paused=c.paused,
                running=c.running,
                met=c.met,
                breached=c.breached,
            )
            for f, v in (("due_time", c.due), ("warning_time", c.warn), ("start_time", c.start)):
                if v is not None:
                    getattr(item, f).FromDatetime(v.astimezone(dt.UTC))
            out.metrics.append(item)
        return out


class SlaServicer(sla_pb2_grpc.SlaServiceServicer):
    def __init__(self, uc: SlaPolicies):
        self.uc = uc

    def CreateSlaPolicy(self, request, context):
        return self.uc.create(request.sla_policy, request.request_id, current_principal())

    def GetSlaPolicy(self, request, context):
        return self.uc.get(request.name)

    def ListSlaPolicies(self, request, context):
        items, token = self.uc.list(request)
        return pb.ListSlaPoliciesResponse(sla_policies=items, next_page_token=token)

    def UpdateSlaPolicy(self, request, context):
        return self.uc.update(request.sla_policy, request.update_mask, current_principal())

    def DeactivateSlaPolicy(self, request, context):
        return self.uc.deactivate(request.name, request.etag, current_principal())

    def RecomputeSla(self, request, context):
        return pb.RecomputeSlaResponse(ticket_count=self.uc.recompute(request))

    def GetTicketSla(self, request, context):
        return self.uc.ticket_sla(request.name)


def use_cases(support: Support) -> SlaPolicies:
    return support.once("sla_api", lambda: SlaPolicies(support))


def registration(support: Support) -> Registration:
    return Registration.of(SlaServicer(use_cases(support)))
