"""CallService (proto/crm/support/v1/calls.proto): phone calls from the PBX (CTI), their
tickets, the callbacks owed for missed calls, and the agents' after-call work.

A PBX adapter posts each call event (new, answered, transfer, hangup) signed with the PBX's key
(CTI_KEYS). Rules, in one place:
- one row per (pbx, call_id); each (call_id, event) is applied once (a transfer once per its
  time), in any order: start/answer/end times come from the events' own timestamps, and
  queue_seconds, talk_seconds and the outcome are recomputed from them (`derive`) after each;
- the customer is matched from the customer's number (the caller inbound, the callee
  outbound; E.164 in support.phone_region); the call is linked to the customer's (or the
  number's) latest open phone ticket as soon as it is seen, and an answered call without one
  opens a phone ticket ("تماس از <number>"), so every answered call has a ticket;
- when the call has ended (and again whenever a late event changes what was logged): the
  ticket gets a system message with the call's summary and call.logged.v1 (CallEvent) is
  published; an answered call puts its agent in after-call work (agents.busy_until = end +
  after_call_work_seconds); an unanswered inbound call from a known number opens (or counts up)
  the number's callback; a call that turns out answered after all closes the callback it
  opened; an answered outbound call to a number closes that number's open callback.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
import re
from dataclasses import dataclass
from typing import NamedTuple

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from crm.support.v1 import calls_pb2 as pb
from crm.support.v1 import calls_pb2_grpc
from crm.support.v1 import support_events_pb2 as ev_pb
from crm_chassis import audit
from crm_chassis.auth import Principal
from crm_chassis.columns import TIMESTAMPTZ, id_column, text_column, times
from crm_chassis.columns import UUID as UUID_TYPE
from crm_chassis.config import ConfigError
from crm_chassis.dates import set_times
from crm_chassis.errors import FailedPrecondition, FieldViolation, InvalidArgument, Unauthenticated
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
from crm_chassis.persian import phone_e164
from crm_chassis.resources import ResourceName, UpdateMask, check_etag, etag

from .runtime import Support
from .tables import TEXTS, agents, metadata, tickets
from .ticketing import AGENT, CUSTOMER, OPEN_STATES, TICKET, NewTicket, Tickets

CALL = ResourceName("calls/{call_id}")
CALLBACK = ResourceName("callbacks/{callback_id}")
# Agents are token subjects, not UUIDs.

EVENTS = ("new", "answered", "hangup", "transfer")
DIRECTIONS = ("inbound", "outbound")
CAUSES = ("normal", "busy", "no_answer", "abandoned", "voicemail")
OUTCOMES = ("answered", "missed", "abandoned", "busy", "voicemail")
UNANSWERED = ("missed", "abandoned", "busy", "voicemail")
CALLBACK_OUTCOMES = ("reached", "no_answer", "busy", "left_message", "wrong_number", "not_needed")
WITHHELD = ("", "anonymous", "unknown", "private", "withheld", "restricted", "unavailable")
DISPOSITION = re.compile(r"[a-z0-9_]{1,40}")
NOTE_LIMIT = 2000
ID_LIMIT = 200
NUMBER_LIMIT = 50
QUEUE_LIMIT = 100
CTI_ACTOR = "cti"

DIRECTION_ENUM = {"inbound": pb.Call.DIRECTION_INBOUND, "outbound": pb.Call.DIRECTION_OUTBOUND}
OUTCOME_ENUM = {o: pb.Call.Outcome.Value(f"OUTCOME_{o.upper()}") for o in OUTCOMES}
CALLBACK_STATE_ENUM = {"open": pb.Callback.STATE_OPEN, "done": pb.Callback.STATE_DONE}
OUTCOME_FA = {
    "answered": "پاسخ داده شد",
    "missed": "بی‌پاسخ",
    "abandoned": "قطع در صف",
    "busy": "مشغول",
    "voicemail": "پیام صوتی",
}


def cti_keys(env=None) -> dict[str, bytes]:
    """CTI_KEYS "pbx1:secret1,pbx2:secret2" (default "dev-pbx:dev-cti-key") as {pbx: key}."""
    env = os.environ if env is None else env
    raw = env.get("CTI_KEYS", "dev-pbx:dev-cti-key")
    keys, problems = {}, []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        pbx, sep, secret = part.partition(":")
        if not sep or not pbx.strip() or not secret.strip():
            problems.append(f"CTI_KEYS: {part!r} is not pbx:secret")
            continue
        keys[pbx.strip()] = secret.strip().encode()
    if problems:
        raise ConfigError(problems)
    return keys


def sign(key: bytes, body: bytes) -> str:
    """The X-Crm-Signature of a body: sha256=<hex HMAC-SHA256>."""
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def signature_ok(key: bytes | None, body: bytes, signature: str) -> bool:
    if not key or not signature:
        return False
    return hmac.compare_digest(sign(key, body).encode(), signature.strip().encode())


# -- the tables ---------------------------------------------------------------------------------
calls = sa.Table(
    "calls",
    metadata,
    id_column(),
    sa.Column("pbx", sa.Text, nullable=False),
    sa.Column("external_id", sa.Text, nullable=False),  # the PBX's call id
    sa.Column("direction", sa.Text, nullable=False),  # inbound | outbound
    text_column("caller"),
    text_column("callee"),
    text_column("number"),  # the customer's side, E.164 ('' when withheld)
    text_column("customer_id"),
    text_column("queue"),
    text_column("agent_id"),
    sa.Column("agent_time", TIMESTAMPTZ),  # the time of the event that named the agent
    sa.Column("start_time", TIMESTAMPTZ, nullable=False),
    sa.Column("start_known", sa.Boolean, nullable=False, server_default=sa.false()),  # the `new` event came
    sa.Column("answer_time", TIMESTAMPTZ),
    sa.Column("end_time", TIMESTAMPTZ),
    sa.Column("queue_seconds", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("talk_seconds", sa.BigInteger, nullable=False, server_default="0"),
    text_column("outcome"),  # '' while it goes on; answered | missed | abandoned | busy | voicemail
    text_column("cause"),
    sa.Column("transfer_count", sa.Integer, nullable=False, server_default="0"),
    text_column("disposition"),
    text_column("note"),
    sa.Column("ticket_id", UUID_TYPE, sa.ForeignKey("tickets.id", ondelete="SET NULL")),
    sa.Column("seen", TEXTS, nullable=False, server_default="{}"),  # applied event keys
    sa.Column("logged", sa.Boolean, nullable=False, server_default=sa.false()),  # call.logged.v1 went out
    *times(),
    sa.UniqueConstraint("pbx", "external_id", name="calls_pbx_external"),
    sa.CheckConstraint("direction IN ('inbound', 'outbound')", name="calls_direction"),
)
c = calls.c
sa.Index("calls_start", c.start_time.desc(), c.id.desc())
sa.Index("calls_agent_start", c.agent_id, c.start_time.desc(), c.id.desc(), postgresql_where=c.agent_id != "")
sa.Index("calls_customer_start", c.customer_id, c.start_time.desc(), c.id.desc(), postgresql_where=c.customer_id != "")
sa.Index("calls_ticket", c.ticket_id)

callbacks = sa.Table(
    "callbacks",
    metadata,
    id_column(),
    sa.Column("number", sa.Text, nullable=False),  # E.164
    text_column("customer_id"),
    sa.Column("call_id", UUID_TYPE, sa.ForeignKey("calls.id", ondelete="SET NULL")),  # the last missed call
    text_column("queue"),
    sa.Column("missed_count", sa.Integer, nullable=False, server_default="1"),
    sa.Column("due_time", TIMESTAMPTZ, nullable=False, server_default=sa.func.now()),
    sa.Column("state", sa.Text, nullable=False, server_default="open"),  # open | done
    text_column("assignee_id"),
    text_column("outcome"),
    text_column("note"),
    text_column("completed_by"),
    sa.Column("complete_time", TIMESTAMPTZ),
    *times(),
    sa.CheckConstraint("state IN ('open', 'done')", name="callbacks_state"),
)

# Personal data blanked when the customer is erased (customer_projection.erase_personal).
calls.info["personal"] = ("caller", "callee", "number", "note")
callbacks.info["personal"] = ("number", "note")
cb = callbacks.c
# One open callback per number: another missed call counts it up.
sa.Index("callbacks_open_number", cb.number, unique=True, postgresql_where=cb.state == "open")
sa.Index("callbacks_due", cb.due_time, cb.id)
sa.Index("callbacks_call", cb.call_id)


# -- the events ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class CtiEvent:
    call_id: str
    event: str
    direction: str
    caller: str
    callee: str
    number: str  # the customer's side in E.164, '' when withheld
    queue: str
    agent: str
    time: dt.datetime
    cause: str

    @property
    def key(self) -> str:
        """What makes it the same event again (a transfer once per its time)."""
        return f"transfer@{self.time.isoformat()}" if self.event == "transfer" else self.event


def _party(value: str, region: str) -> str:
    """A number in E.164 when it is one, else as given (an extension)."""
    return phone_e164(value, region) or value if value else ""


def parse_event(body: bytes, region: str) -> CtiEvent:
    """The body's event, or INVALID_ARGUMENT naming every bad field."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise InvalidArgument.field("body", "must be a JSON object (UTF-8)") from None
    if not isinstance(data, dict):
        raise InvalidArgument.field("body", "must be a JSON object")
    bad: list[FieldViolation] = []

    def text(name: str, limit: int, required: bool = False) -> str:
        value = data.get(name, "")
        if value is None:
            value = ""
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            bad.append(FieldViolation(name, "must be a string"))
            return ""
        value = value.strip()
        if "\x00" in value:  # PostgreSQL stores no NUL in text: a bad field, not a failed INSERT
            bad.append(FieldViolation(name, "must not contain NUL characters (U+0000)"))
            return ""
        if required and not value:
            bad.append(FieldViolation(name, "is required"))
        elif len(value) > limit:
            bad.append(FieldViolation(name, f"may be at most {limit} characters"))
        return value

    def choice(name: str, allowed: tuple[str, ...], required: bool = True, default: str = "") -> str:
        value = text(name, 40, required)
        if value and value.lower() not in allowed:
            bad.append(FieldViolation(name, f"must be one of {', '.join(allowed)}"))
        return value.lower() or default

    call_id = text("call_id", ID_LIMIT, True)
    event = choice("event", EVENTS)
    direction = choice("direction", DIRECTIONS)
    caller = text("caller", NUMBER_LIMIT)
    callee = text("callee", NUMBER_LIMIT)
    queue = text("queue", QUEUE_LIMIT)
    agent = text("agent", ID_LIMIT, required=event in ("answered", "transfer"))
    cause = choice("cause", CAUSES, required=False, default="normal" if event == "hangup" else "")
    when = None
    raw_time = text("time", 64, True)
    if raw_time:
        try:
            when = dt.datetime.fromisoformat(raw_time)
        except ValueError:
            bad.append(FieldViolation("time", "must be an RFC 3339 time, e.g. 2026-03-01T10:15:00+03:30"))
        else:
            if when.tzinfo is None:
                bad.append(FieldViolation("time", "must carry its offset (Z or +03:30)"))
                when = None
    # The customer's side must be a phone number (or withheld, inbound).
    number = ""
    if direction == "inbound":
        if caller.lower() not in WITHHELD:
            number = phone_e164(caller, region) or ""
            if not number:
                bad.append(FieldViolation("caller", "is not a phone number"))
    elif direction == "outbound":
        if not callee:
            bad.append(FieldViolation("callee", "is required for an outbound call"))
        else:
            number = phone_e164(callee, region) or ""
            if not number:
                bad.append(FieldViolation("callee", "is not a phone number"))
    if bad:
        raise InvalidArgument(bad)
    withheld = direction == "inbound" and caller.lower() in WITHHELD
    return CtiEvent(
        call_id=call_id,
        event=event,
        direction=direction,
        caller="" if withheld else (number if direction == "inbound" else _party(caller, region)),
        callee=number if direction == "outbound" else _party(callee, region),
        number=number,
        queue=queue,
        agent=agent,
        time=when.astimezone(dt.UTC),
        cause=cause,
    )


