"""The audience projection: customer-svc's customers (crm_chassis.customer_refs, typed fields)
plus what sales and support events say they did, so segmentation never calls another service.

- customer.* events upsert the customer's row (version-guarded); a merge re-points every table
  of the service naming the merged customers (`customer_id`) to the survivor and recomputes
  its behaviour; an erasure blanks the personal columns parts declare (info["personal"]).
- order.*, invoice.*, opportunity.* (sales) and ticket.* (support) events upsert one fact row
  each (the newest event wins: event_time or version), then the customer's behaviour columns
  (order count, revenue, first/last purchase, open and won opportunities, tickets, complaints,
  last activity) are recomputed from the facts in one statement: a replayed, duplicated or
  out-of-order event leaves them right.
- Every change calls `Campaign.audience_changed(conn, ids, cause)` in the same transaction
  (dynamic segments follow it).

Revenue is the paid amount of invoices minus credit notes, in the invoices' currency (one
currency per deployment). `rebuild_behaviour(conn)` recomputes every customer at once.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from crm.customer.v1 import customer_events_pb2 as ce
from crm.sales.v1 import sales_events_pb2 as se
from crm.support.v1 import support_events_pb2 as te
from crm.support.v1 import ticket_pb2
from crm_chassis import customer_refs as refs
from crm_chassis import jsonrows
from crm_chassis.messaging.consumer import Requires, Subscription
from crm_chassis.messaging.envelope import Event
from crm_chassis.money import NANO

from . import consent
from .runtime import Campaign
from .tables import (
    audience,
    audience_invoices,
    audience_opportunities,
    audience_orders,
    audience_tickets,
    messages,
    metadata,
)

ORDER_EVENTS = ("order.placed.v1", "order.delivered.v1", "order.cancelled.v1")
INVOICE_EVENTS = ("invoice.issued.v1", "invoice.paid.v1", "invoice.overdue.v1", "invoice.credited.v1")
OPPORTUNITY_EVENTS = (
    "opportunity.created.v1",
    "opportunity.updated.v1",
    "opportunity.stage_changed.v1",
    "opportunity.won.v1",
    "opportunity.lost.v1",
    "opportunity.reopened.v1",
)
TICKET_EVENTS = (
    "ticket.opened.v1",
    "ticket.assigned.v1",
    "ticket.first_responded.v1",
    "ticket.state_changed.v1",
    "ticket.escalated.v1",
    "ticket.resolved.v1",
    "ticket.reopened.v1",
    "ticket.closed.v1",
)


def _id(name: str) -> str:
    return name.rpartition("/")[2] if name else ""


def _amount(m) -> Decimal:
    return Decimal(m.units) + Decimal(m.nanos) * NANO


def _time(ts) -> dt.datetime | None:
    return ts.ToDatetime(dt.UTC) if ts.seconds or ts.nanos else None


def _date(d) -> dt.date | None:
    try:
        return dt.date(d.year, d.month, d.day) if d.year else None
    except ValueError:
        return None


def _products(lines) -> list[str]:
    return sorted({_id(line.product) for line in lines if line.product})


def customer_tables() -> list[sa.Table]:
    """Every table of the service that names a customer (parts add theirs to `metadata`); a
    table whose part re-points its own rows on a merge (info["merge"] = "own": a key that
    includes customer_id) is erased here but not re-pointed (see `on_merged`); one whose key
    includes customer_id (info["merge_unique"] = the other key columns) is re-pointed where the
    survivor has no row of the same key, the rest kept under the merged id."""
    return [t for t in metadata.tables.values() if "customer_id" in t.c and t is not audience]


# -- behaviour ---------------------------------------------------------------------------------
_RECOMPUTE = sa.text(
    """
WITH ids AS (SELECT unnest(CAST(:ids AS text[])) AS customer_id),
o AS (SELECT o.customer_id, count(*) AS n, min(o.placed_time) AS first, max(o.placed_time) AS last
        FROM audience_orders o JOIN ids USING (customer_id) WHERE o.state <> 'cancelled' GROUP BY 1),
i AS (SELECT i.customer_id,
             sum(CASE WHEN i.kind = 'credit_note' THEN -i.total ELSE i.paid_total END) AS revenue,
             max(i.paid_time) AS last_paid
        FROM audience_invoices i JOIN ids USING (customer_id) WHERE i.state <> 'cancelled' GROUP BY 1),
p AS (SELECT p.customer_id, count(*) FILTER (WHERE p.state = 'open') AS open,
             count(*) FILTER (WHERE p.state = 'won') AS won, max(p.event_time) AS last
        FROM audience_opportunities p JOIN ids USING (customer_id) GROUP BY 1),
