"""LeadService (proto/crm/sales/v1/leads.proto): leads, their status flow and the managed list
of disqualification reasons.

Every write is one transaction of the shared unit of work: the row, the assignment and scoring
hook (`lead_rules.on_lead_saved`), the event (LeadEvent) and the audit entry commit together.
Every read carries the caller's access scope in its WHERE clause (`access.Scope`): a lead
outside it is NOT_FOUND.

For ConvertLead (another part): `visible_lead(conn, lead_id, principal, lock=True)` reads a
lead the caller may see (NOT_FOUND otherwise), and `mark_converted(tx, lead_id, customer_id,
opportunity_id, principal)` records the conversion in the caller's transaction.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from crm.sales.v1 import leads_pb2 as pb
from crm.sales.v1 import leads_pb2_grpc
from crm_chassis import audit
from crm_chassis.auth import Principal
from crm_chassis.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from crm_chassis.grpc_server import Registration
from crm_chassis.interceptors import current_principal
from crm_chassis.pagination import PageTokens, page_size
from crm_chassis.resources import Updatable, UpdateMask, changes, check_etag, required_text
from crm_chassis.uow import Transaction

from . import lead_rules, leads_export, leads_queries
from .access import Scope
from .leads_model import (
    COLUMN,
    KEY,
    LEAD,
    LEAD_COLUMNS,
    NAME_FIELDS,
    OUTPUT_ONLY,
    REASON,
    WRITABLE,
    disqualify_reasons,
    plain,
    reason_to_proto,
    require_name,
    search_key,
    to_event,
    to_proto,
    values_from_proto,
)
from .runtime import Sales
from .tables import leads

FIELD_OF = {v: k for k, v in COLUMN.items()}  # column -> Lead field
SEARCHED = {"given_name", "family_name", "organization_name", "job_title", "email", "phone", "mobile"} | {
    "website",
    "industry",
    "province",
    "city",
    "tags",
}

# The status flow: target -> (the statuses it may be reached from, routing key, audit action).
MOVES = {
    "contacted": (("new",), "lead.updated.v1", "mark_contacted"),
    "qualified": (("new", "contacted"), "lead.qualified.v1", "qualify"),
    "disqualified": (("new", "contacted", "qualified"), "lead.disqualified.v1", "disqualify"),
    "new": (("disqualified",), "lead.updated.v1", "reopen"),
}
# The statuses ConvertLead may convert from (any open one, as Salesforce and Odoo allow).
CONVERTIBLE = ("new", "contacted", "qualified")

# Statements built once (a statement built per call costs more than its round trip).
_INSERT = pg_insert(leads).on_conflict_do_nothing(index_elements=["request_id"]).returning(*leads.c)
_INSERT_OWNED = (
    pg_insert(leads)
    .values(assign_time=sa.func.now())
    .on_conflict_do_nothing(index_elements=["request_id"])
    .returning(*leads.c)
)
_GET = sa.select(*LEAD_COLUMNS).where(leads.c.id == sa.bindparam("lead_id"))
_LOCK = _GET.with_for_update(of=leads)
# An unowned new lead (the assignment rules gave it nobody) goes to its creator.
_CLAIM = (
    leads.update()
    .where(leads.c.id == sa.bindparam("lead_id"), leads.c.owner_id == "")
    .values(owner_id=sa.bindparam("owner"), assign_time=sa.func.now())
    .returning(*LEAD_COLUMNS)
)
NEXT_VERSION = {"version": leads.c.version + 1, "update_time": sa.func.now()}


def _transition_error(name: str, current: str, to: str) -> FailedPrecondition:
    sources, _, _ = MOVES.get(to, (CONVERTIBLE, "", ""))
    return FailedPrecondition(
        f"{name} is {current}; a lead becomes {to} only from {' or '.join(sources)}",
        reason="LEAD_STATUS_TRANSITION",
        metadata={"name": name, "from": current, "to": to},
    )


def _deleted(name: str) -> FailedPrecondition:
    return FailedPrecondition(f"{name} is deleted; undelete it first", reason="LEAD_DELETED", metadata={"name": name})


def visible_lead(conn: sa.Connection, lead_id: str, principal: Principal, lock: bool = False) -> sa.Row:
    """The lead if the caller's scope holds it (deleted ones too), else NOT_FOUND."""
    scope = Scope.of(principal)
    q = _LOCK if lock else _GET
    row = conn.execute(q.where(scope.visible(leads.c.owner_id, leads.c.team_id)), {"lead_id": lead_id}).one_or_none()
    if row is None:
        raise LEAD.not_found([lead_id])
    return row