class Derived(NamedTuple):
    queue_seconds: int
    talk_seconds: int
    outcome: str


def derive(start: dt.datetime, answer: dt.datetime | None, end: dt.datetime | None, cause: str) -> Derived:
    """The durations and outcome of a call from its times (events out of order, clocks a
    little apart: never negative)."""

    def seconds(a, b) -> int:
        return max(0, int((b - a).total_seconds())) if a and b else 0

    if answer is not None:
        queue = seconds(start, answer)
        talk = seconds(answer, end)
    else:
        queue = seconds(start, end)
        talk = 0
    if end is None:
        outcome = ""
    elif answer is not None:
        outcome = "answered"
    else:
        outcome = {"busy": "busy", "abandoned": "abandoned", "voicemail": "voicemail"}.get(cause, "missed")
    return Derived(queue, talk, outcome)


def _snapshot(row) -> tuple:
    """What call.logged.v1 carries: a change in it publishes the call again."""
    return (
        row.outcome,
        row.queue_seconds,
        row.talk_seconds,
        row.start_time,
        row.answer_time,
        row.end_time,
        row.agent_id,
        row.ticket_id,
        row.queue,
        row.disposition,
    )


# -- conversions --------------------------------------------------------------------------------
def to_proto(row) -> pb.Call:
    out = pb.Call(
        name=CALL.format(row.id),
        pbx=row.pbx,
        external_id=row.external_id,
        direction=DIRECTION_ENUM.get(row.direction, 0),
        caller=row.caller,
        callee=row.callee,
        number=row.number,
        customer=CUSTOMER.format(row.customer_id) if row.customer_id else "",
        queue=row.queue,
        agent=AGENT.format(row.agent_id) if row.agent_id else "",
        queue_seconds=row.queue_seconds,
        talk_seconds=row.talk_seconds,
        outcome=OUTCOME_ENUM.get(row.outcome, 0),
        cause=row.cause,
        transfer_count=row.transfer_count,
        disposition=row.disposition,
        note=row.note,
        ticket=TICKET.format(row.ticket_id) if row.ticket_id else "",
        etag=etag(row.version),
    )
    set_times(out, row, "start_time", "answer_time", "end_time", "create_time", "update_time")
    return out