t AS (SELECT t.customer_id, count(*) AS n, count(*) FILTER (WHERE t.complaint) AS complaints,
             max(t.open_time) AS last, max(t.open_time) FILTER (WHERE t.complaint) AS last_complaint
        FROM audience_tickets t JOIN ids USING (customer_id) GROUP BY 1)
UPDATE audience a SET
  order_count = coalesce(o.n, 0),
  first_purchase_time = o.first,
  last_purchase_time = o.last,
  revenue = coalesce(i.revenue, 0),
  open_opportunities = coalesce(p.open, 0),
  won_opportunities = coalesce(p.won, 0),
  ticket_count = coalesce(t.n, 0),
  complaint_count = coalesce(t.complaints, 0),
  last_ticket_time = t.last,
  last_complaint_time = t.last_complaint,
  last_activity_time = greatest(o.last, i.last_paid, p.last, t.last),
  behaviour_time = now()
FROM ids
LEFT JOIN o USING (customer_id) LEFT JOIN i USING (customer_id)
LEFT JOIN p USING (customer_id) LEFT JOIN t USING (customer_id)
WHERE a.customer_id = ids.customer_id
"""
)


def recompute(conn: sa.Connection, customer_ids) -> None:
    """The behaviour columns of these customers from their facts (one statement). A customer
    with no audience row yet (its customer event is still on the way) gets them when it comes:
    the customer handler recomputes too."""
    ids = sorted({str(i) for i in customer_ids if i})
    if ids:
        conn.execute(_RECOMPUTE, {"ids": ids})


def rebuild_behaviour(conn: sa.Connection) -> int:
    """Every customer's behaviour recomputed (set-based); returns the number of customers."""
    ids = list(conn.execute(sa.select(audience.c.customer_id)).scalars())
    recompute(conn, ids)
    return len(ids)


_FACTS = "audience.facts"  # conn.info: the facts of a batch being gathered (Handlers.batch)


def _upsert_fact(conn: sa.Connection, table: sa.Table, key: str, row: dict, guard: str) -> bool:
    """Insert or update one fact unless the stored one is newer (by `guard`); True if written.
    Inside a batch the fact is gathered (the newest per key) and written by `_write_facts`."""
    gathered = conn.info.get(_FACTS)
    if gathered is not None:
        group = gathered.setdefault((table.name, key, guard, tuple(row)), (table, {}))[1]  # a shape: one code path
        had = group.get(row[key])
        if had is None or had[guard] <= row[guard]:
            group[row[key]] = row
        return True
    stmt = pg_insert(table).values(**row)
    done = conn.execute(
        stmt.on_conflict_do_update(
            index_elements=[key],
            set_={c: stmt.excluded[c] for c in row if c != key},
            where=table.c[guard] <= stmt.excluded[guard],
        ).returning(table.c[key])
    ).first()
    return done is not None


_UPSERTS: dict[tuple, sa.TextClause] = {}


def _upsert_many(table: sa.Table, key: str, guard: str, cols: tuple[str, ...]) -> sa.TextClause:
    """One text statement per table and shape (compiled once, whatever the number of rows):
    the rows as one jsonb parameter (crm_chassis.jsonrows), upserted with the guard."""
    k = (table.name, key, guard, cols)
    if k not in _UPSERTS:
        _UPSERTS[k] = sa.text(
            f"""INSERT INTO {table.name} ({", ".join(cols)}) {jsonrows.select_rows(table.name, cols)}
                ON CONFLICT ({key}) DO UPDATE SET {", ".join(f"{c} = EXCLUDED.{c}" for c in cols if c != key)}
                WHERE {table.name}.{guard} <= EXCLUDED.{guard}"""
        )
    return _UPSERTS[k]


def _write_facts(conn: sa.Connection, gathered: dict) -> None:
    """The gathered facts: one upsert per table and shape (the rows as one jsonb parameter:
    no multi-row VALUES compiled per batch), each guarded as one by one, in key order (the
    rows it locks: competing consumers' batches of the same facts lock them in one order)."""
    for (_, key, guard, cols), (table, rows) in gathered.items():
        ordered = (rows[k] for k in sorted(rows))
        conn.execute(_upsert_many(table, key, guard, cols), {"rows": jsonrows.dumps(ordered)})