def _touch(row, principal: Principal) -> dict:
    """The owner's own actions on a lead move its touch time (an untouched lead is reassigned)."""
    return {"touch_time": sa.func.now()} if row.owner_id == principal.subject else {}


def mark_converted(
    tx: Transaction, lead_id: str, customer_id: str, opportunity_id: str | None, principal: Principal | str
) -> pb.Lead:
    """Record a conversion in the caller's transaction: status converted, the customer and the
    opportunity, convert_time; lead.converted.v1 and an audit entry. Converting again to the same
    customer and opportunity returns the lead unchanged (a retried conversion); anything else on
    a converted or disqualified lead is FAILED_PRECONDITION LEAD_STATUS_TRANSITION. The caller
    checks access (visible_lead)."""
    customer_id = customer_id.removeprefix("customers/")
    opportunity_id = (opportunity_id or "").removeprefix("opportunities/") or None
    if not customer_id:
        raise InvalidArgument.field("customer", "a conversion needs the customer")
    name = LEAD.format(lead_id)
    row = tx.execute(_LOCK, {"lead_id": lead_id}).one_or_none()
    if row is None:
        raise LEAD.not_found(name)
    if row.delete_time is not None:
        raise _deleted(name)
    if row.status == "converted":
        if row.customer_id == customer_id and (row.opportunity_id or None) == opportunity_id:
            return to_proto(row)
        raise FailedPrecondition(
            f"{name} is already converted to customers/{row.customer_id}",
            reason="LEAD_STATUS_TRANSITION",
            metadata={"name": name, "from": "converted", "to": "converted"},
        )
    if row.status not in CONVERTIBLE:
        raise _transition_error(name, row.status, "converted")
    tx.execute(
        leads.update()
        .where(leads.c.id == lead_id)
        .values(
            status="converted",
            customer_id=customer_id,
            opportunity_id=opportunity_id,
            convert_time=sa.func.now(),
            **NEXT_VERSION,
        )
    )
    who = principal if isinstance(principal, Principal) else None
    lead_rules.on_lead_saved(tx, lead_id, False, who)
    new = tx.execute(_GET, {"lead_id": lead_id}).one()
    tx.publish("lead.converted.v1", to_event(new), name)
    tx.audit(
        name,
        "convert",
        principal,
        [
            audit.change("status", audit.value(row.status), audit.value("converted")),
            audit.change("customer", "null", audit.value(f"customers/{customer_id}")),
            audit.change(
                "opportunity", "null", audit.value(f"opportunities/{opportunity_id}") if opportunity_id else "null"
            ),
        ],
    )
    return to_proto(new)


REASONS = Updatable(
    disqualify_reasons,
    REASON,
    UpdateMask(["title", "active"], immutable={"key": "create a new reason instead"}),
    message_field="disqualify_reason",
    convert={"title": required_text(100)},
    key_columns=["key"],
    version_column=None,  # reasons carry no etag
)
MASK = UpdateMask(WRITABLE, immutable=OUTPUT_ONLY)


def _fk_field(exc: sa.exc.IntegrityError) -> str | None:
    constraint = getattr(getattr(exc.orig, "diag", None), "constraint_name", "") or ""
    if "product_line" in constraint:
        return "lead.product_line"
    if "team" in constraint:
        return "lead.team"
    return None


