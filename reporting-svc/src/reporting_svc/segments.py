"""Report 2's projection, sales by segment: customer demographics (customer-svc's events), order
lines (sales-svc's order events) and the time from lead to first purchase (sales-svc's lead
events), into the rollups sales_daily, sales_buyers_daily and lead_purchase_daily.

Decisions (docs/reports.md, "Sales by segment"):

- Revenue is the orders placed and not cancelled, their lines' net amounts (after discount,
  before tax) on the order's date. Not paid invoices: the question is who buys what, and the
  order is the purchase with its products and quantities; invoices are billing and cash (partial,
  later, with credit notes), which report 6 (customer value) reads.
- A customer's values are the newest record's (a customer.updated that changes the city moves
  their past sales with them: most such changes are corrections and fill-ins, and the answer then
  depends only on the newest state, whatever order events arrive in); the age is the age on the
  order's day, from the newest birth date.
- Events arrive out of order across exchanges: an order whose customer is not known yet counts
  under "unknown" and moves when the customer arrives. Every write for a customer first locks its
  customer_demo_facts row (a placeholder with version 0 if none), so two replicas cannot count an
  order under stale values.
- customer.merged.v1: the merged customers' orders and first lead go to the survivor, with its
  values (sales-svc re-points its records without events); later events naming a merged
  customer count under the survivor. An unmerge leaves what was moved (as sales-svc does).
- An erased customer keeps the aggregates only: its orders' and lead row's personal values
  (age band, gender) are cleared and they are frozen (later events about them change nothing);
  orders first seen after the erasure count without age and gender.

The rollups keep, for every fact, exactly what it adds (the fact row stores the values it was
counted under), and each change adds the difference between new and old contributions.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from decimal import Decimal

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from crm.customer.v1 import customer_events_pb2, customer_pb2
from crm.sales.v1 import sales_events_pb2 as ev
from crm_chassis import money
from crm_chassis.messaging.consumer import Requires
from crm_chassis.messaging.envelope import Event

from .projection import (
    Projection,
    Rollup,
    execute_rows,
    fact_insert,
    fact_update,
    in_rowset,
    rollup_upsert,
    rowset,
    tehran_day,
)
from .projections import REQUIRES as CUSTOMER_REQUIRES
from .sales import LEAD_KEYS
from .sales_tables import (
    CUSTOMER_DIMS,
    PRODUCT_DIMS,
    SALES_MEASURES,
    customer_demo_facts,
    lead_purchase_daily,
    lead_purchase_facts,
    sales_buyers_daily,
    sales_customer_aliases,
    sales_daily,
    sales_order_facts,
)

UNKNOWN = "unknown"
GRAINS = ("order", "line", "product")
AGE_BANDS = ((0, 17), (18, 24), (25, 34), (35, 44), (45, 54), (55, 64), (65, None))
GENDERS = {
    customer_pb2.GENDER_FEMALE: "female",
    customer_pb2.GENDER_MALE: "male",
    customer_pb2.GENDER_OTHER: "other",
}
TYPES = {customer_pb2.CUSTOMER_TYPE_PERSON: "person", customer_pb2.CUSTOMER_TYPE_ORGANIZATION: "organization"}
KINDS = {
    customer_pb2.CUSTOMER_KIND_END_CONSUMER: "end_consumer",
    customer_pb2.CUSTOMER_KIND_INTERMEDIARY: "intermediary",
    customer_pb2.CUSTOMER_KIND_INTERNAL: "internal",
}
ORDER_KEYS = ["order.placed.v1", "order.delivered.v1", "order.cancelled.v1"]

SALES_KEYS = ("day", "grain", *CUSTOMER_DIMS, *PRODUCT_DIMS, "currency")
SALES = Rollup(sales_daily, SALES_KEYS, SALES_MEASURES)
BUYERS = Rollup(sales_buyers_daily, (*SALES_KEYS[:2], "customer_id", *SALES_KEYS[2:]), ("orders",))
LEAD_PURCHASE = Rollup(lead_purchase_daily, ("day", *CUSTOMER_DIMS, "days"), ("customers",))


def age_band(birth: dt.date | None, on: dt.date) -> str:
    """The band of the age in whole years on a day ("unknown" without a birth date)."""
    if birth is None or birth > on:
        return UNKNOWN
    age = on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))
    for lo, hi in AGE_BANDS:
        if hi is None or age <= hi:
            return f"{lo}+" if hi is None else f"{lo}-{hi}"
    return UNKNOWN  # pragma: no cover


def _m(row):
    return row._mapping if hasattr(row, "_mapping") else row


def resolve(demo, day: dt.date) -> dict:
    """The customer's values a purchase on `day` counts under."""
    d = _m(demo)
    return {
        "age_band": age_band(d["birth_date"], day) if d["customer_type"] == "person" else UNKNOWN,
        "gender": d["gender"],
        "province": d["province"],
        "city": d["city"],
        "customer_type": d["customer_type"],
        "customer_kind": d["customer_kind"],
    }