def to_event(row) -> ev_pb.CallEvent:
    e = ev_pb.CallEvent(
        call=CALL.format(row.id),
        direction=row.direction,
        customer=CUSTOMER.format(row.customer_id) if row.customer_id else "",
        ticket=TICKET.format(row.ticket_id) if row.ticket_id else "",
        queue=row.queue,
        agent=AGENT.format(row.agent_id) if row.agent_id else "",
        outcome=row.outcome,
        disposition=row.disposition,
        queue_seconds=row.queue_seconds,
        talk_seconds=row.talk_seconds,
        version=row.version,
    )
    set_times(e, row, "start_time", "end_time")
    return e


def callback_to_proto(row) -> pb.Callback:
    out = pb.Callback(
        name=CALLBACK.format(row.id),
        number=row.number,
        customer=CUSTOMER.format(row.customer_id) if row.customer_id else "",
        call=CALL.format(row.call_id) if row.call_id else "",
        queue=row.queue,
        missed_count=row.missed_count,
        state=CALLBACK_STATE_ENUM[row.state],
        assignee=AGENT.format(row.assignee_id) if row.assignee_id else "",
        outcome=row.outcome,
        note=row.note,
        completed_by=row.completed_by,
        etag=etag(row.version),
    )
    set_times(out, row, "due_time", "complete_time", "create_time")
    return out