class Leads:
    """The use cases."""

    def __init__(self, sales: Sales):
        self.sales = sales
        self.uow = sales.uow
        self.region = sales.phone_region
        secret = sales.ctx.settings.jwt_secret
        self.tokens = PageTokens(secret, "leads")
        self.search_tokens = PageTokens(secret, "leads-search")

    # -- create ------------------------------------------------------------------------------
    def create(self, req: pb.CreateLeadRequest, principal: Principal) -> pb.Lead:
        if len(req.request_id) > 128:
            raise InvalidArgument.field("request_id", "must be at most 128 characters")
        v = values_from_proto(req.lead, WRITABLE, self.region)
        require_name(v)
        rid = req.request_id or None
        try:
            with self.uow.begin() as tx:
                conn = tx.conn
                found: list[tuple[str, str]] = []
                rows = leads_queries.find_duplicates(conn, v, rid)
                if rows is not None:
                    earlier = next((r[1] for r in rows if r[0] == "request"), None)
                    if earlier is not None:
                        return self._replay(conn, earlier, principal)
                    found = leads_queries.matches(rows)
                    if found and req.reject_duplicates:
                        record, field = found[0]
                        raise AlreadyExists(
                            f"{record} has the same {field}",
                            reason="LEAD_DUPLICATE",
                            metadata={"record": record, "field": field},
                        )
                owner, team = v["owner_id"], v["team_id"]
                if (owner and owner != principal.subject) or team:
                    Scope.of(principal).require_assign(conn, owner or principal.subject, team, field="lead.owner")
                params = {**v, "search_text": search_key(v), "request_id": rid}
                inserted = conn.execute(_INSERT_OWNED if owner else _INSERT, params).one_or_none()
                if inserted is None:  # a concurrent call with this request_id committed first
                    earlier = conn.execute(sa.select(leads.c.id).where(leads.c.request_id == rid)).scalar_one()
                    return self._replay(conn, earlier, principal)
                lead_id = inserted.id
                lead_rules.on_lead_saved(tx, lead_id, True, principal, row=inserted)
                row = None
                if not owner:
                    row = conn.execute(_CLAIM, {"lead_id": lead_id, "owner": principal.subject}).one_or_none()
                if row is None:
                    row = conn.execute(_GET, {"lead_id": lead_id}).one()
                name = LEAD.format(lead_id)
                tx.publish("lead.created.v1", to_event(row), name)
                tx.audit(name, "create", principal, self._created(row))
        except sa.exc.IntegrityError as exc:
            field = _fk_field(exc)
            if field is None:
                raise
            raise InvalidArgument.field(field, f"no such {field.split('.')[1].replace('_', ' ')}") from None
        out = to_proto(row)
        out.possible_duplicates.extend(pb.LeadDuplicate(record=r, matched_field=f) for r, f in found)
        return out

    @staticmethod
    def _created(row) -> list[dict]:
        m = plain(row)
        out = []
        for f in WRITABLE:
            value = m.get(COLUMN.get(f, f))
            if value:
                out.append(audit.change(f, "null", audit.value(value)))
        return out

    def _replay(self, conn, lead_id: str, principal: Principal) -> pb.Lead:
        """The lead an earlier call with this request_id created, with its duplicates now."""
        try:
            row = visible_lead(conn, lead_id, principal)
        except NotFound:
            raise AlreadyExists(
                "request_id was used for another caller's lead", metadata={"field": "request_id"}
            ) from None
        out = to_proto(row)
        rows = leads_queries.find_duplicates(conn, plain(row), exclude_id=lead_id)
        if rows is not None:
            out.possible_duplicates.extend(
                pb.LeadDuplicate(record=r, matched_field=f) for r, f in leads_queries.matches(rows)
            )
        return out

    # -- read --------------------------------------------------------------------------------
    def get(self, name: str, principal: Principal) -> pb.Lead:
        lead_id = LEAD.parse(name).id
        with self.uow.read() as conn:
            return to_proto(visible_lead(conn, lead_id, principal))

    def list(self, req: pb.ListLeadsRequest, principal: Principal) -> tuple[list, str]:
        limit = page_size(req.page_size)
        with self.uow.read() as conn:
            return leads_queries.list_page(
                conn,
                self.tokens,
                Scope.of(principal),
                limit,
                req.page_token,
                req.filter,
                req.order_by,
                req.show_deleted,
            )

    def search(self, query: str, size: int, token: str, filter_text: str, principal: Principal):
        limit = page_size(size, default=20, maximum=100)
        with self.uow.read() as conn:
            return leads_queries.search_page(
                conn, self.search_tokens, Scope.of(principal), query, limit, token, filter_text
            )

    # -- update ------------------------------------------------------------------------------
    def update(self, lead: pb.Lead, mask, principal: Principal) -> pb.Lead:
        paths = MASK.paths(mask)
        lead_id = LEAD.parse(lead.name, "lead.name").id
        new = values_from_proto(lead, paths, self.region)
        if "owner" in paths and not new["owner_id"]:
            raise InvalidArgument.field("lead.owner", "must not be empty (a lead always has an owner)")
        name = LEAD.format(lead_id)
        with self.uow.begin() as tx:
            conn = tx.conn
            row = visible_lead(conn, lead_id, principal, lock=True)
            if row.delete_time is not None:
                raise _deleted(name)
            check_etag(lead.etag, row.version, name)
            old = plain(row)
            merged = {**old, **new}
            if set(paths) & set(NAME_FIELDS):  # (an erased lead has none and stays editable)
                require_name(merged)
            diff = changes(old, new)
            if not diff:
                return to_proto(row)
            changed = {c.field for c in diff}
            write = {c.field: new[c.field] for c in diff}
            if changed & {"owner_id", "team_id"}:
                team = merged["team_id"] if "team_id" in changed else None
                Scope.of(principal).require_assign(conn, merged["owner_id"], team, field="lead.owner")
                if "owner_id" in changed:
                    write["assign_time"] = sa.func.now()
            if {FIELD_OF.get(c, c) for c in changed} & SEARCHED:
                write["search_text"] = search_key(merged)
            try:
                with conn.begin_nested():
                    conn.execute(
                        leads.update()
                        .where(leads.c.id == lead_id)
                        .values(**write, **_touch(row, principal), **NEXT_VERSION)
                    )
            except sa.exc.IntegrityError as exc:
                field = _fk_field(exc)
                if field is None:
                    raise
                raise InvalidArgument.field(field, f"no such {field.split('.')[1].replace('_', ' ')}") from None
            lead_rules.on_lead_saved(tx, lead_id, False, principal)
            row = conn.execute(_GET, {"lead_id": lead_id}).one()
            tx.publish("lead.updated.v1", to_event(row), name)
            tx.audit(
                name,
                "update",
                principal,
                [audit.change(FIELD_OF.get(c.field, c.field), c.old_text, c.new_text) for c in diff],
            )
            return to_proto(row)

    # -- status ------------------------------------------------------------------------------
    def move(self, name: str, etag: str, to: str, principal: Principal, reason: str = "") -> pb.Lead:
        """A status change by the flow's rules (MOVES); the same status again is a no-op."""
        lead_id = LEAD.parse(name).id
        name = LEAD.format(lead_id)
        sources, routing_key, action = MOVES[to]
        if to == "disqualified":
            reason = reason.strip().lower().removeprefix("disqualifyreasons/")
            if not reason:
                raise InvalidArgument.field("reason", "is required: the key of a disqualification reason")
            if not KEY.match(reason):
                raise InvalidArgument.field("reason", f"{reason!r} is not a disqualification reason key")
        with self.uow.begin() as tx:
            conn = tx.conn
            row = visible_lead(conn, lead_id, principal, lock=True)
            if row.delete_time is not None:
                raise _deleted(name)
            check_etag(etag, row.version, name)
            if row.status == to and (to != "disqualified" or row.disqualify_reason == reason):
                return to_proto(row)
            if row.status not in sources:
                raise _transition_error(name, row.status, to)
            if to == "disqualified":
                active = conn.execute(
                    sa.select(disqualify_reasons.c.active).where(disqualify_reasons.c.key == reason)
                ).scalar()
                if active is None:
                    raise InvalidArgument.field("reason", f"no such disqualification reason: {reason}")
                if not active:
                    raise InvalidArgument.field("reason", f"disqualification reason {reason} is retired")
            conn.execute(
                leads.update()
                .where(leads.c.id == lead_id)
                .values(
                    status=to,
                    disqualify_reason=reason if to == "disqualified" else "",
                    **_touch(row, principal),
                    **NEXT_VERSION,
                )
            )
            lead_rules.on_lead_saved(tx, lead_id, False, principal)
            new = conn.execute(_GET, {"lead_id": lead_id}).one()
            tx.publish(routing_key, to_event(new), name)
            entry = [audit.change("status", audit.value(row.status), audit.value(to))]
            if row.disqualify_reason != new.disqualify_reason:
                entry.append(
                    audit.change(
                        "disqualify_reason", audit.value(row.disqualify_reason), audit.value(new.disqualify_reason)
                    )
                )
            tx.audit(name, action, principal, entry)
            return to_proto(new)

    # -- delete / undelete -------------------------------------------------------------------
    def set_deleted(self, name: str, etag: str, deleted: bool, principal: Principal) -> pb.Lead:
        lead_id = LEAD.parse(name).id
        name = LEAD.format(lead_id)
        with self.uow.begin() as tx:
            row = visible_lead(tx.conn, lead_id, principal, lock=True)
            check_etag(etag, row.version, name)
            if (row.delete_time is not None) == deleted:
                return to_proto(row)
            tx.execute(
                leads.update()
                .where(leads.c.id == lead_id)
                .values(delete_time=sa.func.now() if deleted else None, **NEXT_VERSION)
            )
            new = tx.execute(_GET, {"lead_id": lead_id}).one()
            action = "delete" if deleted else "undelete"
            tx.publish(f"lead.{action}d.v1", to_event(new), name)
            tx.audit(name, action, principal, [])
            return to_proto(new)

    # -- disqualification reasons ---------------------------------------------------------------
    def create_reason(self, r: pb.DisqualifyReason, principal: Principal) -> pb.DisqualifyReason:
        key = r.key.strip().lower()
        if not KEY.match(key):
            raise InvalidArgument.field(
                "disqualify_reason.key", "must be 1-40 of a-z, 0-9, '_' or '-', starting with a letter or digit"
            )
        title = required_text(100)(r.title, "disqualify_reason.title")
        with self.uow.begin() as tx:
            row = tx.execute(
                pg_insert(disqualify_reasons)
                .values(key=key, title=title)
                .on_conflict_do_nothing()
                .returning(*disqualify_reasons.c)
            ).one_or_none()
            if row is None:
                raise AlreadyExists(
                    f"disqualifyReasons/{key} already exists", metadata={"name": f"disqualifyReasons/{key}"}
                )
            tx.audit(
                f"disqualifyReasons/{key}", "create", principal, [audit.change("title", "null", audit.value(title))]
            )
        return reason_to_proto(row)

    def list_reasons(self, show_retired: bool) -> list[pb.DisqualifyReason]:
        q = sa.select(disqualify_reasons).order_by(disqualify_reasons.c.key)
        if not show_retired:
            q = q.where(disqualify_reasons.c.active)
        with self.uow.read() as conn:
            return [reason_to_proto(r) for r in conn.execute(q)]

    def update_reason(self, r: pb.DisqualifyReason, mask, principal: Principal) -> pb.DisqualifyReason:
        with self.uow.begin() as tx:
            done = REASONS.update(tx.conn, r, mask)
            if done.changes:
                tx.audit(r.name, "update", principal, done.audit_changes())
            return reason_to_proto(done.row)