# -- customers -------------------------------------------------------------------------------

_PLACEHOLDER = {"version": 0, "birth_date": None, "gender": UNKNOWN, "province": UNKNOWN, "city": UNKNOWN,
                "customer_type": UNKNOWN, "customer_kind": UNKNOWN, "erased": False}  # fmt: skip


def _ids(conn: sa.Connection, stmt, key: str, ids) -> sa.CursorResult:
    """Run a statement WHERE key IN the row set (projection.in_rowset) for these ids."""
    return execute_rows(conn, stmt, [{key: i} for i in ids])


def _lock_in(table: sa.Table, key: str) -> sa.Select:
    """SELECT ... WHERE key IN the row set ORDER BY key FOR UPDATE (rows locked in key order;
    run by _ids)."""
    return sa.select(table).where(in_rowset(table, (key,))).order_by(table.c[key]).with_for_update()


_DEMO_LOCK = _lock_in(customer_demo_facts, "customer_id")


def _placeholders():
    """INSERT the row set's customers (placeholders, in id order) ON CONFLICT DO NOTHING
    RETURNING them: the rows it made, locked; one that another replica is inserting waits for
    it and is not returned."""
    t = customer_demo_facts
    cols = ("customer_id", *_PLACEHOLDER)
    v = rowset(t, cols)
    return (
        pg.insert(t)
        .from_select(list(cols), sa.select(*(v.c[c] for c in cols)))
        .on_conflict_do_nothing(index_elements=["customer_id"])
        .returning(*t.c)
    )


def lock_customers(conn: sa.Connection, cids) -> dict[str, dict]:
    """The customers' demographics rows, locked for the transaction (in id order), made as
    placeholders for those not known yet: every change about a customer goes through this lock."""
    ids = sorted(set(cids))
    if not ids:
        return {}
    found = {r.customer_id: dict(r._mapping) for r in _ids(conn, _DEMO_LOCK, "customer_id", ids)}
    missing = [c for c in ids if c not in found]
    if missing:
        made = execute_rows(conn, _PLACEHOLDERS, [{"customer_id": c, **_PLACEHOLDER} for c in missing])
        found.update({r.customer_id: dict(r._mapping) for r in made})
        if late := [c for c in missing if c not in found]:  # another replica inserted it meanwhile
            found.update({r.customer_id: dict(r._mapping) for r in _ids(conn, _DEMO_LOCK, "customer_id", late)})
    return found


def lock_customer(conn: sa.Connection, cid: str) -> dict:
    return lock_customers(conn, [cid])[cid]