class Handlers:
    def __init__(self, rt: Campaign):
        self.rt = rt
        self._deferred: dict[str, set[str]] | None = None  # cause -> ids, while a batch runs

    def _changed(self, conn, ids, cause: str) -> None:
        if self._deferred is not None:
            self._deferred.setdefault(cause, set()).update(ids)
            return
        recompute(conn, ids)
        self.rt.audience_changed(conn, ids, cause)

    def batch(self, single):
        """A batch handler of the consumer: each event's facts gathered as `single` makes them and
        written in one upsert per table (the newest per key, as one by one), then the behaviour
        of all their customers recomputed in one statement and the audience hook (segments)
        called once with all of them."""

        def handle(conn, events) -> None:
            self._deferred = {}
            conn.info[_FACTS] = {}
            try:
                for e in events:
                    single(conn, e)
                deferred, gathered = self._deferred, conn.info[_FACTS]
            finally:
                self._deferred = None
                conn.info.pop(_FACTS, None)
            _write_facts(conn, gathered)  # before the recompute (and the next part) reads them
            for cause, ids in deferred.items():
                self._changed(conn, sorted(ids), cause)

        return handle

    # customers
    def on_customer(self, conn: sa.Connection, event: Event) -> None:
        c = refs.customer_of(event)
        refs.apply_customers(conn, audience, [c])
        self._changed(conn, [_id(c.name)], "customer")

    def on_merged(self, conn: sa.Connection, event: Event) -> None:
        survivor, merged = refs.mark_merged(conn, audience, event)
        for table in customer_tables():
            if merged and table.info.get("merge") != "own":
                q = table.update().where(table.c.customer_id.in_(merged))
                # a key with customer_id (one message per campaign run): the survivor's own row wins
                if key := table.info.get("merge_unique"):
                    o = table.alias("o")
                    q = q.where(~sa.exists().where(o.c.customer_id == survivor, *[o.c[k] == table.c[k] for k in key]))
                conn.execute(q.values(customer_id=survivor))
        self._changed(conn, [survivor, *merged], "merge")

    def on_unmerged(self, conn: sa.Connection, event: Event) -> None:
        refs.unmerged(conn, audience, event)
        msg = event.parse(ce.CustomerUnmerged)
        self._changed(conn, [_id(msg.survivor.name), *(_id(c.name) for c in msg.restored)], "customer")

    def on_erased(self, conn: sa.Connection, event: Event) -> None:
        known = conn.execute(
            sa.select(audience.c.email, audience.c.mobile, audience.c.phone).where(
                audience.c.customer_id == _id(event.parse(ce.CustomerErased).customer.name)
            )
        ).first()  # the addresses, read before the row is blanked
        cid = refs.erased(conn, audience, event)
        conn.execute(  # nothing more goes to them (the address is about to be blanked)
            messages.update()
            .where(messages.c.customer_id == cid, messages.c.state.in_(("queued", "held")))
            .values(state="cancelled", error="the customer was erased")
        )
        erase_personal(
            conn, cid, emails=[known.email] if known else [], phones=[known.mobile, known.phone] if known else []
        )
        self._changed(conn, [cid], "erasure")

    # sales
    def on_order(self, conn: sa.Connection, event: Event) -> None:
        e = event.parse(se.OrderEvent)
        cid = _id(e.customer)
        when = _time(e.event_time) or event.time
        row = {
            "order_id": _id(e.order),
            "customer_id": cid,
            "state": e.state or ("cancelled" if event.routing_key == "order.cancelled.v1" else "open"),
            "total": _amount(e.total),
            "currency": e.total.currency_code,
            "order_date": _date(e.order_date),
            "campaign_id": e.campaign_id,
            "source": e.source,
            "products": _products(e.lines),
            "event_time": when,
        }
        stmt = pg_insert(audience_orders).values(**row, placed_time=when)
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["order_id"],
                set_={c: stmt.excluded[c] for c in row if c != "order_id"},  # placed_time stays the first
                where=audience_orders.c.event_time <= stmt.excluded.event_time,
            )
        )
        self._changed(conn, [cid], "sales")

    def on_invoice(self, conn: sa.Connection, event: Event) -> None:
        e = event.parse(se.InvoiceEvent)
        cid = _id(e.customer)
        when = _time(e.event_time) or event.time
        row = {
            "invoice_id": _id(e.invoice),
            "customer_id": cid,
            "kind": e.kind or "invoice",
            "state": e.state,
            "order_id": _id(e.order),
            "credited_invoice": _id(e.credited_invoice),
            "total": _amount(e.total),
            "paid_total": _amount(e.paid_total),
            "currency": e.total.currency_code,
            "issue_date": _date(e.issue_date),
            "campaign_id": e.campaign_id,
            "source": e.source,
            "products": _products(e.lines),
            "event_time": when,
        }
        if event.routing_key == "invoice.paid.v1":
            row["paid_time"] = when
        _upsert_fact(conn, audience_invoices, "invoice_id", row, "event_time")
        self._changed(conn, [cid], "sales")

    def on_opportunity(self, conn: sa.Connection, event: Event) -> None:
        e = event.parse(se.OpportunityEvent)
        cid = _id(e.customer)
        if not cid:
            return
        row = {
            "opportunity_id": _id(e.opportunity),
            "customer_id": cid,
            "state": e.state or "open",
            "version": e.version,
            "event_time": _time(e.event_time) or event.time,
        }
        _upsert_fact(conn, audience_opportunities, "opportunity_id", row, "version")
        self._changed(conn, [cid], "sales")

    # support
    def on_ticket(self, conn: sa.Connection, event: Event) -> None:
        e = event.parse(te.TicketEvent)
        cid = _id(e.customer)
        if not cid:
            return
        state = ticket_pb2.Ticket.State.Name(e.state).removeprefix("STATE_").lower() if e.state else ""
        row = {
            "ticket_id": _id(e.ticket),
            "customer_id": cid,
            "complaint": e.complaint,
            "state": state,
            "open_time": _time(e.create_time) or event.time,
            "version": e.version,
            "event_time": _time(e.event_time) or event.time,
        }
        _upsert_fact(conn, audience_tickets, "ticket_id", row, "version")
        self._changed(conn, [cid], "support")


