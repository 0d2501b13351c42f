"""TicketService (proto/crm/support/v1/tickets.proto): the RPCs agents and managers use every
day on tickets, their threads, attachments and history.

Every write goes through the ticketing core (`support.tickets`: open, update, change_state,
add_message), so its rules, hooks and events hold; this module validates the request (every
bad field named at once), checks the references (category, team, agent, customer), compares
etags, and records what an RPC changed in the audit trail (the core audits state changes
itself). Lists and search: tickets_queries.py; the export: tickets_export.py.

Idempotency: CreateTicket keeps request_id on the ticket (a unique index); AddTicketMessage
keeps it in the message's headers (`{"request_id": ...}`) and looks it up under the ticket's
row lock, so two concurrent retries add one message.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from types import SimpleNamespace

import sqlalchemy as sa

from crm.support.v1 import ticket_pb2 as tpb
from crm.support.v1 import tickets_pb2 as pb
from crm.support.v1 import tickets_pb2_grpc
from crm_chassis import audit
from crm_chassis.auth import Principal
from crm_chassis.columns import UUID
from crm_chassis.dates import set_times
from crm_chassis.errors import FieldViolation, InvalidArgument
from crm_chassis.filtering import keyset_page
from crm_chassis.grpc_server import Registration
from crm_chassis.interceptors import current_principal
from crm_chassis.pagination import PageTokens, page_size
from crm_chassis.persian import normalize, phone_e164
from crm_chassis.resources import ResourceName, UpdateMask, check_etag

from . import tickets_export
from .customer_projection import email_match
from .runtime import Support
from .tables import agents, attachments, categories, customer_refs, teams, ticket_intervals, ticket_messages, tickets
from .ticketing import (
    AGENT,
    BODY_LIMIT,
    CHANNEL_OF,
    KIND_OF,
    MESSAGE,
    PRIORITY_OF,
    STATE_ENUM,
    STATE_OF,
    SUBJECT_LIMIT,
    TICKET,
    NewAttachment,
    NewTicket,
    Tickets,
    message_to_proto,
    to_proto,
)
from .tickets_queries import TicketQueries

UUID_ID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
ATTACHMENT = ResourceName(
    "tickets/{ticket_id}/messages/{message_id}/attachments/{attachment_id}",
    attachment_id=rf"[1-9][0-9]{{0,2}}|{UUID_ID}",
)
CUSTOMER = ResourceName("customers/{customer_id}")
TEAM = ResourceName("teams/{team_id}")
CATEGORY = ResourceName("categories/{category_id}")

REQUEST_ID_LIMIT = 128
TEXT_LIMIT = 200  # product, order, contact name
ADDRESS_LIMIT = 320
REASON_LIMIT = 500
TAGS_MAX, TAG_LIMIT = 20, 40
FIELDS_MAX, FIELD_VALUE_LIMIT = 50, 1000
FILE_LIMIT = 10 * 1024 * 1024  # one attachment
FILES_LIMIT = 25 * 1024 * 1024  # all attachments of one message
FILES_MAX = 20
FILENAME_LIMIT = 255
CHUNK = 256 * 1024  # bytes per message of a download
FIELD_KEY = re.compile(r"[a-z][a-z0-9_]{0,39}")
LANGUAGE = re.compile(r"[a-z]{2,3}(-[A-Z]{2})?")
MEDIA_TYPE = re.compile(r"[A-Za-z0-9][\w.+-]{0,62}/[A-Za-z0-9][\w.+-]{0,126}")
EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]+\.[^@\s]{2,}")

MESSAGE_KINDS = ("agent", "note", "customer")  # system messages are written by the service itself
STATE_RPC_TARGETS = ("open", "waiting_on_customer", "waiting_on_third_party")

MASK = UpdateMask(
    ["subject", "category", "priority", "product", "order", "team", "tags", "custom_fields", "language", "customer"],
    immutable={
        "name": "",
        "number": "",
        "channel": "open another ticket instead",
        "state": "use ResolveTicket, CloseTicket, ReopenTicket or SetTicketState",
        "assignee": "use AssignTicket",
        "complaint": "it follows the category",
        "contact_address": "",
        "exchange_count": "",
        "message_count": "",
    },
    field="update_mask",
)
COLUMN_OF = {
    "category": "category_id",
    "order": "order_ref",
    "team": "team_id",
    "customer": "customer_id",
}


# -- validation -------------------------------------------------------------------------------
def _text(value: str, field: str, limit: int, bad: list, *, required: bool = False) -> str:
    v = value.strip()
    if required and not v:
        bad.append(FieldViolation(field, "is required"))
    elif len(v) > limit:
        bad.append(FieldViolation(field, f"may be at most {limit} characters"))
    return v


def _id(pattern: ResourceName, value: str, field: str, bad: list) -> str | None:
    try:
        return pattern.parse(value, field).id
    except InvalidArgument as e:
        bad.extend(e.violations)
        return None


def check_tags(values, field: str, bad: list) -> list[str]:
    out: list[str] = []
    for i, raw in enumerate(values):
        tag = normalize(raw)  # Arabic ي/ك and Persian ی/ک are one tag
        if not tag:
            bad.append(FieldViolation(f"{field}[{i}]", "must not be empty"))
        elif len(tag) > TAG_LIMIT:
            bad.append(FieldViolation(f"{field}[{i}]", f"may be at most {TAG_LIMIT} characters"))
        elif tag not in out:
            out.append(tag)
    if len(out) > TAGS_MAX:
        bad.append(FieldViolation(field, f"at most {TAGS_MAX} tags"))
    return out


def check_custom_fields(values, field: str, bad: list) -> dict[str, str]:
    if len(values) > FIELDS_MAX:
        bad.append(FieldViolation(field, f"at most {FIELDS_MAX} entries"))
    out = {}
    for k, v in sorted(values.items()):
        if not FIELD_KEY.fullmatch(k):
            bad.append(FieldViolation(f"{field}.{k}", "keys are lower_snake_case, 1..40 characters"))
        elif len(v) > FIELD_VALUE_LIMIT:
            bad.append(FieldViolation(f"{field}.{k}", f"may be at most {FIELD_VALUE_LIMIT} characters"))
        else:
            out[k] = v.strip()
    return out


def check_language(value: str, field: str, bad: list) -> str:
    v = value.strip() or "fa"
    if not LANGUAGE.fullmatch(v):
        bad.append(FieldViolation(field, "must be a language code like fa, en or en-US"))
    return v


def check_priority(value: int, field: str, bad: list) -> str:
    if value == 0:
        return "normal"
    p = PRIORITY_OF.get(value)
    if p is None:
        bad.append(FieldViolation(field, "is not a known priority"))
        return "normal"
    return p


def check_files(files, field: str, bad: list) -> list[NewAttachment]:
    out, total = [], 0
    if len(files) > FILES_MAX:
        bad.append(FieldViolation(field, f"at most {FILES_MAX} files"))
    for i, f in enumerate(files):
        where = f"{field}[{i}]"
        name = f.filename.replace("\\", "/").rsplit("/", 1)[-1].strip()
        if not name:
            bad.append(FieldViolation(f"{where}.filename", "is required"))
        elif len(name) > FILENAME_LIMIT:
            bad.append(FieldViolation(f"{where}.filename", f"may be at most {FILENAME_LIMIT} characters"))
        ctype = f.content_type.strip().lower() or "application/octet-stream"
        if not MEDIA_TYPE.fullmatch(ctype):
            bad.append(FieldViolation(f"{where}.content_type", "must be a media type like application/pdf"))
        size = len(f.content)
        total += size
        if size == 0:
            bad.append(FieldViolation(f"{where}.content", "is empty"))
        elif size > FILE_LIMIT:
            bad.append(FieldViolation(f"{where}.content", f"is {size} bytes; a file may be at most 10 MB"))
        out.append(NewAttachment(filename=name, content_type=ctype, content=f.content))
    if total > FILES_LIMIT:
        bad.append(FieldViolation(field, f"{total} bytes in all; the files of a message may be at most 25 MB"))
    return out


def check_request_id(value: str, bad: list) -> str:
    if len(value) > REQUEST_ID_LIMIT:
        bad.append(FieldViolation("request_id", f"may be at most {REQUEST_ID_LIMIT} characters"))
    return value


def check_reason(value: str) -> str:
    v = value.strip()
    if len(v) > REASON_LIMIT:
        raise InvalidArgument.field("reason", f"may be at most {REASON_LIMIT} characters")
    return v


# -- references (in the transaction) -----------------------------------------------------------
def check_category(conn, category_id: str | None, field: str, bad: list) -> None:
    if not category_id:
        return
    row = conn.execute(sa.select(categories.c.active).where(categories.c.id == category_id)).one_or_none()
    if row is None:
        bad.append(FieldViolation(field, f"category {CATEGORY.format(category_id)} does not exist"))
    elif not row.active:
        bad.append(FieldViolation(field, f"category {CATEGORY.format(category_id)} is deactivated"))


def check_team(conn, team_id: str | None, field: str, bad: list) -> None:
    if not team_id:
        return
    row = conn.execute(sa.select(teams.c.active).where(teams.c.id == team_id)).one_or_none()
    if row is None:
        bad.append(FieldViolation(field, f"team {TEAM.format(team_id)} does not exist"))
    elif not row.active:
        bad.append(FieldViolation(field, f"team {TEAM.format(team_id)} is deactivated"))


def check_agent(conn, agent_id: str, field: str, bad: list) -> None:
    if not agent_id:
        return
    row = conn.execute(sa.select(agents.c.active).where(agents.c.id == agent_id)).one_or_none()
    if row is None:
        bad.append(FieldViolation(field, f"agent {AGENT.format(agent_id)} does not exist"))
    elif not row.active:
        bad.append(FieldViolation(field, f"agent {AGENT.format(agent_id)} is deactivated"))


def check_customer(conn, customer_id: str, field: str, bad: list) -> None:
    """A customer the projection knows as deleted or merged away is refused; one not (yet) in
    it is taken on trust (customer-svc's events may lag)."""
    if not customer_id:
        return
    ref = conn.execute(
        sa.select(customer_refs.c.deleted, customer_refs.c.merged_into).where(
            customer_refs.c.customer_id == customer_id
        )
    ).one_or_none()
    if ref is not None and ref.deleted:
        bad.append(FieldViolation(field, f"customer {CUSTOMER.format(customer_id)} was deleted"))
    elif ref is not None and ref.merged_into:
        bad.append(
            FieldViolation(
                field,
                f"customer {CUSTOMER.format(customer_id)} was merged into {CUSTOMER.format(ref.merged_into)}",
            )
        )


def _lookups_statement() -> sa.Select:
    """Everything CreateTicket checks and opening reads, in one statement: the ticket of the
    request id (a retry), the category row, the team row (the given one, else the category's),
    the assignee's and the given customer's state, and the customer of the contact e-mail."""
    p = {
        n: sa.bindparam(n, type_=t)
        for n, t in (
            ("request_id", sa.Text),
            ("category_id", UUID),
            ("team_id", UUID),
            ("agent_id", sa.Text),
            ("customer_id", sa.Text),
            ("email", sa.Text),
        )
    }
    given = customer_refs.alias("given_ref")
    one = sa.select(sa.literal(1).label("one")).subquery("one")
    frm = (
        one.outerjoin(categories, categories.c.id == p["category_id"])
        .outerjoin(teams, teams.c.id == sa.func.coalesce(p["team_id"], categories.c.team_id))
        .outerjoin(given, given.c.customer_id == p["customer_id"])
    )
    existing = sa.select(tickets.c.id).where(tickets.c.request_id == p["request_id"], p["request_id"] != "")
    agent = sa.select(agents.c.active).where(agents.c.id == p["agent_id"])
    return sa.select(
        existing.scalar_subquery().label("existing_id"),
        agent.scalar_subquery().label("agent_active"),
        given.c.customer_id.label("given_customer"),
        given.c.deleted.label("given_deleted"),
        given.c.merged_into.label("given_merged_into"),
        email_match(p["email"]).label("matched"),
        *(c.label(f"category_{c.name}") for c in categories.c),
        *(c.label(f"team_{c.name}") for c in teams.c),
    ).select_from(frm)


_LOOKUPS = _lookups_statement()


def _part(row, table: sa.Table, prefix: str):
    """The columns of `table` in a row of _LOOKUPS, as a row-like object (None if absent)."""
    m = row._mapping
    if m[f"{prefix}id"] is None:
        return None
    return SimpleNamespace(**{c.name: m[f"{prefix}{c.name}"] for c in table.c})


def _raise(bad: list) -> None:
    if bad:
        raise InvalidArgument(bad)


# -- conversions --------------------------------------------------------------------------------
def messages_to_proto(conn, rows) -> list[tpb.TicketMessage]:
    """Messages with their attachments' names, types and sizes (in attachment-id order: the
    position there is the attachment's number in GetAttachment)."""
    ids = [r.id for r in rows]
    files: dict = {i: [] for i in ids}
    if ids:
        q = (
            sa.select(
                attachments.c.id,
                attachments.c.message_id,
                attachments.c.filename,
                attachments.c.content_type,
                attachments.c.size_bytes,
            )
            .where(attachments.c.message_id.in_(ids))
            .order_by(attachments.c.message_id, attachments.c.id)
        )
        for f in conn.execute(q):
            files[f.message_id].append(f)
    return [message_to_proto(r, files[r.id]) for r in rows]


def interval_to_proto(row, now) -> pb.TicketStateInterval:
    out = pb.TicketStateInterval(
        state=STATE_ENUM[row.state],
        duration_seconds=int(((row.end_time or now) - row.start_time).total_seconds()),
    )
    set_times(out, row, "start_time", "end_time")
    return out


def entry_to_proto(row) -> pb.TicketHistoryEntry:
    out = pb.TicketHistoryEntry(
        resource=row.resource,
        action=row.action,
        actor=row.actor,
        request_id=row.request_id,
        changes=[
            pb.TicketHistoryEntry.FieldChange(
                field=c.get("field", ""), old_value=c.get("old_value", ""), new_value=c.get("new_value", "")
            )
            for c in (row.changes or [])
        ],
    )
    set_times(out, row, "create_time")
    return out


def _audit_changes(old: dict, new: dict) -> list[dict]:
    return [audit.change(k, audit.value(old.get(k)), audit.value(v)) for k, v in new.items()]


# -- the use cases --------------------------------------------------------------------------------
class TicketApi:
    def __init__(self, support: Support):
        self.support = support
        self.uow = support.uow
        self.queries = TicketQueries(support.settings.jwt_secret)
        self.message_tokens = PageTokens(support.settings.jwt_secret, "ticket-messages")
        self.history_tokens = PageTokens(support.settings.jwt_secret, "ticket-history")

    @property
    def core(self) -> Tickets:
        return self.support.tickets

    # create -------------------------------------------------------------------------------------
    def _new_ticket(self, req: pb.CreateTicketRequest, principal: Principal) -> NewTicket:
        t = req.ticket
        bad: list[FieldViolation] = []
        request_id = check_request_id(req.request_id, bad)
        subject = _text(t.subject, "ticket.subject", SUBJECT_LIMIT, bad, required=True)
        channel = CHANNEL_OF.get(t.channel)
        if channel is None:
            bad.append(
                FieldViolation(
                    "ticket.channel", "is required: CHANNEL_PHONE or CHANNEL_AGENT for a request an agent enters"
                )
            )
        customer_id = _id(CUSTOMER, t.customer, "ticket.customer", bad) if t.customer else ""
        address = _text(t.contact_address, "ticket.contact_address", ADDRESS_LIMIT, bad)
        if address and ("@" in address or channel == "email"):
            if not EMAIL.fullmatch(address):
                bad.append(FieldViolation("ticket.contact_address", "is not an e-mail address"))
            address = address.lower()
        elif address and channel in ("phone", "fax"):
            phone = phone_e164(address, self.support.phone_region)
            if phone is None:
                bad.append(FieldViolation("ticket.contact_address", "is not a phone number"))
            address = phone or address
        contact_name = _text(t.contact_name, "ticket.contact_name", TEXT_LIMIT, bad)
        category_id = _id(CATEGORY, t.category, "ticket.category", bad) if t.category else None
        team_id = _id(TEAM, t.team, "ticket.team", bad) if t.team else None
        assignee = _id(AGENT, t.assignee, "ticket.assignee", bad) if t.assignee else ""
        priority = check_priority(t.priority, "ticket.priority", bad)
        product = _text(t.product, "ticket.product", TEXT_LIMIT, bad)
        order = _text(t.order, "ticket.order", TEXT_LIMIT, bad)
        tags = check_tags(t.tags, "ticket.tags", bad)
        fields = check_custom_fields(t.custom_fields, "ticket.custom_fields", bad)
        language = check_language(t.language, "ticket.language", bad)
        if len(req.body) > BODY_LIMIT:
            bad.append(FieldViolation("body", f"may be at most {BODY_LIMIT} characters"))
        kind = {0: "customer"}.get(req.first_message_kind) or KIND_OF.get(req.first_message_kind)
        if kind not in ("customer", "note"):
            bad.append(FieldViolation("first_message_kind", "must be KIND_CUSTOMER (the default) or KIND_NOTE"))
        files = check_files(req.attachments, "attachments", bad)
        _raise(bad)
        return NewTicket(
            subject=subject,
            channel=channel,
            body=req.body,
            customer_id=customer_id or "",
            contact_address=address,
            contact_name=contact_name,
            category_id=category_id,
            priority=priority,
            product=product,
            order_ref=order,
            team_id=team_id,
            assignee_id=assignee or "",
            tags=tuple(tags),
            custom_fields=fields,
            language=language,
            author=principal.subject if kind == "note" else (address or contact_name or principal.subject),
            kind=kind,
            attachments=files,
            request_id=request_id,
        )

    def _by_request_id(self, conn, request_id: str):
        return conn.execute(sa.select(tickets).where(tickets.c.request_id == request_id)).one_or_none()

    def _check_references(self, conn, new: NewTicket):
        """The ticket of the request id if this is a retry (else None); otherwise checks the
        references (INVALID_ARGUMENT naming each bad one) in one statement and keeps what
        opening reads again (the category and team rows, the sender's customer) for it."""
        email = new.contact_address if "@" in new.contact_address and not new.customer_id else ""
        row = conn.execute(
            _LOOKUPS,
            {
                "request_id": new.request_id,
                "category_id": new.category_id,
                "team_id": new.team_id,
                "agent_id": new.assignee_id or None,
                "customer_id": new.customer_id or None,
                "email": email.strip().lower(),
            },
        ).one()
        if row.existing_id is not None:
            return Tickets.get(conn, row.existing_id)
        bad: list[FieldViolation] = []
        if new.customer_id and row.given_customer is not None:
            if row.given_deleted:
                bad.append(
                    FieldViolation("ticket.customer", f"customer {CUSTOMER.format(new.customer_id)} was deleted")
                )
            elif row.given_merged_into:
                bad.append(
                    FieldViolation(
                        "ticket.customer",
                        f"customer {CUSTOMER.format(new.customer_id)} was merged into "
                        f"{CUSTOMER.format(row.given_merged_into)}",
                    )
                )
        category = _part(row, categories, "category_")
        if new.category_id:
            if category is None:
                bad.append(
                    FieldViolation("ticket.category", f"category {CATEGORY.format(new.category_id)} does not exist")
                )
            elif not category.active:
                bad.append(
                    FieldViolation("ticket.category", f"category {CATEGORY.format(new.category_id)} is deactivated")
                )
        team = _part(row, teams, "team_")
        if new.team_id:
            if team is None:
                bad.append(FieldViolation("ticket.team", f"team {TEAM.format(new.team_id)} does not exist"))
            elif not team.active:
                bad.append(FieldViolation("ticket.team", f"team {TEAM.format(new.team_id)} is deactivated"))
        if new.assignee_id:
            if row.agent_active is None:
                bad.append(FieldViolation("ticket.assignee", f"agent {AGENT.format(new.assignee_id)} does not exist"))
            elif not row.agent_active:
                bad.append(FieldViolation("ticket.assignee", f"agent {AGENT.format(new.assignee_id)} is deactivated"))
        _raise(bad)
        if category is not None:
            Tickets.remember(conn, "categories", category.id, category)
        if team is not None:
            Tickets.remember(conn, "teams", team.id, team)
        if email:
            Tickets.remember_match(conn, new.contact_address, row.matched or "")
        return None

    def create(self, req: pb.CreateTicketRequest, principal: Principal) -> tpb.Ticket:
        new = self._new_ticket(req, principal)
        try:
            with self.uow.begin() as tx:
                existing = self._check_references(tx.conn, new)
                if existing is not None:
                    return to_proto(existing)
                row = self.core.open(tx, new, principal.subject)
                fields = ["subject", "channel", "customer_id", "category_id", "priority", "team_id", "assignee_id"]
                tx.audit(
                    TICKET.format(row.id),
                    "create",
                    principal,
                    [audit.change(f, "null", audit.value(row._mapping[f])) for f in fields if row._mapping[f]],
                )
        except sa.exc.IntegrityError:
            if new.request_id:  # a concurrent retry with the same request_id committed first
                with self.uow.read() as conn:
                    existing = self._by_request_id(conn, new.request_id)
                if existing is not None:
                    return to_proto(existing)
            raise
        return to_proto(row)

    # read ---------------------------------------------------------------------------------------
    def get(self, name: str) -> tpb.Ticket:
        tid = TICKET.parse(name).id
        with self.uow.read() as conn:
            return to_proto(Tickets.get(conn, tid))

    def list(self, req: pb.ListTicketsRequest) -> pb.ListTicketsResponse:
        with self.uow.read() as conn:
            rows, token = self.queries.list_page(conn, req.filter, req.order_by, req.page_size, req.page_token)
        return pb.ListTicketsResponse(tickets=[to_proto(r) for r in rows], next_page_token=token)

    def search(self, req: pb.SearchTicketsRequest) -> pb.SearchTicketsResponse:
        with self.uow.read() as conn:
            rows, token = self.queries.search_page(conn, req.query, req.filter, req.page_size, req.page_token)
        return pb.SearchTicketsResponse(tickets=[to_proto(r) for r in rows], next_page_token=token)

    # update -------------------------------------------------------------------------------------
    def update(self, t: tpb.Ticket, mask, principal: Principal) -> tpb.Ticket:
        paths = MASK.paths(mask)
        tid = TICKET.parse(t.name, "ticket.name").id
        bad: list[FieldViolation] = []
        new: dict = {}
        for p in paths:
            where = f"ticket.{p}"
            if p == "subject":
                new["subject"] = _text(t.subject, where, SUBJECT_LIMIT, bad, required=True)
            elif p == "category":
                new["category_id"] = _id(CATEGORY, t.category, where, bad) if t.category else None
            elif p == "priority":
                new["priority"] = check_priority(t.priority, where, bad)
            elif p in ("product", "order"):
                new[COLUMN_OF.get(p, p)] = _text(getattr(t, p), where, TEXT_LIMIT, bad)
            elif p == "team":
                new["team_id"] = _id(TEAM, t.team, where, bad) if t.team else None
            elif p == "tags":
                new["tags"] = check_tags(t.tags, where, bad)
            elif p == "custom_fields":
                new["custom_fields"] = check_custom_fields(t.custom_fields, where, bad)
            elif p == "language":
                new["language"] = check_language(t.language, where, bad)
            elif p == "customer":
                new["customer_id"] = (_id(CUSTOMER, t.customer, where, bad) or "") if t.customer else ""
        _raise(bad)
        with self.uow.begin() as tx:
            before = Tickets.lock(tx.conn, tid)
            check_etag(t.etag, before.version, t.name)
            old = {k: before._mapping[k] for k in new}
            changed = {k: v for k, v in new.items() if audit.value(old[k]) != audit.value(v)}
            if not changed:
                return to_proto(before)
            if "category_id" in changed:
                check_category(tx.conn, changed["category_id"], "ticket.category", bad)
            if "team_id" in changed:
                check_team(tx.conn, changed["team_id"], "ticket.team", bad)
            if "customer_id" in changed:
                check_customer(tx.conn, changed["customer_id"], "ticket.customer", bad)
            _raise(bad)
            _, after = self.core.update(tx, tid, changed, principal.subject)
            tx.audit(t.name, "update", principal, _audit_changes(old, changed))
        return to_proto(after)

    # states -------------------------------------------------------------------------------------
    def change_state(self, name: str, state: str, etag: str, reason: str, principal: Principal) -> tpb.Ticket:
        tid = TICKET.parse(name).id
        reason = check_reason(reason)
        with self.uow.begin() as tx:
            row = self.core.change_state(tx, tid, state, principal.subject, reason=reason, etag_value=etag)
        return to_proto(row)

    def set_state(self, req: pb.SetTicketStateRequest, principal: Principal) -> tpb.Ticket:
        state = STATE_OF.get(req.state)
        if state not in STATE_RPC_TARGETS:
            raise InvalidArgument.field(
                "state",
                "must be STATE_OPEN, STATE_WAITING_ON_CUSTOMER or STATE_WAITING_ON_THIRD_PARTY "
                "(ResolveTicket, CloseTicket and ReopenTicket do the others)",
            )
        return self.change_state(req.name, state, req.etag, req.reason, principal)

    def assign(self, req: pb.AssignTicketRequest, principal: Principal) -> tpb.Ticket:
        tid = TICKET.parse(req.name).id
        bad: list[FieldViolation] = []
        agent_id = (_id(AGENT, req.assignee, "assignee", bad) or "") if req.assignee else ""
        _raise(bad)
        reason = check_reason(req.reason)
        with self.uow.begin() as tx:
            before = Tickets.lock(tx.conn, tid)
            check_etag(req.etag, before.version, req.name)
            if before.assignee_id == agent_id:
                return to_proto(before)
            check_agent(tx.conn, agent_id, "assignee", bad)
            _raise(bad)
            _, after = self.core.update(tx, tid, {"assignee_id": agent_id}, principal.subject, reason=reason)
            changes = [audit.change("assignee_id", audit.value(before.assignee_id), audit.value(agent_id))]
            if reason:
                changes.append(audit.change("reason", "null", audit.value(reason)))
            tx.audit(req.name, "assign", principal, changes)
        return to_proto(after)

    # messages -----------------------------------------------------------------------------------
    def add_message(self, req: pb.AddTicketMessageRequest, principal: Principal) -> tpb.TicketMessage:
        tid = TICKET.parse(req.parent, "parent").id
        m = req.message
        bad: list[FieldViolation] = []
        request_id = check_request_id(req.request_id, bad)
        kind = KIND_OF.get(m.kind)
        if kind not in MESSAGE_KINDS:
            bad.append(FieldViolation("message.kind", "is required: KIND_AGENT (a reply), KIND_NOTE or KIND_CUSTOMER"))
        if len(m.body) > BODY_LIMIT:
            bad.append(FieldViolation("message.body", f"may be at most {BODY_LIMIT} characters"))
        elif kind == "agent" and not m.body.strip():
            bad.append(FieldViolation("message.body", "is required for a reply"))
        elif kind == "note" and not m.body.strip() and not m.attachments:
            bad.append(FieldViolation("message.body", "is required for a note without attachments"))
        channel = None
        if kind == "customer" and m.channel:
            channel = CHANNEL_OF.get(m.channel)
            if channel is None:
                bad.append(FieldViolation("message.channel", "is not a known channel"))
        files = check_files(m.attachments, "message.attachments", bad)
        _raise(bad)
        with self.uow.begin() as tx:
            ticket = Tickets.lock(tx.conn, tid)  # also serialises two retries of one request_id
            if request_id:
                seen = tx.conn.execute(
                    sa.select(ticket_messages).where(
                        ticket_messages.c.ticket_id == tid,
                        ticket_messages.c.headers["request_id"].astext == request_id,
                    )
                ).one_or_none()
                if seen is not None:
                    return messages_to_proto(tx.conn, [seen])[0]
            author = principal.subject if kind != "customer" else (ticket.contact_address or "customer")
            msg, _ = self.core.add_message(
                tx,
                tid,
                kind,
                m.body,
                author=author,
                channel=channel,
                headers={"request_id": request_id} if request_id else None,
                attachments=files,
                actor=principal.subject,
            )
            changes = [audit.change("kind", "null", audit.value(kind))]
            if files:
                changes.append(audit.change("attachments", "null", audit.value([f.filename for f in files])))
            tx.audit(MESSAGE.format(tid, msg.id), "message.add", principal, changes)
            return messages_to_proto(tx.conn, [msg])[0]

    def list_messages(self, req: pb.ListTicketMessagesRequest) -> pb.ListTicketMessagesResponse:
        from .tickets_queries import KIND_FILTERS

        tid = TICKET.parse(req.parent, "parent").id
        limit = page_size(req.page_size)
        where = KIND_FILTERS.compile(req.filter)
        m = ticket_messages.c
        order = [(m.create_time, False), (m.id, False)]
        with self.uow.read() as conn:
            Tickets.get(conn, tid)
            q = sa.select(ticket_messages).where(m.ticket_id == tid, where)
            rows, token = keyset_page(
                conn, q, order, self.message_tokens, f"{tid}:{req.filter.strip()}", limit, req.page_token
            )
            return pb.ListTicketMessagesResponse(messages=messages_to_proto(conn, rows), next_page_token=token)

    def attachment(self, name: str) -> Iterator[pb.GetAttachmentResponse]:
        ids = ATTACHMENT.parse(name)
        a = attachments.c
        q = (
            sa.select(attachments)
            .join(ticket_messages, ticket_messages.c.id == a.message_id)
            .where(a.message_id == ids.message_id, ticket_messages.c.ticket_id == ids.ticket_id)
        )
        if ids.attachment_id.isdigit():
            q = q.order_by(a.id).offset(int(ids.attachment_id) - 1).limit(1)
        else:
            q = q.where(a.id == ids.attachment_id)
        with self.uow.read() as conn:
            row = conn.execute(q).one_or_none()
        if row is None:
            raise ATTACHMENT.not_found(name)
        yield pb.GetAttachmentResponse(content_type=row.content_type, filename=row.filename, size_bytes=row.size_bytes)
        content = bytes(row.content)
        for i in range(0, len(content), CHUNK):
            yield pb.GetAttachmentResponse(data=content[i : i + CHUNK])

    # history ------------------------------------------------------------------------------------
    def history(self, req: pb.ListTicketHistoryRequest) -> pb.ListTicketHistoryResponse:
        tid = TICKET.parse(req.parent, "parent").id
        name = TICKET.format(tid)
        limit = page_size(req.page_size)
        out = pb.ListTicketHistoryResponse()
        with self.uow.read() as conn:
            Tickets.get(conn, tid)
            entries, token = audit.page(conn, self.history_tokens, name, limit, req.page_token)
            if not req.page_token:
                now = conn.execute(sa.select(sa.func.now())).scalar()
                i = ticket_intervals.c
                spans = conn.execute(
                    sa.select(ticket_intervals).where(i.ticket_id == tid).order_by(i.start_time.desc(), i.id.desc())
                ).all()
                out.intervals.extend(interval_to_proto(r, now) for r in spans)
        out.entries.extend(entry_to_proto(e) for e in entries)
        out.next_page_token = token
        return out


class TicketServicer(tickets_pb2_grpc.TicketServiceServicer):
    def __init__(self, api: TicketApi):
        self.api = api

    def CreateTicket(self, request, context):
        return self.api.create(request, current_principal())

    def GetTicket(self, request, context):
        return self.api.get(request.name)

    def ListTickets(self, request, context):
        return self.api.list(request)

    def SearchTickets(self, request, context):
        return self.api.search(request)

    def UpdateTicket(self, request, context):
        return self.api.update(request.ticket, request.update_mask, current_principal())

    def ResolveTicket(self, request, context):
        return self.api.change_state(request.name, "resolved", request.etag, request.reason, current_principal())

    def CloseTicket(self, request, context):
        return self.api.change_state(request.name, "closed", request.etag, request.reason, current_principal())

    def ReopenTicket(self, request, context):
        return self.api.change_state(request.name, "reopened", request.etag, request.reason, current_principal())

    def SetTicketState(self, request, context):
        return self.api.set_state(request, current_principal())

    def AssignTicket(self, request, context):
        return self.api.assign(request, current_principal())

    def AddTicketMessage(self, request, context):
        return self.api.add_message(request, current_principal())

    def ListTicketMessages(self, request, context):
        return self.api.list_messages(request)

    def GetAttachment(self, request, context):
        yield from self.api.attachment(request.name)

    def ListTicketHistory(self, request, context):
        return self.api.history(request)

    def ExportTickets(self, request, context):
        yield from tickets_export.export(self.api, request)


def use_cases(support: Support) -> TicketApi:
    return support.once("tickets_api", lambda: TicketApi(support))


def registration(support: Support) -> Registration:
    return Registration.of(TicketServicer(use_cases(support)))