def _demo_values(c: customer_pb2.Customer, erased: bool) -> dict:
    birth = None
    if c.HasField("birth_date") and c.birth_date.year:
        try:
            birth = dt.date(c.birth_date.year, c.birth_date.month or 1, c.birth_date.day or 1)
        except ValueError:
            birth = None
    return {
        "version": int(c.etag.strip('"') or 0),
        "birth_date": None if erased else birth,
        "gender": UNKNOWN if erased else GENDERS.get(c.gender, UNKNOWN),
        "province": c.province.strip() or UNKNOWN,
        "city": c.city.strip() or UNKNOWN,
        "customer_type": TYPES.get(c.type, UNKNOWN),
        "customer_kind": KINDS.get(c.kind, UNKNOWN),
        "erased": erased,
    }


def apply_customer(conn: sa.Connection, c: customer_pb2.Customer, erase: bool = False) -> None:
    cid = c.name.removeprefix("customers/")
    demo = lock_customer(conn, cid)
    new = _demo_values(c, erase or c.erased or demo["erased"])  # erased stays erased
    if new["version"] <= demo["version"]:
        return  # an older or the same version: the newest state is kept
    t = customer_demo_facts
    conn.execute(t.update().where(t.c.customer_id == cid).values(**new))
    if new["erased"] and not demo["erased"]:
        _freeze(conn, cid)
    else:
        reattribute(conn, cid, {**demo, **new})


def _freeze(conn: sa.Connection, cid: str) -> None:
    """Erasure: the rollups keep what the customer's facts added; the facts lose the personal
    values and stop changing."""
    personal = {"age_band": None, "gender": None, "frozen": True}
    for t in (sales_order_facts, lead_purchase_facts):
        conn.execute(t.update().where(t.c.customer_id == cid, t.c.frozen.is_(False)).values(**personal))


CUSTOMER_EVENTS = {  # routing key: (message, an erasure)
    "customer.created.v1": (customer_events_pb2.CustomerCreated, False),
    "customer.updated.v1": (customer_events_pb2.CustomerUpdated, False),
    "customer.deleted.v1": (customer_events_pb2.CustomerDeleted, False),
    "customer.undeleted.v1": (customer_events_pb2.CustomerDeleted, False),
    "customer.erased.v1": (customer_events_pb2.CustomerErased, True),
}
DEMO_COLUMNS = tuple(_PLACEHOLDER)
_PLACEHOLDERS = _placeholders()
_DEMO_UPDATE = fact_update(customer_demo_facts, ("customer_id",), ("customer_id", *DEMO_COLUMNS))


def on_customer(key: str):
    cls, erase = CUSTOMER_EVENTS[key]

    def handle(conn: sa.Connection, event: Event) -> None:
        apply_customer(conn, event.parse(cls).customer, erase)

    if erase:  # its effect depends on what came before it: it runs on its own, after those
        handle.after = ORDERED
    else:
        handle.many = apply_customers  # customer events of a batch, set-based (projection.apply_events)
    return handle


def apply_customers(conn: sa.Connection, events: list[Event]) -> None:
    """apply_customer for a run of events, set-based: the newest version of each customer, one
    locking SELECT (and an INSERT of placeholders for the new ones), one UPDATE, one move of the
    changed customers' orders and lead rows. Erasures, and customers erased before, go one by
    one in order. The same result as one by one."""
    parsed = []
    for e in events:
        cls, erase = CUSTOMER_EVENTS[e.routing_key]
        c = e.parse(cls).customer
        parsed.append((c.name.removeprefix("customers/"), c, erase))
    stored = lock_customers(conn, [cid for cid, _, _ in parsed])
    erasing = {cid for cid, c, erase in parsed if erase or c.erased} | {c for c, r in stored.items() if r["erased"]}
    newest: dict[str, dict] = {}
    for cid, c, _ in parsed:
        v = _demo_values(c, False)
        if cid not in erasing and (cid not in newest or v["version"] > newest[cid]["version"]):
            newest[cid] = v
    updates = {cid: v for cid, v in newest.items() if v["version"] > stored[cid]["version"]}
    if updates:
        execute_rows(conn, _DEMO_UPDATE, [{"customer_id": cid, **v} for cid, v in updates.items()])
        demos = {cid: {**stored[cid], **v} for cid, v in updates.items()}
        _move_orders(conn, sorted(demos), demos)
        refresh_leads(conn, demos, {})
    for cid, c, erase in parsed:
        if cid in erasing:
            apply_customer(conn, c, erase)