def erase_personal(conn: sa.Connection, customer_id: str, emails=(), phones=()) -> None:
    """Blank the personal columns (a table's info["personal"]) of every row of the customer in
    the parts' tables: a message's address, a consent entry's address and proof, ... Rows of no
    customer that carry one of the customer's `emails` or `phones` (an unsubscribe link, an SMS
    stop, a form: recorded by address only) are theirs too. A row whose key holds a personal
    column (consent_state's address) is deleted: blanked, two of them would share a key."""
    emails = sorted({e for e in emails if e})
    phones = sorted({p for p in phones if p})
    chats = consent.chat_ids(conn, customer_id)  # their bot chat ids, before the entries naming them go
    for table in customer_tables():
        personal = table.info.get("personal", ())
        if not personal:
            continue
        by_address = []
        if "channel" in table.c and "address" in table.c:
            by_address += [
                sa.and_(table.c.channel == "email", table.c.address.in_(emails)),
                sa.and_(table.c.channel == "sms", table.c.address.in_(phones)),
            ]
        if "email" in table.c:
            by_address.append(table.c.email.in_(emails))
        if "phone" in table.c:
            by_address.append(table.c.phone.in_(phones))
        where = table.c.customer_id == customer_id
        if by_address and (emails or phones):
            where = sa.or_(where, sa.and_(table.c.customer_id == "", sa.or_(*by_address)))
        if any(table.c[c].primary_key for c in personal):
            conn.execute(table.delete().where(where))
            continue
        blank = {}
        for c in personal:
            col = table.c[c]
            blank[c] = None if col.nullable else ({} if isinstance(col.type, sa.JSON) else "")
        conn.execute(table.update().where(where).values(**blank))
    consent.hash_suppressions(conn, emails, phones, chats)  # still never sent to, kept as hashes only


def subscriptions(rt: Campaign) -> list[Subscription]:
    h = Handlers(rt)
    customer = dict.fromkeys(refs.CUSTOMER_EVENTS, h.on_customer)
    customer.update(
        {"customer.merged.v1": h.on_merged, "customer.erased.v1": h.on_erased, "customer.unmerged.v1": h.on_unmerged}
    )
    sales = {
        **dict.fromkeys(ORDER_EVENTS, h.on_order),
        **dict.fromkeys(INVOICE_EVENTS, h.on_invoice),
        **dict.fromkeys(OPPORTUNITY_EVENTS, h.on_opportunity),
    }
    sales_requires = {
        **{k: Requires(se.OrderEvent, ("order", "customer")) for k in ORDER_EVENTS},
        **{k: Requires(se.InvoiceEvent, ("invoice", "customer")) for k in INVOICE_EVENTS},
        **{k: Requires(se.OpportunityEvent, ("opportunity",)) for k in OPPORTUNITY_EVENTS},
    }
    support = dict.fromkeys(TICKET_EVENTS, h.on_ticket)
    return [
        Subscription(domain="customer", handlers=customer, requires=refs.requires()),
        Subscription(
            domain="sales", handlers=sales, requires=sales_requires, batch={k: h.batch(f) for k, f in sales.items()}
        ),
        Subscription(
            domain="support",
            handlers=support,
            requires={k: Requires(te.TicketEvent, ("ticket",)) for k in TICKET_EVENTS},
            batch={k: h.batch(f) for k, f in support.items()},
        ),
    ]
