"""The unit of work: the one write path of every service.

    with uow.begin() as tx:
        tx.execute(orders.insert(), {...})              # the state change
        tx.publish("order.placed.v1", OrderPlaced(...), subject="orders/7")
        tx.audit("orders/7", "create", principal, [audit.change("amount", "null", "120")])

Everything the block writes commits together or not at all: state, outbox rows (the events)
and audit entries. After the commit the outbox relay is woken, so events leave at once rather
than at its next poll. Bulk forms write by COPY (`publish_many`, `audit_many`, `copy`), the
speed an import needs, on the same transaction. Reads that need no transaction use
`uow.read()` (autocommit: no BEGIN/COMMIT round trips).

No service calls `engine.begin()`, `outbox.enqueue` or the relay itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import uuid
import weakref
from collections.abc import Iterable, Iterator

import sqlalchemy as sa

from . import audit as audit_trail
from .auth import Principal
from .db import autocommit
from .logging import request_id_var
from .messaging.envelope import Event, new_event
from .messaging.outbox import OUTBOX_COLUMNS, outbox_row
from .messaging.tables import outbox
from .telemetry import inject_headers


def _actor(who: Principal | str) -> str:
    return who.subject if isinstance(who, Principal) else str(who)


def outbox_values(event: Event) -> dict:
    """The outbox row of an event, as an INSERT takes it (the trace context of now)."""
    return dict(zip(OUTBOX_COLUMNS, outbox_row(event, inject_headers()), strict=True))


def copy_rows(conn: sa.Connection, table: str, columns: Iterable[str], rows: Iterable) -> None:
    """COPY rows (sequences of values in `columns` order) into a table, in the connection's
    open transaction. Text, numbers, dates and None go as they are; JSON and arrays as text."""
    cursor = conn.connection.driver_connection.cursor()
    with cursor, cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


def json_text(value) -> str:
    """A JSONB value as COPY takes it: JSON text (PostgreSQL parses it)."""
    if isinstance(value, str):
        return value
    if not value:
        return "[]" if isinstance(value, list) else "{}"
    return json.dumps(value, ensure_ascii=False, default=str)


# One event and one audit entry in one statement (the outbox row in a CTE), compiled once.
_OUTBOX_AND_AUDIT = (
    audit_trail.audit_entries.insert()
    .values({c: sa.bindparam(f"a_{c}") for c in audit_trail.AUDIT_COLUMNS})
    .add_cte(outbox.insert().values({c: sa.bindparam(f"o_{c}") for c in OUTBOX_COLUMNS}).cte("o"))
)


class Transaction:
    """One open transaction and what commits with it (made by `UnitOfWork.begin`)."""

    def __init__(self, uow: UnitOfWork, conn: sa.Connection):
        self.uow = uow
        self.conn = conn
        self.events = 0  # how many events this transaction published
        # Outbox rows and audit entries wait here and are written at commit in ONE statement
        # (a round trip less per write than one INSERT each); bulk forms flush them first.
        self._outbox: list[dict] = []
        self._audit: list[dict] = []

    def execute(self, statement, parameters=None):
        return self.conn.execute(statement, parameters)

    def savepoint(self):
        """A nested transaction (SAVEPOINT): `with tx.savepoint(): ...` rolls back only itself."""
        return self.conn.begin_nested()

    # -- events ------------------------------------------------------------------------------
    def event(self, routing_key: str, message, subject: str) -> Event:
        """The envelope of an event of this service (not yet published)."""
        if not self.uow.event_domain:
            raise RuntimeError(f"{self.uow.source_service} publishes no events (no event domain)")
        return new_event(
            domain=self.uow.event_domain,
            source_service=self.uow.source_service,
            routing_key=routing_key,
            subject=subject,
            message=message,
        )

    def publish(self, routing_key: str, message, subject: str) -> Event:
        """Publish `message` when the transaction commits (an outbox row written now)."""
        e = self.event(routing_key, message, subject)
        self._outbox.append(outbox_values(e))
        self.events += 1
        return e

    def publish_many(self, routing_key: str, items: list[tuple[str, object]]) -> None:
        """Many events of one kind (one message type) by COPY: `items` are (subject, message)."""
        if not items:
            return
        self.flush()  # rows keep their order
        template = self.event(routing_key, items[0][1], "")
        trace_headers = json_text(inject_headers())
        ids = new_ids(len(items))
        rows = (
            outbox_row(
                dataclasses.replace(
                    template,
                    id=event_id,
                    subject=subject,
                    data=message.SerializeToString(),
                ),
                trace_headers,
            )
            for event_id, (subject, message) in zip(ids, items, strict=True)
        )
        copy_rows(self.conn, "outbox", OUTBOX_COLUMNS, rows)
        self.events += len(items)

    def publish_select(self, routing_key: str, template, query: sa.Select, strings: dict[str, int]) -> int:
        """One event per row of `query`, built by the database (INSERT .. SELECT into the outbox:
        no row comes to Python, the speed a segment rebuild of a million customers needs).

        `template` is the message's constant part (fields equal in every event); `query` has a
        column labelled "subject" and one per name in `strings` (field name -> field number of a
        string field of the message, 1..15, not set in the template), appended to the payload in
        protobuf's wire format (a parser merges the parts). Returns the number of events."""
        self.flush()
        head = self.event(routing_key, template, "")
        q = query.subquery("q")
        payload = sa.literal(head.data, sa.LargeBinary)
        for name, number in strings.items():
            if not 1 <= number <= 15:
                raise ValueError(f"{name}: field numbers 1..15 only")
            payload = payload.op("||")(proto_string_sql(number, q.c[name]))
        cols = {
            "event_id": sa.func.gen_random_uuid(),
            "exchange": sa.literal(head.exchange),
            "routing_key": sa.literal(routing_key),
            "event_type": sa.literal(head.type),
            "source": sa.literal(head.source),
            "subject": q.c.subject,
            "dataschema": sa.literal(head.dataschema),
            "payload": payload,
            "trace_headers": sa.cast(sa.literal(json_text(inject_headers())), outbox.c.trace_headers.type),
            "occurred_at": sa.literal(head.time, outbox.c.occurred_at.type),
        }
        select = sa.select(*(v.label(k) for k, v in cols.items()))
        ins = outbox.insert().from_select(list(cols), select).returning(outbox.c.id).cte("ins")
        n = self.conn.execute(sa.select(sa.func.count()).select_from(ins)).scalar_one()
        self.events += n
        return n

    # -- audit -------------------------------------------------------------------------------
    def audit(
        self, resource: str, action: str, actor: Principal | str, changes: list[dict], request_id: str | None = None
    ) -> None:
        """An audit entry, committed with the change it records."""
        rid = request_id_var.get() if request_id is None else request_id
        self._audit.append(
            {
                "resource": resource,
                "action": action,
                "actor": _actor(actor),
                "changes": changes,
                "request_id": rid or "",
            }
        )

    def audit_many(
        self,
        entries: Iterable[tuple[str, str, list[dict] | str]],
        actor: Principal | str,
        request_id: str | None = None,
        copy: bool = False,
    ) -> None:
        """Entries as (resource, action, changes) by one actor; with `copy`, by COPY (changes
        may then be JSON text already, as an import prepares them)."""
        rid = (request_id_var.get() if request_id is None else request_id) or ""
        who = _actor(actor)
        rows = [(resource, action, who, changes, rid) for resource, action, changes in entries]
        if not rows:
            return
        self.flush()
        if copy:
            copy_rows(
                self.conn,
                "audit_entries",
                audit_trail.AUDIT_COLUMNS,
                ((r, a, w, json_text(c), i) for r, a, w, c, i in rows),
            )
        else:
            audit_trail.record_many(self.conn, rows)

    def redact_audit(self, resource: str) -> int:
        """Redact every entry about `resource` and below it, this transaction's included."""
        self.flush()
        return audit_trail.redact(self.conn, resource)

    def flush(self) -> None:
        """Write the waiting outbox rows and audit entries now (the commit does it anyway)."""
        if not (self._outbox or self._audit):
            return
        if len(self._outbox) == 1 and len(self._audit) == 1:  # the usual write: one statement
            params = {f"o_{k}": v for k, v in self._outbox[0].items()}
            params.update({f"a_{k}": v for k, v in self._audit[0].items()})
            self.conn.execute(_OUTBOX_AND_AUDIT, params)
        else:
            if self._outbox:
                self.conn.execute(outbox.insert(), self._outbox)
            if self._audit:
                self.conn.execute(audit_trail.audit_entries.insert(), self._audit)
        self._outbox, self._audit = [], []

    # -- bulk state ----------------------------------------------------------------------------
    def copy(self, table: str, columns: Iterable[str], rows: Iterable) -> None:
        copy_rows(self.conn, table, columns, rows)