# -- orders ----------------------------------------------------------------------------------


def order_contributions(o) -> tuple[list, list]:
    """(sales_daily, sales_buyers_daily) contributions of an order fact as it is stored."""
    m = _m(o)
    if not m["counts"] or m["age_band"] is None:
        return [], []
    dims = {d: m[d] for d in CUSTOMER_DIMS}
    groups: dict[tuple, list] = defaultdict(lambda: [Decimal(0), Decimal(0)])
    currencies = set()
    for product, line, qty, amount, currency in m["lines"]:
        currencies.add(currency)
        for grain, p, pl in (("order", "", ""), ("line", "", line), ("product", product, line)):
            acc = groups[(grain, p, pl, currency)]
            acc[0] += Decimal(qty)
            acc[1] += Decimal(amount)
    sales, buyers = [], []
    for (grain, p, pl, currency), (qty, amount) in groups.items():
        key = {"day": m["day"], "grain": grain, **dims, "product": p, "product_line": pl, "currency": currency}
        sales.append((key, {"orders": 1, "quantity": qty, "revenue": amount}))
        buyers.append(({**key, "customer_id": m["customer_id"]}, {"orders": 1}))
    return sales, buyers


def _apply_order_rollups(conn: sa.Connection, old: list, new: list) -> None:
    before = [order_contributions(o) for o in old]
    after = [order_contributions(o) for o in new]
    rollup_upsert(conn, SALES, [c for b in before for c in b[0]], [c for a in after for c in a[0]])
    rollup_upsert(conn, BUYERS, [c for b in before for c in b[1]], [c for a in after for c in a[1]])


def _lines(o: ev.OrderEvent) -> list:
    out = []
    for line in o.lines:
        currency = line.amount.currency_code or o.total.currency_code or "IRR"
        amount = money.to_decimal(line.amount, "lines.amount") if line.amount.currency_code else Decimal(0)
        qty = Decimal(line.quantity or "0")
        out.append([line.product, line.product_line, str(qty), str(money.rials(amount, currency)),
                    "IRR" if currency == "IRT" else currency])  # fmt: skip
    if not out:  # an order without lines still counts as an order
        currency = o.total.currency_code or "IRR"
        out.append(["", "", "0", "0", "IRR" if currency == "IRT" else currency])
    return out


_ORDERS_LOCK = _lock_in(sales_order_facts, "order_id")
_ORDER_COLUMNS = ("order_id", "version", "customer_id", "day", "counts", "lines", *CUSTOMER_DIMS)
_ORDER_INSERT = fact_insert(sales_order_facts, (*_ORDER_COLUMNS, "frozen"))
_ORDER_UPDATE = fact_update(sales_order_facts, ("order_id",), _ORDER_COLUMNS)
_ORDER_MOVE = fact_update(sales_order_facts, ("order_id",), ("order_id", "customer_id", *CUSTOMER_DIMS))
_ORDERS_OF = (
    sa.select(sales_order_facts)
    .where(in_rowset(sales_order_facts, ("customer_id",)), sales_order_facts.c.frozen.is_(False))
    .order_by(sales_order_facts.c.order_id)
    .with_for_update()
)


def _order_values(o: ev.OrderEvent, event: Event) -> dict:
    version = o.event_time.ToDatetime(tzinfo=dt.UTC) if o.HasField("event_time") else event.time
    if o.order_date.year:
        day = dt.date(o.order_date.year, o.order_date.month, o.order_date.day)
    else:  # no order date: the Tehran day of the event
        day = tehran_day(version)
    return {"version": version, "day": day, "counts": o.state != "cancelled", "lines": _lines(o)}


