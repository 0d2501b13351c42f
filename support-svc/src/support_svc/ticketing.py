"""The core of support: opening tickets, adding messages, changing states and assignees, and
delivering agent replies. Every channel (mail, web form, messengers, calls) and every RPC goes
through these few functions, so the rules hold whoever writes: the first-response time is set
once and never overwritten; an agent reply counts an exchange after customer messages; a
customer message reopens a resolved ticket and ends waiting on the customer; every state is
recorded as an interval (the SLA clocks are computed from them); the hooks (runtime.py) and the
events run in the same transaction as the change.

    t = support.tickets  # Tickets(support)
    with support.uow.begin() as tx:
        row = t.open(tx, NewTicket(subject="...", channel="email", body="...", contact_address="a@b.ir"), actor)
        msg, created = t.add_message(tx, row.id, "agent", "سلام ...", author="agent-7")
        t.change_state(tx, row.id, "resolved", "agent-7")
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from crm.support.v1 import support_events_pb2 as ev_pb
from crm.support.v1 import ticket_pb2 as pb
from crm_chassis import customer_refs as refs
from crm_chassis import timers
from crm_chassis.columns import UUID
from crm_chassis.dates import set_times
from crm_chassis.db import cacheable
from crm_chassis.errors import FailedPrecondition, FieldViolation, InvalidArgument
from crm_chassis.mail_parse import Attachment
from crm_chassis.persian import normalize
from crm_chassis.resources import ResourceName, etag

from .runtime import Support
from .tables import attachments as attachment_rows
from .tables import categories, customer_refs, teams, ticket_intervals, ticket_messages, tickets

TICKET = ResourceName("tickets/{ticket_id}")
MESSAGE = ResourceName("tickets/{ticket_id}/messages/{message_id}")
CUSTOMER = ResourceName("customers/{customer_id}")
TEAM = ResourceName("teams/{team_id}")
# An agent is named by their token subject (agents_api.AGENT_ID says which characters).
AGENT = ResourceName("agents/{agent_id}", agent_id=r"[A-Za-z0-9._@-]{1,128}")
CATEGORY = ResourceName("categories/{category_id}")

STATES = ("new", "open", "waiting_on_customer", "waiting_on_third_party", "resolved", "closed", "reopened")
DONE_STATES = ("resolved", "closed")
OPEN_STATES = tuple(s for s in STATES if s not in DONE_STATES)
# What a state may become by an explicit change (messages move states too, see add_message).
TRANSITIONS = {
    "new": {"open", "waiting_on_customer", "waiting_on_third_party", "resolved", "closed"},
    "open": {"waiting_on_customer", "waiting_on_third_party", "resolved", "closed"},
    "waiting_on_customer": {"open", "waiting_on_third_party", "resolved", "closed"},
    "waiting_on_third_party": {"open", "waiting_on_customer", "resolved", "closed"},
    "resolved": {"reopened", "closed"},
    "reopened": {"open", "waiting_on_customer", "waiting_on_third_party", "resolved", "closed"},
    "closed": set(),
}
CHANNELS = ("phone", "email", "web", "fax", "telegram", "bale", "agent")
PRIORITIES = ("low", "normal", "high", "urgent")
KINDS = ("customer", "agent", "note", "system")

STATE_ENUM = {s: pb.Ticket.State.Value(f"STATE_{s.upper()}") for s in STATES}
CHANNEL_ENUM = {c: pb.Channel.Value(f"CHANNEL_{c.upper()}") for c in CHANNELS}
PRIORITY_ENUM = {p: pb.Priority.Value(f"PRIORITY_{p.upper()}") for p in PRIORITIES}
KIND_ENUM = {k: pb.TicketMessage.Kind.Value(f"KIND_{k.upper()}") for k in KINDS}
DELIVERY_ENUM = {"": 0, "pending": 1, "sent": 2, "failed": 3}
STATE_OF = {v: k for k, v in STATE_ENUM.items()}
CHANNEL_OF = {v: k for k, v in CHANNEL_ENUM.items()}
PRIORITY_OF = {v: k for k, v in PRIORITY_ENUM.items()}
KIND_OF = {v: k for k, v in KIND_ENUM.items()}

SUBJECT_LIMIT = 300
BODY_LIMIT = 100_000
DELIVER = "message.deliver"  # the timer that sends an agent reply
DELIVERY_ATTEMPTS = 8
_NUMBER = re.compile(r"\[?\bT-(\d{1,12})\b\]?")
FIRST_KINDS = ("customer", "note", "system")  # a first message opening writes with the ticket
_MESSAGE_COLUMNS = (
    "ticket_id",
    "kind",
    "author",
    "body",
    "channel",
    "external_id",
    "delivery",
    "headers",
    "create_time",
)
# A message; the same (channel, external id) again is nothing (a concurrent redelivery). The
# partial index's predicate is literal SQL: PostgreSQL infers the arbiter index from it, which
# a bound parameter ('' sent as $n) defeats once the statement runs on a generic plan.
_INSERT_MESSAGE = cacheable(
    pg_insert(ticket_messages)
    .values({c: sa.bindparam(c, type_=ticket_messages.c[c].type) for c in _MESSAGE_COLUMNS})
    .on_conflict_do_nothing(index_elements=["channel", "external_id"], index_where=sa.text("external_id <> ''"))
    .returning(ticket_messages),
    *ticket_messages.c,
)
# System notes on many tickets in one statement (Tickets.add_notes).
_INSERT_NOTES = sa.text(
    """