def summary(row) -> str:
    """The system message a call leaves on its ticket."""
    way = "ورودی از" if row.direction == "inbound" else "خروجی به"
    parts = [f"تماس {way} {row.number or 'شماره ناشناس'}"]
    if row.queue:
        parts.append(f"صف {row.queue}")
    if row.agent_id:
        parts.append(f"کارشناس {row.agent_id}")
    parts.append(f"انتظار {row.queue_seconds} ثانیه")
    if row.outcome == "answered":
        parts.append(f"مکالمه {row.talk_seconds} ثانیه")
    parts.append(f"نتیجه: {OUTCOME_FA.get(row.outcome, row.outcome)}")
    if row.disposition:
        parts.append(f"دسته‌بندی: {row.disposition}")
    return " — ".join(parts) + f" [{CALL.format(row.id)}]"


# -- filtering ----------------------------------------------------------------------------------
def _enum_names(values, prefix: str) -> dict[str, str]:
    out = {}
    for v in values:
        out[v] = out[v.upper()] = out[f"{prefix}_{v.upper()}"] = v
    return out


def name_filter(column, pattern: ResourceName, field: str):
    """A filter on a full resource name (agents/{id}) over a column keeping the bare id."""

    def compile_(op: str, value):
        if not isinstance(value, str) or not pattern.matches(value):
            raise ValueError(f"{field} takes a name like {pattern.format('…')!r}")
        stored = value.split("/", 1)[1]
        return column == stored if op == "=" else column.is_distinct_from(stored)

    return compile_