def apply_sales(conn: sa.Connection, events: list[Event]) -> None:
    """Order and lead events (one, or a batch's), set-based: the newest version of
    each order, the first lead per customer; the customers locked first (in id order), then the
    orders; one INSERT and one UPDATE of order facts, the rollups' differences in a few
    statements, and the lead-to-purchase rows of the customers touched. The same result as one
    by one, whatever order they came in."""
    orders: dict[str, tuple] = {}
    leads: dict[str, dt.datetime] = {}
    for e in events:
        if e.routing_key in ORDER_KEYS:
            o = e.parse(ev.OrderEvent)
            oid, v = o.order.removeprefix("orders/"), _order_values(o, e)
            if oid not in orders or v["version"] > orders[oid][1]["version"]:
                orders[oid] = (o.customer.removeprefix("customers/"), v)
        else:
            lead = e.parse(ev.LeadEvent)
            if lead.customer:  # else not linked to a customer (yet)
                cid, t = lead.customer.removeprefix("customers/"), lead.create_time.ToDatetime(tzinfo=dt.UTC)
                leads[cid] = min(leads.get(cid, t), t)
    alias = current_ids(conn, {c for c, _ in orders.values()} | set(leads))
    leads = _min_by(((alias[c], t) for c, t in leads.items()))
    demos = lock_customers(conn, [alias[c] for c, _ in orders.values()] + list(leads))
    old = {r.order_id: r for r in _ids(conn, _ORDERS_LOCK, "order_id", sorted(orders))} if orders else {}
    if moved := {r.customer_id for r in old.values()} - set(demos):  # an order re-pointed: rare
        demos.update(lock_customers(conn, moved))
    inserts, updates, before, after = [], [], [], []
    touched = set(leads)
    for oid, (cid, v) in orders.items():
        cid, o = alias[cid], old.get(oid)
        if o is not None and (o.version >= v["version"] or o.frozen):
            continue
        values = {**v, "customer_id": cid, **resolve(demos[cid], v["day"])}
        row = {c: values[c] for c in _ORDER_COLUMNS[1:]}
        if o is None:
            inserts.append({"order_id": oid, **row, "frozen": False})
        else:
            updates.append({"order_id": oid, **row})
            before.append(o)
            touched.add(o.customer_id)
        after.append(values)
        touched.add(cid)
    if inserts:
        execute_rows(conn, _ORDER_INSERT, inserts)
    if updates:
        execute_rows(conn, _ORDER_UPDATE, updates)
    _apply_order_rollups(conn, before, after)
    refresh_leads(conn, {c: demos[c] for c in touched}, leads)


def _min_by(pairs) -> dict:
    out: dict = {}
    for k, t in pairs:
        out[k] = min(out.get(k, t), t)
    return out


def on_sales(conn: sa.Connection, event: Event) -> None:
    apply_sales(conn, [event])


on_sales.many = apply_sales  # the order and lead events of a batch, set-based (projection.apply_events)


def reattribute(conn: sa.Connection, cid: str, demo: dict) -> None:
    """The customer's values changed: move its orders (and its lead-to-purchase row)."""
    _move_orders(conn, [cid], {cid: demo})
    refresh_lead_purchase(conn, cid, demo)


def _move_orders(conn: sa.Connection, owners: list[str], demos: dict[str, dict], survivor: str | None = None) -> None:
    """The orders of `owners` (not frozen) count under their customer (or `survivor`) with its
    values in `demos`: their facts and the rollups move by the difference."""
    rows = _ids(conn, _ORDERS_OF, "customer_id", owners).all()
    old, new = [], []
    for r in rows:
        cid = survivor or r.customer_id
        values = {"customer_id": cid, **resolve(demos[cid], r.day)}
        if any(r._mapping[k] != v for k, v in values.items()):
            old.append(r)
            new.append({**r._mapping, **values})
    if new:
        execute_rows(conn, _ORDER_MOVE, [{c: n[c] for c in ("order_id", "customer_id", *CUSTOMER_DIMS)} for n in new])
        _apply_order_rollups(conn, old, new)