class LeadServicer(leads_pb2_grpc.LeadServiceServicer):
    def __init__(self, sales: Sales):
        self.uc = Leads(sales)

    def CreateLead(self, request, context):
        return self.uc.create(request, current_principal())

    def GetLead(self, request, context):
        return self.uc.get(request.name, current_principal())

    def ListLeads(self, request, context):
        rows, token = self.uc.list(request, current_principal())
        return pb.ListLeadsResponse(leads=[to_proto(r) for r in rows], next_page_token=token)

    def UpdateLead(self, request, context):
        return self.uc.update(request.lead, request.update_mask, current_principal())

    def DeleteLead(self, request, context):
        return self.uc.set_deleted(request.name, request.etag, True, current_principal())

    def UndeleteLead(self, request, context):
        return self.uc.set_deleted(request.name, "", False, current_principal())

    def SearchLeads(self, request, context):
        hits, token = self.uc.search(
            request.query, request.page_size, request.page_token, request.filter, current_principal()
        )
        return pb.SearchLeadsResponse(
            results=[pb.LeadSearchResult(lead=to_proto(r), relevance=s) for r, s in hits], next_page_token=token
        )

    def ExportLeads(self, request, context):
        yield from leads_export.export(self.uc, request, current_principal())

    def MarkLeadContacted(self, request, context):
        return self.uc.move(request.name, request.etag, "contacted", current_principal())

    def QualifyLead(self, request, context):
        return self.uc.move(request.name, request.etag, "qualified", current_principal())

    def DisqualifyLead(self, request, context):
        return self.uc.move(request.name, request.etag, "disqualified", current_principal(), request.reason)

    def ReopenLead(self, request, context):
        return self.uc.move(request.name, request.etag, "new", current_principal())

    def CreateDisqualifyReason(self, request, context):
        return self.uc.create_reason(request.disqualify_reason, current_principal())

    def ListDisqualifyReasons(self, request, context):
        return pb.ListDisqualifyReasonsResponse(disqualify_reasons=self.uc.list_reasons(request.show_retired))

    def UpdateDisqualifyReason(self, request, context):
        return self.uc.update_reason(request.disqualify_reason, request.update_mask, current_principal())


def registration(sales: Sales) -> Registration:
    return Registration.of(LeadServicer(sales))