class UnitOfWork:
    def __init__(self, engine: sa.Engine, relay=None, *, source_service: str, event_domain: str | None = None):
        self.engine = engine
        self.relay = relay
        self.source_service = source_service
        self.event_domain = event_domain
        self.reader = autocommit(engine)

    @contextlib.contextmanager
    def begin(self) -> Iterator[Transaction]:
        """A transaction: commits when the block ends, rolls back if it raises. A commit that
        published events wakes the relay."""
        with self.engine.begin() as conn:
            tx = Transaction(self, conn)
            yield tx
            tx.flush()
        if tx.events and self.relay is not None:
            self.relay.wake()

    @contextlib.contextmanager
    def joined(self, conn: sa.Connection) -> Iterator[Transaction]:
        """A Transaction on a connection that is already in a transaction someone else commits (a
        timer handler's, an event handler's): publish and audit as in `begin`; the rows are
        written when the block ends and commit (or roll back) with that transaction. The relay
        is woken when that transaction commits (not before: it would find nothing yet and wait
        for its next poll)."""
        tx = Transaction(self, conn)
        yield tx
        tx.flush()
        if tx.events and self.relay is not None:
            current = conn.get_transaction()
            armed = conn.info.get(_WAKE_ARMED)
            if armed is None or armed() is not current:  # once per transaction
                conn.info[_WAKE_ARMED] = weakref.ref(current)
                # a listener left by a transaction that rolled back wakes the relay once more
                sa.event.listen(conn, "commit", lambda c, relay=self.relay: relay.wake(), once=True)

    def read(self) -> sa.Connection:
        """`with uow.read() as conn:` an autocommit connection for reads."""
        return self.reader.connect()