_ALIASES = sa.select(sales_customer_aliases.c.merged_id, sales_customer_aliases.c.survivor_id).where(
    in_rowset(sales_customer_aliases, ("merged_id",))
)


def current_ids(conn: sa.Connection, cids) -> dict[str, str]:
    """The customer an event naming each of `cids` counts under: the survivor of a merge, or itself."""
    ids = sorted(set(cids))
    found = dict(_ids(conn, _ALIASES, "merged_id", ids).all()) if ids else {}
    return {c: found.get(c, c) for c in ids}


def on_customer_merged(conn: sa.Connection, event: Event) -> None:
    """The merged customers' orders and their first lead go to the survivor (sales-svc re-points
    its records without events), counted with the survivor's values; later events naming a
    merged customer count under the survivor (sales_customer_aliases)."""
    msg = event.parse(customer_events_pb2.CustomerMerged)
    apply_customer(conn, msg.survivor)
    survivor = msg.survivor.name.removeprefix("customers/")
    merged = sorted({n.removeprefix("customers/") for n in msg.merged} - {survivor})
    if not merged:
        return
    demo = lock_customers(conn, [survivor, *merged])[survivor]
    a = sales_customer_aliases
    conn.execute(a.update().where(a.c.survivor_id.in_(merged)).values(survivor_id=survivor))  # chains
    known = set(conn.execute(sa.select(a.c.merged_id).where(a.c.merged_id.in_(merged))).scalars())
    if known:
        conn.execute(a.update().where(a.c.merged_id.in_(known)).values(survivor_id=survivor))
    if fresh := [c for c in merged if c not in known]:
        conn.execute(a.insert(), [{"merged_id": c, "survivor_id": survivor} for c in fresh])
    _move_orders(conn, merged, {survivor: demo}, survivor)
    lp = lead_purchase_facts
    gone = conn.execute(lp.delete().where(lp.c.customer_id.in_(merged), lp.c.frozen.is_(False)).returning(*lp.c)).all()
    rollup_upsert(conn, LEAD_PURCHASE, [c for r in gone for c in _lp_contrib(r)], [])
    firsts = [r.first_lead_time for r in gone if r.first_lead_time is not None]
    refresh_lead_purchase(conn, survivor, demo, min(firsts) if firsts else None)


def on_customer_unmerged(conn: sa.Connection, event: Event) -> None:
    """The restored customers are themselves again for later events; what the merge moved stays
    with the survivor (as in sales-svc, which does not know which record named whom before)."""
    msg = event.parse(customer_events_pb2.CustomerUnmerged)
    restored = [c.name.removeprefix("customers/") for c in msg.restored]
    a = sales_customer_aliases
    conn.execute(a.delete().where(a.c.merged_id.in_(restored)))
    for c in [msg.survivor, *msg.restored]:
        apply_customer(conn, c)


ORDERED = (apply_customers, apply_sales)  # the `many` runs an erasure, a merge, an unmerge must follow
on_customer_merged.after = on_customer_unmerged.after = ORDERED


# -- lead to purchase ------------------------------------------------------------------------

_FIRST_DAYS = (
    sa.select(sales_order_facts.c.customer_id, sa.func.min(sales_order_facts.c.day))
    .where(in_rowset(sales_order_facts, ("customer_id",)), sales_order_facts.c.counts)
    .group_by(sales_order_facts.c.customer_id)
)
_LP_LOCK = _lock_in(lead_purchase_facts, "customer_id")
_LP_COLUMNS = ("customer_id", "first_lead_time", "day", "days", *CUSTOMER_DIMS)
_LP_INSERT = fact_insert(lead_purchase_facts, _LP_COLUMNS)
_LP_UPDATE = fact_update(lead_purchase_facts, ("customer_id",), _LP_COLUMNS)