NAME_OPS = frozenset({"=", "!="})
CALL_FILTERS = FilterSchema(
    FilterField("direction", c.direction, FieldType.ENUM, enum_values=_enum_names(DIRECTIONS, "DIRECTION")),
    FilterField("outcome", c.outcome, FieldType.ENUM, enum_values=_enum_names(OUTCOMES, "OUTCOME")),
    FilterField("agent", name_filter(c.agent_id, AGENT, "agent"), operators=NAME_OPS),
    FilterField("customer", name_filter(c.customer_id, CUSTOMER, "customer"), operators=NAME_OPS),
    FilterField("ticket", name_filter(sa.cast(c.ticket_id, sa.Text), TICKET, "ticket"), operators=NAME_OPS),
    FilterField("queue", c.queue),
    FilterField("number", c.number),
    FilterField("disposition", c.disposition),
    FilterField("start_time", c.start_time, FieldType.TIMESTAMP),
)
CALL_SORTABLE = {"start_time": c.start_time, "queue_seconds": c.queue_seconds, "talk_seconds": c.talk_seconds}
CALLBACK_FILTERS = FilterSchema(
    FilterField("state", cb.state, FieldType.ENUM, enum_values=_enum_names(("open", "done"), "STATE")),
    FilterField("assignee", name_filter(cb.assignee_id, AGENT, "assignee"), operators=NAME_OPS),
    FilterField("customer", name_filter(cb.customer_id, CUSTOMER, "customer"), operators=NAME_OPS),
    FilterField("number", cb.number),
    FilterField("queue", cb.queue),
    FilterField("due_time", cb.due_time, FieldType.TIMESTAMP),
)
CALLBACK_SORTABLE = {"due_time": cb.due_time, "create_time": cb.create_time}
MASK = UpdateMask(
    ["disposition", "note", "ticket"],
    immutable={f: "it comes from the PBX" for f in ("direction", "caller", "callee", "number", "agent", "outcome")},
)