INSERT INTO ticket_messages (ticket_id, kind, author, body, channel, external_id, delivery, headers, create_time)
SELECT u.ticket_id, 'system', :author, u.body, 'agent', '', '', '{}', :now
  FROM unnest(CAST(:tickets AS uuid[]), CAST(:bodies AS text[])) AS u(ticket_id, body)
RETURNING *
"""
).columns(*ticket_messages.c)
_SEEN = sa.select(ticket_messages).where(
    ticket_messages.c.channel == sa.bindparam("channel"), ticket_messages.c.external_id == sa.bindparam("external_id")
)
_MEMO = "support.tx_memo"


def tx_memo(conn: sa.Connection, name: str) -> dict:
    """A dict that lives as long as the connection's current transaction (a fresh one in the
    next): what the parts read or computed in this transaction, shared between the core, its
    hooks and its events (reference rows, SLA state, the tickets opened here)."""
    tx = conn.get_transaction()
    if tx is None:
        return {}
    held = conn.info.get(_MEMO)
    if held is None or held[0]() is not tx:
        held = (weakref.ref(tx), {})
        conn.info[_MEMO] = held
    return held[1].setdefault(name, {})


def opened_here(conn: sa.Connection, ticket_id) -> bool:
    """Whether the ticket was opened in the connection's current transaction (so nothing of
    it that `open` did not write exists: no stored SLA state, no offers, no timers)."""
    return str(ticket_id) in tx_memo(conn, "tickets.opened")


class _Before:
    """A ticket row with a few columns as they were (the opened event's ticket without the
    first message that `open` wrote with it)."""

    def __init__(self, row, **was):
        self._row, self._was = row, was

    def __getattr__(self, name):
        was = self.__dict__["_was"]
        return was[name] if name in was else getattr(self.__dict__["_row"], name)


def number_text(n: int) -> str:
    return f"T-{n:06d}"


def number_in(text: str) -> int | None:
    """The ticket number quoted in a subject ("Re: [T-000123] ..."), or None."""
    m = _NUMBER.search(text or "")
    return int(m.group(1)) if m else None


def search_text(values) -> str:
    parts = [values.get("subject", ""), values.get("contact_address", ""), values.get("contact_name", "")]
    parts += list(values.get("tags") or ())
    if values.get("number"):
        parts.append(number_text(values["number"]))
    return normalize(" ".join(p for p in parts if p))


def number_text_sql(number: sa.ColumnElement) -> sa.ColumnElement:
    """number_text in SQL (T-000123; more digits past a million)."""
    digits = sa.cast(number, sa.Text)
    return "T-" + sa.case((number < 1_000_000, sa.func.lpad(digits, 6, "0")), else_=digits)


# The columns `open` gives; the number and the times come from the database in the statement,
# the rest are the table's defaults (counts 0, no times).
_OPEN_COLUMNS = (
    "id", "subject", "customer_id", "channel", "contact_address", "contact_name", "category_id", "complaint",
    "priority", "product", "order_ref", "team_id", "assignee_id", "state", "tags", "custom_fields", "language",
    "request_id", "message_count", "version",
)  # fmt: skip


def _open_statement():
    """The ticket and its first state interval in one statement, compiled once: the number
    from the sequence, now(), and the search key with the number in it (search_text of the
    other columns, given as :search_prefix, then the normalized number: the same text). The
    interval is a CTE (its foreign key is checked at the statement's end)."""
    n = sa.select(
        sa.func.nextval(sa.func.pg_get_serial_sequence("tickets", "number")).label("number"),
        sa.func.now().label("now"),
    ).subquery("n")
    prefix = sa.bindparam("search_prefix", type_=sa.Text)
    key = sa.func.lower(number_text_sql(n.c.number))
    columns = {c: sa.bindparam(c, type_=tickets.c[c].type) for c in _OPEN_COLUMNS}
    columns.update(
        number=n.c.number,
        create_time=n.c.now,
        update_time=n.c.now,
        last_customer_message_time=sa.case((sa.bindparam("customer_message", type_=sa.Boolean), n.c.now)),
        search_text=sa.case((prefix == "", key), else_=prefix + " " + key),
    )
    interval = ticket_intervals.insert().from_select(
        ["ticket_id", "state", "start_time"],
        sa.select(sa.bindparam("id", type_=UUID), sa.literal("new"), sa.func.now()),
    )
    return (
        tickets.insert()
        .from_select(list(columns), sa.select(*columns.values()).select_from(n))
        .returning(tickets)
        .add_cte(interval.cte("first_interval"))
    )


_OPEN = _open_statement()


NewAttachment = Attachment  # a file of a new ticket or message: the mail reader's (crm_chassis.mail_parse)


@dataclass
class NewTicket:
    """What opening a ticket needs; the first message is the customer's (or the agent's
    record of a call or a walk-in, kind "system" / "note")."""

    subject: str
    channel: str
    body: str = ""
    customer_id: str = ""
    contact_address: str = ""
    contact_name: str = ""
    category_id: str | None = None
    priority: str = "normal"
    product: str = ""
    order_ref: str = ""
    team_id: str | None = None
    assignee_id: str = ""
    tags: tuple[str, ...] = ()
    custom_fields: dict = field(default_factory=dict)
    language: str = "fa"
    author: str = ""
    kind: str = "customer"  # of the first message
    external_id: str = ""  # of the first message (an e-mail's Message-ID)
    headers: dict = field(default_factory=dict)
    attachments: list[NewAttachment] = field(default_factory=list)
    request_id: str = ""


class Tickets:
    def __init__(self, support: Support):
        self.support = support
        # category id -> key, for the events: a category's key never changes (CategoryService
        # refuses it) and ids are never reused, so the process keeps what it has read.
        self._category_keys: dict[str, str] = {}

    # -- reading ---------------------------------------------------------------------------
    @staticmethod
    def lock(conn: sa.Connection, ticket_id: str):
        """The ticket row, locked for the change (NOT_FOUND if none)."""
        row = conn.execute(sa.select(tickets).where(tickets.c.id == ticket_id).with_for_update()).one_or_none()
        if row is None:
            raise TICKET.not_found(ticket_id)
        return row

    @staticmethod
    def get(conn: sa.Connection, ticket_id: str):
        row = conn.execute(sa.select(tickets).where(tickets.c.id == ticket_id)).one_or_none()
        if row is None:
            raise TICKET.not_found(ticket_id)
        return row

    @staticmethod
    def by_number(conn: sa.Connection, number: int):
        return conn.execute(sa.select(tickets).where(tickets.c.number == number)).one_or_none()

    def match_customer(self, conn: sa.Connection, address: str) -> str:
        """The customer of an e-mail address or phone number ('' if none), from the projection
        (once per transaction and address; `remember_match` gives one found otherwise)."""
        from crm_chassis.persian import phone_e164

        memo = tx_memo(conn, "tickets.matched")
        if address in memo:
            return memo[address]
        if "@" in address:
            found = refs.match(conn, customer_refs, email=address) or ""
        else:
            phone = phone_e164(address, self.support.phone_region) if address else None
            found = refs.match(conn, customer_refs, phones=(phone,) if phone else ()) or ""
        memo[address] = found
        return found

    @staticmethod
    def remember_match(conn: sa.Connection, address: str, customer_id: str) -> None:
        """The customer of an address as the caller matched it in this transaction (by
        customer_projection.email_match_column, folded into a statement of its own)."""
        tx_memo(conn, "tickets.matched")[address] = customer_id or ""

    @staticmethod
    def category(conn: sa.Connection, category_id):
        """The categories row (None if none), read once per transaction."""
        memo = tx_memo(conn, "tickets.categories")
        key = str(category_id)
        if key not in memo:
            memo[key] = conn.execute(sa.select(categories).where(categories.c.id == key)).one_or_none()
        return memo[key]

    @staticmethod
    def team(conn: sa.Connection, team_id):
        """The teams row (None if none), read once per transaction."""
        memo = tx_memo(conn, "tickets.teams")
        key = str(team_id)
        if key not in memo:
            memo[key] = conn.execute(sa.select(teams).where(teams.c.id == key)).one_or_none()
        return memo[key]

    @staticmethod
    def remember(conn: sa.Connection, kind: str, key, row) -> None:
        """A categories / teams row (kind "categories" / "teams") the caller read in this
        transaction, for `category` / `team`."""
        tx_memo(conn, f"tickets.{kind}")[str(key)] = row

    @staticmethod
    def _changed(conn: sa.Connection, row):
        """Record the ticket as the core wrote it last in this transaction; returns it."""
        tx_memo(conn, "tickets.latest")[str(row.id)] = row
        return row

    @staticmethod
    def latest(conn: sa.Connection, row):
        """The ticket as the core wrote it last in this transaction (`row` if not since)."""
        seen = tx_memo(conn, "tickets.latest").get(str(row.id))
        return seen if seen is not None and seen.version > row.version else row

    # -- opening ---------------------------------------------------------------------------
    def open(self, tx, new: NewTicket, actor: str):
        """Insert the ticket, its first state interval and its first message; publish
        ticket.opened.v1 (the ticket as opened, without the message: version 1), run the
        `opened` hooks, publish ticket.message_added.v1 (version 2) and run the `message` hooks.
        Returns the ticket row.

        The first message (customer, note or system) is written with the ticket, so the hooks
        run once: `opened` sees the ticket with its message, and the first message runs no
        `changed` hooks (it moves no state and no clock: no first response yet). A first
        message of another kind is added after, by add_message, with all its rules."""
        violations = self._check_new(new)
        if violations:
            raise InvalidArgument(violations)
        conn = tx.conn
        customer_id = new.customer_id or (self.match_customer(conn, new.contact_address) if new.contact_address else "")
        complaint = False
        team_id = new.team_id
        if new.category_id:
            cat = self.category(conn, new.category_id)
            if cat is None or not cat.active:
                raise InvalidArgument(FieldViolation("ticket.category", "is not an active category"))
            complaint = cat.complaint
            team_id = team_id or cat.team_id
        first = bool(new.body or new.attachments)
        inline = first and new.kind in FIRST_KINDS
        tid = str(uuid.uuid4())
        values = {
            "id": tid,
            "subject": new.subject.strip(),
            "customer_id": customer_id,
            "channel": new.channel,
            "contact_address": new.contact_address.strip().lower()
            if "@" in new.contact_address
            else new.contact_address.strip(),
            "contact_name": new.contact_name.strip(),
            "category_id": new.category_id,
            "complaint": complaint,
            "priority": new.priority or "normal",
            "product": new.product,
            "order_ref": new.order_ref,
            "team_id": team_id,
            "assignee_id": new.assignee_id,
            "state": "new",
            "tags": list(new.tags),
            "custom_fields": new.custom_fields,
            "language": new.language or "fa",
            "request_id": new.request_id,
            # with its first message: as add_message leaves a new ticket
            "message_count": 1 if inline else 0,
            "version": 2 if inline else 1,
            "customer_message": inline and new.kind == "customer",
        }
        # One write of the row and its trigram-indexed search key (which holds the number).
        values["search_prefix"] = search_text(values)
        row = conn.execute(_OPEN, values).one()
        now = row.create_time
        tx_memo(conn, "tickets.opened")[tid] = True
        msg = None
        if inline:
            author = new.author or new.contact_address
            msg = self._insert_message(
                conn,
                tid,
                new.kind,
                new.body,
                author,
                new.channel,
                new.external_id,
                "",
                new.headers,
                now,
                new.attachments,
            )
            if msg is None:  # that (channel, external id) is another ticket's message: opened without it
                row = conn.execute(
                    tickets.update()
                    .where(tickets.c.id == tid)
                    .values(message_count=0, version=1, last_customer_message_time=None)
                    .returning(tickets)
                ).one()
        self._changed(conn, row)
        # SLA and the other event fields are those of the ticket with its message: the message
        # moves no clock, and the hooks below compute (and store) that same version.
        opened = row if msg is None else _Before(row, message_count=0, version=1, last_customer_message_time=None)
        self.publish(tx, "ticket.opened.v1", opened, actor, fields_of=row)
        for hook in self.support.hooks.opened:
            hook(tx, row)
        if msg is not None:
            row = self.latest(conn, row)
            self.publish(tx, "ticket.message_added.v1", row, actor or msg.author, message=msg)
            for hook in self.support.hooks.message:
                hook(tx, row, msg)
        elif first and not inline:
            self.add_message(
                tx,
                tid,
                new.kind,
                new.body,
                author=new.author or new.contact_address,
                channel=new.channel,
                external_id=new.external_id,
                headers=new.headers,
                attachments=new.attachments,
                actor=actor,
            )
        return self.latest(conn, row)

    def _insert_message(self, conn, ticket_id, kind, body, author, channel, external_id, delivery, headers, now, files):
        """Insert a message and its attachments; None if (channel, external_id) exists."""
        msg = conn.execute(
            _INSERT_MESSAGE,
            {
                "ticket_id": ticket_id,
                "kind": kind,
                "author": author,
                "body": body,
                "channel": channel,
                "external_id": external_id,
                "delivery": delivery,
                "headers": headers or {},
                "create_time": now,
            },
        ).one_or_none()
        if msg is None:
            return None
        rows = [
            {
                "message_id": msg.id,
                "filename": a.filename,
                "content_type": a.content_type,
                "size_bytes": len(a.content),
                "content": a.content,
            }
            for a in files
        ]
        if rows:
            conn.execute(attachment_rows.insert(), rows)
        return msg

    def _check_new(self, new: NewTicket) -> list[FieldViolation]:
        v = []
        if not new.subject.strip():
            v.append(FieldViolation("ticket.subject", "is required"))
        elif len(new.subject) > SUBJECT_LIMIT:
            v.append(FieldViolation("ticket.subject", f"may be at most {SUBJECT_LIMIT} characters"))
        if new.channel not in CHANNELS:
            v.append(FieldViolation("ticket.channel", f"must be one of {', '.join(CHANNELS)}"))
        if new.priority and new.priority not in PRIORITIES:
            v.append(FieldViolation("ticket.priority", f"must be one of {', '.join(PRIORITIES)}"))
        if len(new.body) > BODY_LIMIT:
            v.append(FieldViolation("message.body", f"may be at most {BODY_LIMIT} characters"))
        return v

    # -- messages --------------------------------------------------------------------------
    def add_message(
        self,
        tx,
        ticket_id: str,
        kind: str,
        body: str,
        *,
        author: str,
        channel: str | None = None,
        external_id: str = "",
        headers: dict | None = None,
        attachments: Iterable[NewAttachment] = (),
        actor: str = "",
    ):
        """Add a message; returns (message row, created). A second message with the same
        (channel, external_id) is the first one again (created False, nothing changes).

        customer: reopens a resolved ticket, ends waiting on the customer; a closed ticket is
        FAILED_PRECONDITION (the caller opens a follow-up). agent: the first one sets
        first_response_time (once), one after customer messages counts an exchange, new and
        reopened become open; it is sent on the ticket's channel by a durable timer."""
        if kind not in KINDS:
            raise InvalidArgument(FieldViolation("message.kind", f"must be one of {', '.join(KINDS)}"))
        if len(body) > BODY_LIMIT:
            raise InvalidArgument(FieldViolation("message.body", f"may be at most {BODY_LIMIT} characters"))
        conn = tx.conn
        before = self.lock(conn, ticket_id)
        channel = channel or (before.channel if kind in ("customer", "agent") else "agent")
        if external_id:
            seen = conn.execute(_SEEN, {"channel": channel, "external_id": external_id}).one_or_none()
            if seen is not None:
                return seen, False
        if kind == "customer" and before.state == "closed":
            raise FailedPrecondition(f"ticket {number_text(before.number)} is closed", reason="TICKET_CLOSED")
        if kind == "agent" and not body.strip():
            raise InvalidArgument(FieldViolation("message.body", "is required for a reply"))
        now = conn.execute(sa.select(sa.func.now())).scalar()
        sender = self._sender(before)
        delivery = "pending" if kind == "agent" and sender else ""
        # a concurrent redelivery of the same mail: one row
        msg = self._insert_message(
            conn, ticket_id, kind, body, author, channel, external_id, delivery, headers, now, attachments
        )
        if msg is None:
            return conn.execute(_SEEN, {"channel": channel, "external_id": external_id}).one(), False
        values: dict = {
            "message_count": tickets.c.message_count + 1,
            "update_time": now,
            "version": tickets.c.version + 1,
        }
        state = before.state
        if kind == "customer":
            values.update(awaiting_reply=True, last_customer_message_time=now)
            if before.state in ("waiting_on_customer",):
                state = "open"
            elif before.state == "resolved":
                state = "reopened"
        elif kind == "agent":
            values.update(awaiting_reply=False, last_agent_message_time=now)
            if before.awaiting_reply:
                values["exchange_count"] = tickets.c.exchange_count + 1
            if before.first_response_time is None:
                values["first_response_time"] = now
            if before.state in ("new", "reopened"):
                state = "open"
        if state != before.state:
            values.update(self._state_values(before, state, now))
            self._interval(conn, ticket_id, state, now)
        after = self._changed(
            conn,
            conn.execute(tickets.update().where(tickets.c.id == ticket_id).values(**values).returning(tickets)).one(),
        )
        self.publish(tx, "ticket.message_added.v1", after, actor or author, message=msg)
        if kind == "agent" and before.first_response_time is None:
            self.publish(tx, "ticket.first_responded.v1", after, actor or author)
        if state != before.state:
            self._state_events(tx, before, after, actor or author, "")
        for hook in self.support.hooks.message:
            hook(tx, after, msg)
        if state != before.state or kind in ("customer", "agent"):
            for hook in self.support.hooks.changed:
                hook(tx, before, after)
        if delivery == "pending":
            timers.schedule(conn, DELIVER, str(msg.id), now, {"ticket_id": str(ticket_id)})
        return msg, True

    def add_notes(self, tx, notes: Sequence[tuple[str, str]], *, author: str, actor: str, prime=None) -> list:
        """System notes on many locked tickets at once (the SLA's breach notices), set-based:
        one INSERT of the messages, one UPDATE of the tickets (message count, version, update
        time) and their message_added events by one publish_many. `notes`: (ticket id, body).
        A note changes no state, clock or assignee, so the `changed` hooks don't run (as for a
        system message by add_message); the `message` hooks do. `prime(rows)` is called with
        the tickets as changed before their events are built (the SLA engine hands over the
        fields it has computed already). Returns the changed ticket rows."""
        if not notes:
            return []
        conn = tx.conn
        now = conn.execute(sa.select(sa.func.now())).scalar()
        msgs = conn.execute(
            _INSERT_NOTES,
            {"tickets": [str(t) for t, _ in notes], "bodies": [b for _, b in notes], "author": author, "now": now},
        ).all()
        counts: dict[str, int] = {}
        for tid, _ in notes:
            counts[str(tid)] = counts.get(str(tid), 0) + 1
        v = sa.values(sa.column("id", UUID), sa.column("n", sa.Integer), name="v").data(list(counts.items()))
        rows = conn.execute(
            tickets.update()
            .where(tickets.c.id == v.c.id)
            .values(message_count=tickets.c.message_count + v.c.n, version=tickets.c.version + 1, update_time=now)
            .returning(tickets)
        ).all()
        by_id = {str(r.id): self._changed(conn, r) for r in rows}
        if prime is not None:
            prime(rows)
        tx.publish_many(
            "ticket.message_added.v1",
            [(TICKET.format(m.ticket_id), self.event(conn, by_id[str(m.ticket_id)], actor, message=m)) for m in msgs],
        )
        for m in msgs:
            for hook in self.support.hooks.message:
                hook(tx, by_id[str(m.ticket_id)], m)
        return rows

    def _sender(self, ticket):
        senders = self.support.senders
        if ticket.channel in senders:
            return senders[ticket.channel]
        if "@" in ticket.contact_address and "email" in senders:  # web form, fax: reply by mail
            return senders["email"]
        return None

    # -- states ----------------------------------------------------------------------------
    @staticmethod
    def _state_values(before, state: str, now: dt.datetime) -> dict:
        values = {"state": state}
        if state == "resolved":
            values["resolve_time"] = now
        if state == "closed":
            values["close_time"] = now
            if before.resolve_time is None and before.state != "resolved":
                values["resolve_time"] = now
        if state == "reopened":
            values["awaiting_reply"] = True
        return values

    @staticmethod
    def _interval(conn: sa.Connection, ticket_id: str, state: str, now: dt.datetime) -> None:
        conn.execute(
            ticket_intervals.update()
            .where(ticket_intervals.c.ticket_id == ticket_id, ticket_intervals.c.end_time.is_(None))
            .values(end_time=now)
        )
        conn.execute(ticket_intervals.insert().values(ticket_id=ticket_id, state=state, start_time=now))

    def _state_events(self, tx, before, after, actor: str, reason: str) -> None:
        self.publish(tx, "ticket.state_changed.v1", after, actor, previous=before.state, reason=reason)
        special = {"resolved": "ticket.resolved.v1", "closed": "ticket.closed.v1", "reopened": "ticket.reopened.v1"}
        if after.state in special:
            self.publish(tx, special[after.state], after, actor, previous=before.state, reason=reason)

    def change_state(self, tx, ticket_id: str, state: str, actor: str, reason: str = "", etag_value: str = ""):
        """An explicit state change (TRANSITIONS); the same state again is a no-op."""
        if state not in STATES:
            raise InvalidArgument(FieldViolation("state", f"must be one of {', '.join(STATES)}"))
        conn = tx.conn
        before = self.lock(conn, ticket_id)
        if etag_value:
            from crm_chassis.resources import check_etag

            check_etag(etag_value, before.version, TICKET.format(ticket_id))
        if state == before.state:
            return before
        if state not in TRANSITIONS[before.state]:
            raise FailedPrecondition(
                f"a {before.state} ticket cannot become {state}",
                reason="INVALID_TRANSITION",
                metadata={"from": before.state},
            )
        now = conn.execute(sa.select(sa.func.now())).scalar()
        values = {**self._state_values(before, state, now), "update_time": now, "version": tickets.c.version + 1}
        self._interval(conn, ticket_id, state, now)
        after = self._changed(
            conn,
            conn.execute(tickets.update().where(tickets.c.id == ticket_id).values(**values).returning(tickets)).one(),
        )
        tx.audit(
            TICKET.format(ticket_id), "state_changed", actor, [{"field": "state", "old": before.state, "new": state}]
        )
        self._state_events(tx, before, after, actor, reason)
        for hook in self.support.hooks.changed:
            hook(tx, before, after)
        return after

    def update(self, tx, ticket_id: str, values: dict, actor: str, *, routing_key: str = "", reason: str = ""):
        """Change fields (not the state: change_state); hooks `changed` run; an assignee change
        publishes ticket.assigned.v1, a priority rise by an SLA action ticket.escalated.v1
        (routing_key given). Returns (before, after)."""
        conn = tx.conn
        before = self.lock(conn, ticket_id)
        now = conn.execute(sa.select(sa.func.now())).scalar()
        merged = {**before._mapping, **values}
        if {"subject", "contact_address", "contact_name", "tags"} & set(values):
            values = {**values, "search_text": search_text(merged)}
        if "category_id" in values:
            cat = None
            if values["category_id"]:
                cat = self.category(conn, values["category_id"])
                if cat is None:
                    raise InvalidArgument(FieldViolation("ticket.category", "is not a category"))
            values = {**values, "complaint": bool(cat and cat.complaint)}
        after = self._changed(
            conn,
            conn.execute(
                tickets.update()
                .where(tickets.c.id == ticket_id)
                .values(**values, update_time=now, version=tickets.c.version + 1)
                .returning(tickets)
            ).one(),
        )
        if "assignee_id" in values and values["assignee_id"] != before.assignee_id:
            self.publish(tx, "ticket.assigned.v1", after, actor, reason=reason)
        if routing_key:
            self.publish(tx, routing_key, after, actor, reason=reason)
        for hook in self.support.hooks.changed:
            hook(tx, before, after)
        return before, after

    # -- events ----------------------------------------------------------------------------
    def publish(
        self,
        tx,
        routing_key: str,
        row,
        actor: str,
        *,
        previous: str = "",
        reason: str = "",
        message=None,
        fields_of=None,
    ):
        tx.publish(
            routing_key,
            self.event(tx.conn, row, actor, previous=previous, reason=reason, message=message, fields_of=fields_of),
            TICKET.format(row.id),
        )

    def event(
        self, conn, row, actor: str, *, previous: str = "", reason: str = "", message=None, fields_of=None
    ) -> ev_pb.TicketEvent:
        """The TicketEvent of a ticket row; the parts' fields (SLA) are those of `fields_of`
        (default: the row)."""
        key = ""
        if row.category_id:
            key = self._category_keys.get(str(row.category_id), "")
            if not key:
                key = conn.execute(sa.select(categories.c.key).where(categories.c.id == row.category_id)).scalar() or ""
                self._category_keys[str(row.category_id)] = key
        e = ev_pb.TicketEvent(
            ticket=TICKET.format(row.id),
            number=number_text(row.number),
            customer=CUSTOMER.format(row.customer_id) if row.customer_id else "",
            channel=CHANNEL_ENUM.get(row.channel, 0),
            category=CATEGORY.format(row.category_id) if row.category_id else "",
            category_key=key,
            complaint=row.complaint,
            priority=PRIORITY_ENUM.get(row.priority, 0),
            team=TEAM.format(row.team_id) if row.team_id else "",
            assignee=AGENT.format(row.assignee_id) if row.assignee_id else "",
            state=STATE_ENUM[row.state],
            previous_state=STATE_ENUM.get(previous, 0),
            exchange_count=row.exchange_count,
            message_count=row.message_count,
            version=row.version,
            actor=actor,
            reason=reason,
        )
        set_times(e, row, "create_time", "first_response_time", "resolve_time", "close_time")
        e.event_time.FromDatetime(row.update_time)
        if message is not None:
            e.message = MESSAGE.format(row.id, message.id)
            e.message_kind = KIND_ENUM[message.kind]
        for extra in self.support.hooks.event_fields:
            for k, v in extra(conn, fields_of if fields_of is not None else row).items():
                setattr(e, k, v)
        return e


def to_proto(row, category_key: str = "") -> pb.Ticket:
    t = pb.Ticket(
        name=TICKET.format(row.id),
        number=number_text(row.number),
        subject=row.subject,
        customer=CUSTOMER.format(row.customer_id) if row.customer_id else "",
        channel=CHANNEL_ENUM.get(row.channel, 0),
        contact_address=row.contact_address,
        contact_name=row.contact_name,
        category=CATEGORY.format(row.category_id) if row.category_id else "",
        complaint=row.complaint,
        priority=PRIORITY_ENUM.get(row.priority, 0),
        product=row.product,
        order=row.order_ref,
        team=TEAM.format(row.team_id) if row.team_id else "",
        assignee=AGENT.format(row.assignee_id) if row.assignee_id else "",
        state=STATE_ENUM[row.state],
        tags=list(row.tags),
        custom_fields={k: str(v) for k, v in (row.custom_fields or {}).items()},
        language=row.language,
        exchange_count=row.exchange_count,
        message_count=row.message_count,
        etag=etag(row.version),
    )
    set_times(
        t,
        row,
        "create_time",
        "update_time",
        "first_response_time",
        "last_customer_message_time",
        "last_agent_message_time",
        "resolve_time",
        "close_time",
    )
    return t


def message_to_proto(row, files=()) -> pb.TicketMessage:
    m = pb.TicketMessage(
        name=MESSAGE.format(row.ticket_id, row.id),
        kind=KIND_ENUM[row.kind],
        author=row.author,
        body=row.body,
        channel=CHANNEL_ENUM.get(row.channel, 0),
        external_id=row.external_id,
        delivery=DELIVERY_ENUM.get(row.delivery, 0),
        attachments=[
            pb.Attachment(
                name=f"{MESSAGE.format(row.ticket_id, row.id)}/attachments/{f.id}" if hasattr(f, "id") else "",
                filename=f.filename,
                content_type=f.content_type,
                size_bytes=f.size_bytes,
            )
            for f in files
        ],
    )
    set_times(m, row, "create_time")
    return m


# -- the part -------------------------------------------------------------------------------
def install(support: Support) -> None:
    support.tickets = Tickets(support)


def timer_handlers(support: Support) -> None:
    def deliver(conn: sa.Connection, timer) -> None:
        """Send an agent reply on its ticket's channel (at least once: the message id is the
        Message-ID / the idempotency key a sender uses)."""
        msg = conn.execute(
            sa.select(ticket_messages).where(ticket_messages.c.id == timer.key).with_for_update()
        ).one_or_none()
        if msg is None or msg.delivery != "pending":
            return
        ticket = Tickets.get(conn, msg.ticket_id)
        send = support.tickets._sender(ticket)
        if send is None:
            conn.execute(ticket_messages.update().where(ticket_messages.c.id == msg.id).values(delivery=""))
            return
        try:
            external = send(conn, ticket, msg)
        except Exception as exc:  # noqa: BLE001 - any failure of the channel is retried
            if timer.attempt >= DELIVERY_ATTEMPTS:
                conn.execute(
                    ticket_messages.update()
                    .where(ticket_messages.c.id == msg.id)
                    .values(delivery="failed", delivery_error=str(exc)[:500])
                )
                return
            raise
        conn.execute(
            ticket_messages.update()
            .where(ticket_messages.c.id == msg.id)
            .values(delivery="sent", delivery_error="", external_id=msg.external_id or (external or ""))
        )

    support.timers.register(DELIVER, deliver, max_attempts=DELIVERY_ATTEMPTS + 1)