def _lp_contrib(row) -> list:
    m = _m(row)
    if m["day"] is None or m["age_band"] is None:
        return []
    return [({"day": m["day"], **{d: m[d] for d in CUSTOMER_DIMS}, "days": m["days"]}, {"customers": 1})]


def refresh_leads(conn: sa.Connection, demos: dict[str, dict], lead_times: dict[str, dt.datetime]) -> None:
    """Recompute the customers' time from their first lead to their first purchase (kept on
    lead_purchase_facts: a row only for customers that came as a lead; `lead_times` are leads
    just seen) and move the rollup. Customers locked by the caller."""
    ids = sorted(demos)
    if not ids:
        return
    rows = {r.customer_id: r for r in _ids(conn, _LP_LOCK, "customer_id", ids)}
    ids = [c for c in ids if (c in rows and not rows[c].frozen) or (c not in rows and c in lead_times)]
    if not ids:
        return
    first_days = dict(_ids(conn, _FIRST_DAYS, "customer_id", ids).all())
    inserts, updates, before, after = [], [], [], []
    for cid in ids:
        row = rows.get(cid)
        first_lead = min(t for t in (row.first_lead_time if row else None, lead_times.get(cid)) if t is not None)
        first_day = first_days.get(cid)
        new = {"first_lead_time": first_lead, "day": None, "days": None, **dict.fromkeys(CUSTOMER_DIMS)}
        if first_day is not None and first_day >= tehran_day(first_lead):
            new.update(day=first_day, days=(first_day - tehran_day(first_lead)).days, **resolve(demos[cid], first_day))
        if row is None:
            inserts.append({"customer_id": cid, **new})
        elif any(row._mapping[k] != v for k, v in new.items()):
            updates.append({"customer_id": cid, **new})
            before.append(row)
        else:
            continue
        after.append(new)
    if inserts:
        execute_rows(conn, _LP_INSERT, inserts)
    if updates:
        execute_rows(conn, _LP_UPDATE, updates)
    rollup_upsert(
        conn, LEAD_PURCHASE, [c for r in before for c in _lp_contrib(r)], [c for n in after for c in _lp_contrib(n)]
    )


def refresh_lead_purchase(conn: sa.Connection, cid: str, demo: dict, lead_time: dt.datetime | None = None) -> None:
    refresh_leads(conn, {cid: demo}, {cid: lead_time} if lead_time else {})


# -- the projections -------------------------------------------------------------------------

TABLES = [customer_demo_facts, sales_order_facts, sales_daily, sales_buyers_daily, lead_purchase_facts,
          lead_purchase_daily, sales_customer_aliases]  # fmt: skip

PROJECTIONS = [
    Projection(
        "segments-customer",
        "customer",
        {
            **{k: on_customer(k) for k in CUSTOMER_EVENTS},
            "customer.merged.v1": on_customer_merged,
            "customer.unmerged.v1": on_customer_unmerged,
        },
        {k: CUSTOMER_REQUIRES[k] for k in [*CUSTOMER_EVENTS, "customer.merged.v1", "customer.unmerged.v1"]},
        TABLES,
        tracks=False,
    ),
    Projection(
        "segments-sales",
        "sales",
        dict.fromkeys([*ORDER_KEYS, *LEAD_KEYS], on_sales),
        {
            **dict.fromkeys(ORDER_KEYS, Requires(ev.OrderEvent, ("order", "customer"))),
            **dict.fromkeys(LEAD_KEYS, Requires(ev.LeadEvent, ("lead", "create_time"))),
        },
        TABLES,
        tracks=False,
    ),
]


def subscriptions(rt=None):
    return [p.subscription() for p in PROJECTIONS]