# -- the use cases ------------------------------------------------------------------------------
class Calls:
    def __init__(self, support: Support):
        self.support = support
        self.uow = support.uow
        self.keys = cti_keys()
        self.tokens = PageTokens(support.settings.jwt_secret, "calls")

    @property
    def tickets(self) -> Tickets:
        return self.support.tickets

    # CTI ----------------------------------------------------------------------------------------
    def post_event(self, req: pb.PostCallEventRequest) -> pb.PostCallEventResponse:
        if not signature_ok(self.keys.get(req.pbx), req.body, req.signature):
            raise Unauthenticated(
                "the X-Crm-Signature of the body is missing or wrong for this pbx", reason="BAD_SIGNATURE"
            )
        e = parse_event(req.body, self.support.phone_region)
        with self.uow.begin() as tx:
            row, duplicate = self.apply(tx, req.pbx, e)
        return pb.PostCallEventResponse(call=CALL.format(row.id), duplicate=duplicate)

    def apply(self, tx, pbx: str, e: CtiEvent):
        """Apply one event to its call (in the caller's transaction); returns (row, duplicate)."""
        conn = tx.conn
        conn.execute(
            pg_insert(calls)
            .values(
                pbx=pbx,
                external_id=e.call_id,
                direction=e.direction,
                caller=e.caller,
                callee=e.callee,
                number=e.number,
                customer_id=self.tickets.match_customer(conn, e.number) if e.number else "",
                queue=e.queue,
                start_time=e.time,
            )
            .on_conflict_do_nothing(constraint="calls_pbx_external")
        )
        before = conn.execute(sa.select(calls).where(c.pbx == pbx, c.external_id == e.call_id).with_for_update()).one()
        if e.key in before.seen:
            return before, True
        values: dict = {"seen": sa.func.array_append(c.seen, e.key)}
        start, answer, end, cause = before.start_time, before.answer_time, before.end_time, before.cause
        if e.event == "new":
            start = e.time
            values["start_known"] = True
        elif not before.start_known:
            start = min(start, e.time)
        if e.event == "answered":
            answer = e.time
        elif e.event == "hangup":
            end, cause = e.time, e.cause
        elif e.event == "transfer":
            values["transfer_count"] = c.transfer_count + 1
        if e.agent and (before.agent_time is None or e.time >= before.agent_time):
            values.update(agent_id=e.agent, agent_time=e.time)
        for f in ("queue", "caller", "callee"):
            if getattr(e, f) and not getattr(before, f):
                values[f] = getattr(e, f)
        d = derive(start, answer, end, cause)
        values.update(
            start_time=start,
            answer_time=answer,
            end_time=end,
            cause=cause,
            queue_seconds=d.queue_seconds,
            talk_seconds=d.talk_seconds,
            outcome=d.outcome,
            update_time=sa.func.now(),
            version=c.version + 1,
        )
        row = conn.execute(calls.update().where(c.id == before.id).values(**values).returning(calls)).one()
        if row.ticket_id is None:
            row = self._link_open_ticket(conn, row)
        if row.ticket_id is None and row.answer_time is not None:
            row = self._open_ticket(tx, row)
        if row.end_time is not None and (not before.logged or _snapshot(before) != _snapshot(row)):
            row = self._logged(tx, before, row)
        return row, False

    def _link_open_ticket(self, conn, row):
        """The customer's (or, unknown, the number's) latest open phone ticket, if any."""
        if row.customer_id:
            who = tickets.c.customer_id == row.customer_id
        elif row.number:
            who = tickets.c.contact_address == row.number
        else:
            return row
        tid = conn.execute(
            sa.select(tickets.c.id)
            .where(who, tickets.c.channel == "phone", tickets.c.state.in_(OPEN_STATES))
            .order_by(tickets.c.create_time.desc(), tickets.c.id.desc())
            .limit(1)
        ).scalar()
        if tid is None:
            return row
        return conn.execute(calls.update().where(c.id == row.id).values(ticket_id=tid).returning(calls)).one()

    def _agent_exists(self, conn, agent_id: str) -> bool:
        return bool(agent_id) and conn.execute(sa.select(sa.exists().where(agents.c.id == agent_id))).scalar()

    def _open_ticket(self, tx, row):
        conn = tx.conn
        number = row.number or "شماره ناشناس"
        subject = f"تماس از {number}" if row.direction == "inbound" else f"تماس با {number}"
        body = f"تماس {'ورودی' if row.direction == 'inbound' else 'خروجی'} پاسخ داده شد"
        if row.agent_id:
            body += f" (کارشناس {row.agent_id})"
        t = self.tickets.open(
            tx,
            NewTicket(
                subject=subject,
                channel="phone",
                body=body + f" [{CALL.format(row.id)}]",
                customer_id=row.customer_id,
                contact_address=row.number,
                assignee_id=row.agent_id if self._agent_exists(conn, row.agent_id) else "",
                kind="system",
                author=CTI_ACTOR,
                request_id=f"call:{row.id}",
            ),
            CTI_ACTOR,
        )
        return conn.execute(calls.update().where(c.id == row.id).values(ticket_id=t.id).returning(calls)).one()

    def _logged(self, tx, before, row):
        """The call has ended (or what was logged changed): summary, event, after-call work,
        callbacks."""
        conn = tx.conn
        row = conn.execute(calls.update().where(c.id == row.id).values(logged=True).returning(calls)).one()
        if row.ticket_id is not None:
            self.tickets.add_message(tx, row.ticket_id, "system", summary(row), author=CTI_ACTOR, actor=CTI_ACTOR)
        tx.publish("call.logged.v1", to_event(row), CALL.format(row.id))
        was = before.outcome if before.logged else ""
        if row.outcome == "answered" and row.agent_id and (was != "answered" or before.end_time != row.end_time):
            conn.execute(
                agents.update()
                .where(agents.c.id == row.agent_id)
                .values(
                    busy_until=sa.func.greatest(
                        sa.func.coalesce(agents.c.busy_until, row.end_time),
                        sa.literal(row.end_time, TIMESTAMPTZ)
                        + agents.c.after_call_work_seconds * sa.text("interval '1 second'"),
                    )
                )
            )
        if not row.number:
            return row
        if row.direction == "inbound" and row.outcome in UNANSWERED and was not in UNANSWERED:
            self._owe_callback(conn, row)
        elif row.direction == "inbound" and row.outcome == "answered" and was in UNANSWERED:
            self._unmiss(conn, row)
        if row.direction == "outbound" and row.outcome == "answered" and was != "answered":
            conn.execute(
                callbacks.update()
                .where(cb.number == row.number, cb.state == "open")
                .values(
                    state="done",
                    outcome="reached_by_call",
                    completed_by=row.agent_id or CTI_ACTOR,
                    complete_time=row.end_time,
                    update_time=sa.func.now(),
                    version=cb.version + 1,
                )
            )
        return row

    def _owe_callback(self, conn, row) -> None:
        assignee = ""
        if row.ticket_id is not None:
            assignee = conn.execute(sa.select(tickets.c.assignee_id).where(tickets.c.id == row.ticket_id)).scalar()
        stmt = pg_insert(callbacks).values(
            number=row.number,
            customer_id=row.customer_id,
            call_id=row.id,
            queue=row.queue,
            due_time=sa.func.now(),
            assignee_id=assignee or "",
        )
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["number"],
                index_where=cb.state == "open",
                set_={
                    "missed_count": cb.missed_count + 1,
                    "call_id": stmt.excluded.call_id,
                    "queue": sa.func.coalesce(sa.func.nullif(stmt.excluded.queue, ""), cb.queue),
                    "customer_id": sa.func.coalesce(sa.func.nullif(stmt.excluded.customer_id, ""), cb.customer_id),
                    "update_time": sa.func.now(),
                    "version": cb.version + 1,
                },
            )
        )

    def _unmiss(self, conn, row) -> None:
        """A call logged as missed turned out answered (its answer event came late)."""
        open_ = sa.and_(cb.number == row.number, cb.state == "open")
        conn.execute(
            callbacks.update()
            .where(open_, cb.call_id == row.id, cb.missed_count <= 1)
            .values(
                state="done",
                outcome="answered",
                completed_by=CTI_ACTOR,
                complete_time=sa.func.now(),
                update_time=sa.func.now(),
                version=cb.version + 1,
            )
        )
        conn.execute(
            callbacks.update()
            .where(open_, cb.missed_count > 1)
            .values(missed_count=cb.missed_count - 1, update_time=sa.func.now(), version=cb.version + 1)
        )

    # staff --------------------------------------------------------------------------------------
    def get(self, name: str) -> pb.Call:
        cid = CALL.parse(name).call_id
        with self.uow.read() as conn:
            row = conn.execute(sa.select(calls).where(c.id == cid)).one_or_none()
        if row is None:
            raise CALL.not_found(name)
        return to_proto(row)

    def list(self, req: pb.ListCallsRequest) -> tuple[list[pb.Call], str]:
        limit = page_size(req.page_size)
        where = CALL_FILTERS.compile(req.filter)
        keys = parse_order_by(req.order_by.strip() or "start_time desc", CALL_SORTABLE)
        order = with_tiebreaker(keys, c.id, descending=keys[-1].descending)
        purpose = query_fingerprint(req.filter, req.order_by)
        with self.uow.read() as conn:
            rows, token = keyset_page(
                conn, sa.select(calls).where(where), order, self.tokens, purpose, limit, req.page_token
            )
        return [to_proto(r) for r in rows], token

    def update(self, call: pb.Call, update_mask, principal: Principal) -> pb.Call:
        paths = MASK.paths(update_mask)
        bad: list[FieldViolation] = []
        new: dict = {}
        if "disposition" in paths:
            new["disposition"] = call.disposition.strip()
            if new["disposition"] and not DISPOSITION.fullmatch(new["disposition"]):
                bad.append(FieldViolation("call.disposition", "must be 1..40 lower-case letters, digits or '_'"))
        if "note" in paths:
            new["note"] = call.note.strip()
            if len(new["note"]) > NOTE_LIMIT:
                bad.append(FieldViolation("call.note", f"may be at most {NOTE_LIMIT} characters"))
        if "ticket" in paths:
            if call.ticket:
                try:
                    new["ticket_id"] = TICKET.parse(call.ticket, "call.ticket").ticket_id
                except InvalidArgument as err:
                    bad += err.violations
            else:
                new["ticket_id"] = None
        if bad:
            raise InvalidArgument(bad)
        cid = CALL.parse(call.name, "call.name").call_id
        with self.uow.begin() as tx:
            conn = tx.conn
            before = conn.execute(sa.select(calls).where(c.id == cid).with_for_update()).one_or_none()
            if before is None:
                raise CALL.not_found(call.name)
            check_etag(call.etag, before.version, call.name)
            if new.get("ticket_id"):
                if not conn.execute(sa.select(sa.exists().where(tickets.c.id == new["ticket_id"]))).scalar():
                    raise InvalidArgument.field("call.ticket", f"ticket {call.ticket} does not exist")
            elif "ticket_id" in new and before.answer_time is not None:
                raise InvalidArgument.field("call.ticket", "an answered call keeps a ticket; link another one instead")
            diff = {k: v for k, v in new.items() if str(getattr(before, k) or "") != str(v or "")}
            if not diff:
                return to_proto(before)
            row = conn.execute(
                calls.update()
                .where(c.id == cid)
                .values(**diff, update_time=sa.func.now(), version=c.version + 1)
                .returning(calls)
            ).one()
            tx.audit(
                call.name,
                "call.update",
                principal,
                [
                    audit.change(k, json.dumps(str(getattr(before, k) or "")), json.dumps(str(v or "")))
                    for k, v in diff.items()
                ],
            )
            if row.logged:
                if "ticket_id" in diff and row.ticket_id is not None:
                    self.tickets.add_message(
                        tx, row.ticket_id, "system", summary(row), author=principal.subject, actor=principal.subject
                    )
                tx.publish("call.logged.v1", to_event(row), CALL.format(row.id))
        return to_proto(row)

    def list_callbacks(self, req: pb.ListCallbacksRequest) -> tuple[list[pb.Callback], str]:
        limit = page_size(req.page_size)
        where = CALLBACK_FILTERS.compile(req.filter)
        keys = parse_order_by(req.order_by.strip() or "due_time", CALLBACK_SORTABLE)
        order = with_tiebreaker(keys, cb.id, descending=keys[-1].descending)
        purpose = query_fingerprint(req.filter, req.order_by, of="callbacks")
        with self.uow.read() as conn:
            rows, token = keyset_page(
                conn, sa.select(callbacks).where(where), order, self.tokens, purpose, limit, req.page_token
            )
        return [callback_to_proto(r) for r in rows], token

    def complete_callback(self, req: pb.CompleteCallbackRequest, principal: Principal) -> pb.Callback:
        bad: list[FieldViolation] = []
        outcome = req.outcome.strip().lower()
        if outcome not in CALLBACK_OUTCOMES:
            bad.append(FieldViolation("outcome", f"must be one of {', '.join(CALLBACK_OUTCOMES)}"))
        if len(req.note) > NOTE_LIMIT:
            bad.append(FieldViolation("note", f"may be at most {NOTE_LIMIT} characters"))
        if bad:
            raise InvalidArgument(bad)
        bid = CALLBACK.parse(req.name).callback_id
        with self.uow.begin() as tx:
            row = tx.conn.execute(sa.select(callbacks).where(cb.id == bid).with_for_update()).one_or_none()
            if row is None:
                raise CALLBACK.not_found(req.name)
            check_etag(req.etag, row.version, req.name)
            if row.state != "open":
                raise FailedPrecondition(
                    f"{req.name} is already done", reason="CALLBACK_ALREADY_DONE", metadata={"name": req.name}
                )
            done = tx.conn.execute(
                callbacks.update()
                .where(cb.id == bid)
                .values(
                    state="done",
                    outcome=outcome,
                    note=req.note.strip(),
                    completed_by=principal.subject,
                    complete_time=sa.func.now(),
                    update_time=sa.func.now(),
                    version=cb.version + 1,
                )
                .returning(callbacks)
            ).one()
            tx.audit(req.name, "callback.complete", principal, [audit.change("outcome", "null", json.dumps(outcome))])
        return callback_to_proto(done)


class CallServicer(calls_pb2_grpc.CallServiceServicer):
    def __init__(self, uc: Calls):
        self.uc = uc

    def PostCallEvent(self, request, context):
        return self.uc.post_event(request)

    def GetCall(self, request, context):
        return self.uc.get(request.name)

    def ListCalls(self, request, context):
        items, token = self.uc.list(request)
        return pb.ListCallsResponse(calls=items, next_page_token=token)

    def UpdateCall(self, request, context):
        return self.uc.update(request.call, request.update_mask, current_principal())

    def ListCallbacks(self, request, context):
        items, token = self.uc.list_callbacks(request)
        return pb.ListCallbacksResponse(callbacks=items, next_page_token=token)

    def CompleteCallback(self, request, context):
        return self.uc.complete_callback(request, current_principal())


def use_cases(support: Support) -> Calls:
    return support.once("calls", lambda: Calls(support))


def registration(support: Support) -> Registration:
    return Registration.of(CallServicer(use_cases(support)))