_WAKE_ARMED = "uow.relay_wake_armed"  # conn.info: the transaction whose commit wakes the relay


def proto_string_sql(number: int, text) -> sa.ColumnElement:
    """SQL bytea: a protobuf string field (tag, varint length, UTF-8 bytes) of a text expression
    (lengths below 2 MiB)."""
    data = sa.func.convert_to(text, "UTF8")
    n = sa.func.octet_length(data)
    one = sa.func.set_byte(sa.literal(b"\x00", sa.LargeBinary), 0, n)
    two = sa.func.set_byte(
        sa.func.set_byte(sa.literal(b"\x00\x00", sa.LargeBinary), 0, n.op("&")(127).op("|")(128)), 1, n.op(">>")(7)
    )
    three = sa.func.set_byte(
        sa.func.set_byte(
            sa.func.set_byte(sa.literal(b"\x00\x00\x00", sa.LargeBinary), 0, n.op("&")(127).op("|")(128)),
            1,
            n.op(">>")(7).op("&")(127).op("|")(128),
        ),
        2,
        n.op(">>")(14),
    )
    length = sa.case((n < 128, one), (n < 16384, two), else_=three)
    tag = sa.literal(bytes([(number << 3) | 2]), sa.LargeBinary)
    return tag.op("||")(length).op("||")(data)


def new_ids(n: int) -> list[str]:
    """n random (version 4) UUIDs from one read of the system's randomness."""
    data = os.urandom(16 * n)
    return [str(uuid.UUID(bytes=data[i : i + 16], version=4)) for i in range(0, 16 * n, 16)]
