"""The loyalty club: earning from sales events, the points ledger, expiry and tiers.

Every movement of points is a row of `loyalty_movements` (loyalty_tables.py) written with the
member's balance in one transaction (a deferred trigger checks at commit that the balance is
the sum of the member's movements). Rows that add points (earn, a positive adjust) are lots
with `remaining` and `expire_time`; rows that take points (redeem, expire, a negative adjust,
reverse) take them from the lots soonest-expiring first and record which.

- invoice.paid.v1: in every active programme of the invoice's currency the customer (enrolled
  on the way) earns per the programme's rules; the unique (programme, event id, kind) and
  (programme, invoice) of earn rows make a redelivered or re-published event a no-op.
  `earn_batch` does it set-based for any number of events (one is a batch of one), ready for
  a consumer that applies deliveries in batches.
- invoice.credited.v1 (a credit note): each programme that earned on the credited invoice
  takes back points in proportion to the amount credited so far (cumulative, so partial
  credit notes add up to the whole earning and never more). Points already spent are not
  taken below zero: the movement takes what the balance has (the reversed invoice's own lot
  first, then soonest-expiring) and records the rest as `shortfall`.
- expiry: one durable timer per member with expiring lots (`loyalty.expire`, key the member
  id) at its soonest lot's expire_time: a lot arms it only if it expires sooner
  (timers.schedule_many keep_earlier: no write otherwise, one row per member, not per lot); the
  batch handler expires the due lots of its members in one statement and arms each member's
  timer again at its next lot. A taking movement first expires the member's lots already due,
  so it never spends expired points.
- tiers: evaluated at every earning and reversal (the only movements that change the figure:
  points earned minus reversed, or spend, in the period); upgrades at once; downgrades per
  the rule: none, at the calendar period's end (`loyalty.period_end` timer per member in a
  tier, payload the period end) or after a grace (`loyalty.tier_grace`, started when the
  figure falls below the tier, cancelled when it is back; with a rolling window a
  `loyalty.tier_review` timer looks again when the window's oldest points leave it).
- customer.merged.v1: the merged customer's members join the survivor's (ledgers moved).

Events (PointsEvent, TierEvent) go through the outbox of the same transaction. Whatever locks
several member rows locks them in (programme, customer) order, so that earning, expiry and
merges running side by side (replicas) do not deadlock.
"""

from __future__ import annotations

import calendar
import datetime as dt
import zoneinfo
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_UP, Decimal, InvalidOperation

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from crm.campaign.v1 import campaign_events_pb2 as ev
from crm.customer.v1 import customer_events_pb2 as ce
from crm.sales.v1 import sales_events_pb2 as se
from crm_chassis import jsonrows, persian, timers
from crm_chassis.dates import set_timestamp
from crm_chassis.db import cacheable
from crm_chassis.messaging.consumer import Requires, Subscription
from crm_chassis.messaging.envelope import Event
from crm_chassis.money import NANO, to_money
from crm_chassis.resources import ResourceName

from .loyalty_tables import loyalty_members, loyalty_movements, loyalty_programs
from .runtime import Campaign

TEHRAN = zoneinfo.ZoneInfo("Asia/Tehran")
CENT = Decimal("0.01")
PROGRAM = ResourceName("programs/{program_id}")
MEMBER = ResourceName("programs/{program_id}/members/{customer_id}")
MOVEMENT = ResourceName(
    "programs/{program_id}/members/{customer_id}/movements/{movement_id}", movement_id=r"[0-9]{1,19}"
)

EXPIRE = "loyalty.expire"  # key: the member id; due at its soonest-expiring live lot
GRACE = "loyalty.tier_grace"  # key: the member id
REVIEW = "loyalty.tier_review"  # key: the member id (rolling windows with a grace downgrade)
PERIOD_END = "loyalty.period_end"  # key: the member id; payload {"period_end": iso time}
KINDS = ("earn", "redeem", "expire", "adjust", "reverse")
WORD = {"earn": "earned", "redeem": "redeemed", "expire": "expired", "adjust": "adjusted", "reverse": "reversed"}
ROUTING = {k: f"points.{w}.v1" for k, w in WORD.items()}
SYSTEM = "system"

m = loyalty_members.c
mv = loyalty_movements.c


def _id(name: str) -> str:
    return name.rpartition("/")[2] if name else ""


def _amount(money) -> Decimal:
    return Decimal(money.units) + Decimal(money.nanos) * NANO


def _dec(text: str | None, default: str = "1") -> Decimal:
    try:
        return Decimal(text) if text not in (None, "") else Decimal(default)
    except InvalidOperation:
        return Decimal(default)


def _time(text: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(text) if text else None


def add_months(at: dt.datetime, months: int) -> dt.datetime:
    """The same wall-clock time `months` calendar months later (the 31st becomes the month's last day)."""
    y, mo = divmod(at.month - 1 + months, 12)
    year, month = at.year + y, mo + 1
    return at.replace(year=year, month=month, day=min(at.day, calendar.monthrange(year, month)[1]))


# -- programmes as the engine reads them -------------------------------------------------------
@dataclass(frozen=True)
class TierRule:
    key: str
    display_name: str
    threshold: Decimal  # points or spend
    multiplier: Decimal


class Rules:
    """A programme row read once for one movement: rates, rules, tiers, periods."""

    def __init__(self, row):
        self.row = row
        self.id = str(row.id)
        self.name = PROGRAM.format(self.id)
        self.currency = row.currency
        self.rate = Decimal(row.earn_points) / row.earn_amount if row.earn_amount > 0 else Decimal(0)
        self.rounding = {"nearest": ROUND_HALF_UP, "ceil": ROUND_CEILING}.get(row.rounding, ROUND_FLOOR)
        self.product_rules = list(row.product_rules or [])
        self.bonus = [
            (_time(b.get("start_time")), _time(b.get("end_time")), _dec(b.get("multiplier")))
            for b in row.bonus_periods or []
        ]
        spend = row.tier_basis == "spend"
        self.tier_basis = row.tier_basis
        self.tiers = sorted(
            (
                TierRule(
                    t["key"],
                    t.get("display_name", ""),
                    _dec(t.get("threshold_spend") if spend else str(t.get("threshold_points", 0)), "0"),
                    _dec(t.get("multiplier")),
                )
                for t in row.tiers or []
            ),
            key=lambda t: (t.threshold, t.key),
        )
        self.rank = {t.key: i + 1 for i, t in enumerate(self.tiers)}

    # earning
    def lifetime_end(self, at: dt.datetime) -> dt.datetime | None:
        n = self.row.lifetime_count
        if self.row.lifetime_unit == "days" and n > 0:
            return at + dt.timedelta(days=n)
        if self.row.lifetime_unit == "months" and n > 0:
            return add_months(at.astimezone(TEHRAN), n).astimezone(dt.UTC)
        return None

    def tier(self, key: str) -> TierRule | None:
        i = self.rank.get(key)
        return self.tiers[i - 1] if i else None

    def points(self, lines, net: Decimal, paid_at: dt.datetime, tier_key: str, share=Decimal(1)) -> tuple[int, dict]:
        """Points an invoice earns, and how: base per line (times its product rule's
        multiplier), times the bonus period's and the tier's multipliers, plus the per-unit
        extras; rounded by the programme's rule."""
        base = Decimal(0)
        extra = Decimal(0)
        ruled = []
        if lines:
            for line in lines:
                amount = _amount(line.amount)
                rule = self._rule(line.product, line.product_line)
                mult = _dec(rule.get("multiplier")) if rule else Decimal(1)
                base += amount * self.rate * mult
                if rule and rule.get("points_per_unit"):
                    extra += Decimal(int(rule["points_per_unit"])) * _dec(line.quantity, "0")
                if rule:
                    ruled.append(_id(line.product) or _id(line.product_line))
        else:
            base = net * self.rate
        bonus = max((x for start, end, x in self.bonus if start <= paid_at < end), default=Decimal(1))
        tier = self.tier(tier_key)
        tier_mult = tier.multiplier if tier else Decimal(1)
        raw = (base * bonus * tier_mult + extra) * share
        points = int(raw.quantize(Decimal(1), rounding=self.rounding)) if raw > 0 else 0
        details = {"base": str(base), "bonus": str(bonus), "tier_multiplier": str(tier_mult), "extra": str(extra)}
        if share != 1:
            details["paid_share"] = str(share)
        if ruled:
            details["product_rules"] = ruled
        return points, details

    def _rule(self, product: str, product_line: str) -> dict | None:
        for r in self.product_rules:  # a product's own rule before its line's
            if product and r.get("product") == product:
                return r
        for r in self.product_rules:
            if product_line and r.get("product_line") == product_line:
                return r
        return None

    # tiers
    def period(self, at: dt.datetime) -> tuple[dt.datetime | None, dt.datetime | None]:
        """[start, end) of the tier period containing `at` (None: open)."""
        kind = self.row.tier_period
        local = at.astimezone(TEHRAN)
        if kind == "gregorian_year":
            start = dt.datetime(local.year, 1, 1, tzinfo=TEHRAN)
            return start, start.replace(year=local.year + 1)
        if kind == "jalali_year":
            first, after = persian.jalali_year_bounds(persian.to_jalali(local.date()).year)
            return (
                dt.datetime.combine(first, dt.time(), TEHRAN),
                dt.datetime.combine(after, dt.time(), TEHRAN),
            )
        if kind == "rolling_days":
            return at - dt.timedelta(days=self.row.tier_period_days), None
        return None, None

    def tier_of(self, figure: Decimal) -> str:
        key = ""
        for t in self.tiers:
            if figure >= t.threshold:
                key = t.key
        return key


# The insert of a movement, compiled once (an ON CONFLICT statement is compiled on every
# execution otherwise: crm_chassis.db.cacheable).
_MOVE_COLUMNS = [c.name for c in loyalty_movements.c if c.name not in ("id", "record_time")]
_MOVE_DEFAULTS = {
    "amount": Decimal(0),
    "invoice_id": "",
    "credit_note_id": "",
    "reward_key": "",
    "reason": "",
    "actor": "",
    "source_event_id": None,
    "request_id": None,
    "remaining": 0,
    "expire_time": None,
    "lots": [],
    "shortfall": 0,
    "details": {},
}
_MOVE = cacheable(
    pg_insert(loyalty_movements)
    .values({c: sa.bindparam(c, type_=mv[c].type) for c in _MOVE_COLUMNS})
    .on_conflict_do_nothing()
    .returning(*loyalty_movements.c),
    *loyalty_movements.c,
)


# The statements of earn_batch: one text each whatever the batch size, so they are compiled
# once. Their lists go as ONE jsonb parameter each (`_json`: one C-speed json.dumps): as SQL
# arrays, psycopg dumped them element by element in Python (a regular expression per element,
# ~14 elements an event, 6% of a batch in the profile). `_ids(p)` reads a JSON array of text
# back as the array an index condition takes (`= ANY`, computed once per statement).
def _ids(param: str, cast: str = "text") -> str:
    return f"ARRAY(SELECT x::{cast} FROM jsonb_array_elements_text(CAST(:{param} AS jsonb)) AS x)"


def _json(values) -> str:
    return jsonrows.dumps(values)


_ENROL_MANY = sa.text(
    """INSERT INTO loyalty_members (program_id, customer, enroll_source, enroll_time)
       SELECT v.program_id, v.customer, 'auto', v.enroll_time FROM jsonb_populate_recordset(NULL::loyalty_members,
              CAST(:keys AS jsonb)) WITH ORDINALITY AS v ORDER BY v.ordinality
       ON CONFLICT ON CONSTRAINT loyalty_members_one_per_program DO UPDATE SET customer = EXCLUDED.customer
       RETURNING *"""
).columns(*loyalty_members.c)
# (its lists stay SQL arrays: read from JSON, `= ANY` of them was planned as a scan)
_EARNED = sa.text(
    """SELECT program_id, invoice_id, source_event_id FROM loyalty_movements
        WHERE kind = 'earn' AND program_id = ANY(CAST(:program_ids AS uuid[]))
          AND (invoice_id = ANY(CAST(:invoices AS text[])) OR source_event_id = ANY(CAST(:events AS text[])))"""
)


def _figures(column: str) -> sa.TextClause:
    return sa.text(
        f"""SELECT member_id, sum({column}) FROM loyalty_movements
             WHERE member_id = ANY({_ids("ids", "uuid")}) AND kind IN ('earn', 'reverse')
               AND (CAST(:start AS timestamptz) IS NULL OR qualify_time >= :start)
               AND (CAST(:end AS timestamptz) IS NULL OR qualify_time < :end)
             GROUP BY member_id"""
    )


_FIGURES_POINTS, _FIGURES_SPEND = _figures("points"), _figures("amount")
_MEMBERS_AFTER = sa.text(
    """UPDATE loyalty_members mb SET balance = v.balance, earned = v.earned, tier = v.tier,
              tier_time = v.tier_time, version = mb.version + 1, update_time = now()
         FROM jsonb_populate_recordset(NULL::loyalty_members, CAST(:members AS jsonb)) AS v
        WHERE mb.id = v.id"""
)


# earn_batch's writes in ONE statement: the movements (one jsonb parameter, crm_chassis.jsonrows,
# inserted in order), the members' balances, totals and tiers,
# and the members' expiry timers (moved only when a new lot expires sooner); it returns the
# movements' ids for their events.
_EARN_WRITE = sa.text(
    f"""WITH moved AS (
          INSERT INTO loyalty_movements ({", ".join(_MOVE_COLUMNS)})
          {jsonrows.select_rows("loyalty_movements", _MOVE_COLUMNS)}
          RETURNING id, program_id, source_event_id
        ), members AS ({_MEMBERS_AFTER.text}
        ), armed AS ({timers.upsert_sql("timers", keep_earlier=True)}
        )
        SELECT id, program_id, source_event_id FROM moved"""
)


def _publish_all(tx, routing_key: str, items: list) -> None:
    """A few events as outbox rows of the transaction's one write; many by COPY."""
    if len(items) > 8:
        tx.publish_many(routing_key, items)
    else:
        for subject, msg in items:
            tx.publish(routing_key, msg, subject)


# -- the engine --------------------------------------------------------------------------------
class Loyalty:
    """The ledger's operations, shared by the event handlers, the timers and the API."""

    def __init__(self, rt: Campaign):
        self.rt = rt
        self.clock = lambda: dt.datetime.now(dt.UTC)  # tests control it

    def now(self) -> dt.datetime:
        return self.clock()

    # names
    @staticmethod
    def member_name(program_id, customer) -> str:
        return MEMBER.format(str(program_id), customer)

    # members
    def locked_member(self, conn, member_id):
        return conn.execute(sa.select(loyalty_members).where(m.id == member_id).with_for_update()).one_or_none()

    # the ledger
    def record(self, conn, member, kind: str, points: int, **cols):
        """One movement and the member's balance, or None when a unique key says it is a
        repeat (the same event, invoice or request). `member` is the locked row; returns
        (movement row, member row after)."""
        balance = member.balance + points
        values = {**_MOVE_DEFAULTS, **cols}
        values.update(program_id=member.program_id, member_id=member.id, kind=kind, points=points, balance=balance)
        row = conn.execute(_MOVE, values).one_or_none()
        if row is None:
            return None, member
        totals = {}
        if kind in ("earn", "reverse"):
            totals["earned"] = m.earned + points
        elif kind == "redeem":
            totals["redeemed"] = m.redeemed - points
        elif kind == "expire":
            totals["expired"] = m.expired - points
        after = conn.execute(
            loyalty_members.update()
            .where(m.id == member.id)
            .values(balance=balance, version=m.version + 1, update_time=sa.func.now(), **totals)
            .returning(loyalty_members)
        ).one()
        return row, after

    def take_lots(self, conn, member_id, points: int, now: dt.datetime, first_lot=None) -> list[dict]:
        """Take `points` from the member's live lots, soonest-expiring first (never-expiring
        last; `first_lot` before all): the lots' remaining lowered in one statement; returns
        [{"lot": id, "points": n}] in the order taken."""
        if points <= 0:
            return []
        order = [mv.expire_time.asc().nulls_last(), mv.id]
        if first_lot is not None:
            order.insert(0, sa.case((mv.id == first_lot, 0), else_=1))
        lots = conn.execute(
            sa.select(mv.id, mv.remaining)
            .where(mv.member_id == member_id, mv.remaining > 0, sa.or_(mv.expire_time.is_(None), mv.expire_time > now))
            .order_by(*order)
            .with_for_update()
        ).all()
        used, left = [], points
        for lot in lots:
            if left <= 0:
                break
            n = min(lot.remaining, left)
            used.append({"lot": lot.id, "points": n})
            left -= n
        if used:
            values = sa.values(sa.column("id", sa.BigInteger), sa.column("n", sa.BigInteger), name="u").data(
                [(u["lot"], u["points"]) for u in used]
            )
            conn.execute(
                loyalty_movements.update().where(mv.id == values.c.id).values(remaining=mv.remaining - values.c.n)
            )
        return used

    def expire_due(self, conn, tx, *, member_ids=None, member_id=None, now=None) -> int:
        """Expire the due lots (expire_time <= now) of these members (or one), set-based:
        one movement per lot, balances lowered, points.expired.v1 each. Members are locked
        first (in (programme, customer) order, as everything here locks them), then their lots."""
        now = now or self.now()
        due = sa.select(mv.id).where(mv.remaining > 0, mv.expire_time <= now)
        if member_ids is not None:
            due = due.where(mv.member_id.in_([str(i) for i in member_ids]))
        if member_id is not None:
            due = due.where(mv.member_id == member_id)
        owners = sa.select(mv.member_id).where(mv.id.in_(due.scalar_subquery())).distinct().scalar_subquery()
        conn.execute(sa.select(m.id).where(m.id.in_(owners)).order_by(m.program_id, m.customer).with_for_update())
        rows = conn.execute(_EXPIRE_SQL, {"ids": [r.id for r in conn.execute(due)], "now": now}).all()
        if rows:
            self._publish_movements(tx, rows)
        return len(rows)

    @staticmethod
    def applied(conn, program_id, event_id: str, kind: str) -> bool:
        q = sa.select(mv.id).where(mv.program_id == program_id, mv.source_event_id == event_id, mv.kind == kind)
        return conn.execute(q.limit(1)).first() is not None

    # earning and reversal -----------------------------------------------------------------
    def on_paid(self, conn: sa.Connection, event: Event) -> None:
        self.earn_batch(conn, [event])

    def earn_batch(self, conn: sa.Connection, events: list[Event]) -> int:
        """invoice.paid.v1 events (one, or a batch in one transaction) earned set-based: the
        members enrolled and locked by one upsert (in key order), the earnings already made
        (same event or invoice) skipped, each member's points, balance, figure and tier carried
        through its events in order in Python, then one INSERT of the movements, one UPDATE of
        the members, the expiry timers and the events by COPY. Returns the movements written."""
        items = []
        for event in events:
            e = event.parse(se.InvoiceEvent)
            if (e.kind or "invoice") != "invoice":
                continue
            customer, invoice = _id(e.customer), _id(e.invoice)
            if not customer or not invoice:
                continue
            net = (
                sum((_amount(x.amount) for x in e.lines), Decimal(0))
                if e.lines
                else _amount(e.total) - _amount(e.tax_total)
            )
            # A credit note issued before the payment left less to pay: only what was paid earns.
            total, paid_total = _amount(e.total), _amount(e.paid_total)
            share = paid_total / total if 0 < paid_total < total else Decimal(1)
            net *= share
            if net > 0:
                paid_at = e.event_time.ToDatetime(dt.UTC) if e.event_time.seconds else event.time
                items.append((event, e, customer, invoice, paid_at, net, share))
        if not items:
            return 0
        currencies = sorted({i[1].total.currency_code for i in items})
        progs: dict[str, list[Rules]] = {}
        for r in conn.execute(
            sa.select(loyalty_programs).where(loyalty_programs.c.active, loyalty_programs.c.currency.in_(currencies))
        ):
            progs.setdefault(r.currency, []).append(Rules(r))
        work = [(p, i) for i in items for p in progs.get(i[1].total.currency_code, ())]
        if not work:
            return 0
        now = self.now()
        first: dict[tuple, dt.datetime] = {}
        for p, i in work:
            key = (p.id, i[2])
            first[key] = min(first.get(key, i[4]), i[4])
        keys = sorted(first)
        members = {
            (str(r.program_id), r.customer): r
            for r in conn.execute(
                _ENROL_MANY,
                {"keys": _json({"program_id": k[0], "customer": k[1], "enroll_time": first[k]} for k in keys)},
            )
        }
        prog_ids = sorted({p.id for p, _i in work})
        seen = {
            (str(r.program_id), k)
            for r in conn.execute(
                _EARNED,
                {
                    "program_ids": prog_ids,
                    "invoices": sorted({i[3] for i in items}),
                    "events": sorted({i[0].id for i in items}),
                },
            )
            for k in (("invoice", r.invoice_id), ("event", r.source_event_id))
        }
        # the figure of each member of a programme with tiers, in the current period
        state: dict = {}
        for prog in {p.id: p for p, _i in work}.values():
            ids = [r.id for (pid, _c), r in members.items() if pid == prog.id]
            figures: dict = {}
            start, end = prog.period(now)
            if prog.tiers:
                q = _FIGURES_SPEND if prog.tier_basis == "spend" else _FIGURES_POINTS
                figures = {
                    str(k): Decimal(v) for k, v in conn.execute(q, {"ids": _json(ids), "start": start, "end": end})
                }
            for (pid, _c), r in members.items():
                if pid == prog.id:
                    state[r.id] = {
                        "row": r,
                        "balance": r.balance,
                        "earned": r.earned,
                        "tier": r.tier,
                        "tier_time": r.tier_time,
                        "figure": figures.get(str(r.id), Decimal(0)),
                        "start": start,
                        "end": end,
                    }
        moves, tiers_changed = [], []
        for prog, (event, e, customer, invoice, paid_at, net, share) in work:
            if (prog.id, ("invoice", invoice)) in seen or (prog.id, ("event", event.id)) in seen:
                continue  # this event (or invoice) earned here already
            seen.update({(prog.id, ("invoice", invoice)), (prog.id, ("event", event.id))})
            member = members[(prog.id, customer)]
            s = state[member.id]
            points, details = prog.points(e.lines, net, paid_at, s["tier"], share)
            s["balance"] += points
            s["earned"] += points
            moves.append(
                {
                    **_MOVE_DEFAULTS,
                    "program_id": prog.id,
                    "member_id": member.id,
                    "kind": "earn",
                    "points": points,
                    "balance": s["balance"],
                    "amount": net,
                    "invoice_id": invoice,
                    "actor": SYSTEM,
                    "source_event_id": event.id,
                    "remaining": points,
                    "expire_time": prog.lifetime_end(paid_at) if points > 0 else None,
                    "details": details,
                    "qualify_time": paid_at,
                    "occur_time": paid_at,
                    "_prog": prog,
                    "_customer": customer,
                }
            )
            if (
                prog.tiers
                and (s["start"] is None or s["start"] <= paid_at)
                and (s["end"] is None or paid_at < s["end"])
            ):
                s["figure"] += net if prog.tier_basis == "spend" else points
            if prog.tiers:
                target = prog.tier_of(s["figure"])
                if prog.rank.get(target, 0) > prog.rank.get(s["tier"], 0):
                    tiers_changed.append((prog, member, s["tier"], target))
                    s["tier"], s["tier_time"] = target, now
        if not moves:
            return 0
        touched = {x["member_id"] for x in moves}
        mids = sorted(touched)
        soonest: dict = {}  # member -> its soonest new lot: the member's one expiry timer
        for x in moves:
            at, mid = x["expire_time"], x["member_id"]
            if at is not None and (mid not in soonest or at < soonest[mid]):
                soonest[mid] = at
        ids = {
            (str(r.program_id), r.source_event_id): r.id  # RETURNING's order is not promised
            for r in conn.execute(
                _EARN_WRITE,
                {
                    "rows": jsonrows.dumps({c: x[c] for c in _MOVE_COLUMNS} for x in moves),
                    "members": _json(
                        {
                            "id": x,
                            "balance": state[x]["balance"],
                            "earned": state[x]["earned"],
                            "tier": state[x]["tier"],
                            "tier_time": state[x]["tier_time"],
                        }
                        for x in mids
                    ),
                    "timers": timers.upsert_rows(
                        [(EXPIRE, str(k), at, None) for k, at in sorted(soonest.items())], keep_earlier=True
                    ),
                },
            )
        }
        arm = []
        with self.rt.uow.joined(conn) as tx:
            earned = []
            for x in moves:
                if x["points"]:
                    r = _Row({c: x[c] for c in _MOVE_COLUMNS})
                    r.update(
                        id=ids[(str(x["program_id"]), x["source_event_id"])],
                        amount=x["amount"].quantize(CENT, ROUND_HALF_UP),  # as the numeric(18, 2) column keeps it
                        customer=x["_customer"],
                        currency=x["_prog"].currency,
                    )
                    msg = movement_event(r)
                    earned.append((msg.account, msg))
            _publish_all(tx, ROUTING["earn"], earned)
            changes = []
            for prog, member, previous, tier in tiers_changed:
                msg = self.tier_event(
                    prog, member.customer, previous, tier, "spend" if prog.tier_basis == "spend" else "points", now
                )
                changes.append((msg.account, msg))
                end = state[member.id]["end"]
                if prog.row.downgrade == "period_end" and end is not None:
                    arm.append((PERIOD_END, str(member.id), end, {"period_end": end.isoformat()}))
            _publish_all(tx, "tier.changed.v1", changes)
            timers.schedule_many(conn, arm)
            for mid in sorted(touched):  # the rules that need a timer looked at, per member (rare ones)
                s = state[mid]
                prog = next(x["_prog"] for x in moves if x["member_id"] == mid)
                if prog.tiers and prog.row.downgrade == "grace":
                    below = prog.rank.get(prog.tier_of(s["figure"]), 0) < prog.rank.get(s["tier"], 0)
                    if not below:
                        timers.cancel(conn, GRACE, str(mid))
                    elif timers.get(conn, GRACE, str(mid)) is None:
                        timers.schedule(conn, GRACE, str(mid), now + dt.timedelta(days=prog.row.downgrade_grace_days))
                    if prog.row.tier_period == "rolling_days" and s["tier"]:
                        self._arm_review(conn, prog, s["row"], s["start"])
        return len(ids)

    def on_credited(self, conn: sa.Connection, event: Event) -> None:
        e = event.parse(se.InvoiceEvent)
        if e.kind != "credit_note" or not e.credited_invoice:
            return
        invoice, note = _id(e.credited_invoice), _id(e.invoice)
        credited = (
            sum((_amount(x.amount) for x in e.lines), Decimal(0))
            if e.lines
            else _amount(e.total) - _amount(e.tax_total)
        )
        if credited <= 0:
            return
        earns = conn.execute(
            sa.select(loyalty_movements).where(mv.kind == "earn", mv.invoice_id == invoice).order_by(mv.program_id)
        ).all()
        if not earns:
            return
        when = e.event_time.ToDatetime(dt.UTC) if e.event_time.seconds else event.time
        now = self.now()
        with self.rt.uow.joined(conn) as tx:
            for earn in earns:
                member = self.locked_member(conn, earn.member_id)
                if self.applied(conn, earn.program_id, event.id, "reverse"):
                    continue  # this credit note was applied here before
                prog = Rules(
                    conn.execute(sa.select(loyalty_programs).where(loyalty_programs.c.id == earn.program_id)).one()
                )
                before = conn.execute(
                    sa.select(
                        sa.func.coalesce(sa.func.sum(-mv.amount), 0).label("credited"),
                        sa.func.coalesce(sa.func.sum(-mv.points + mv.shortfall), 0).label("due"),
                    ).where(mv.program_id == earn.program_id, mv.kind == "reverse", mv.invoice_id == invoice)
                ).one()
                total_credited = min(Decimal(before.credited) + credited, earn.amount)
                target = int((Decimal(earn.points) * total_credited / earn.amount).quantize(Decimal(1), ROUND_HALF_UP))
                want = max(0, min(earn.points, target) - int(before.due))
                self.expire_due(conn, tx, member_id=member.id, now=now)
                member = self.locked_member(conn, member.id)
                take = min(want, member.balance)
                lots = self.take_lots(conn, member.id, take, now, first_lot=earn.id)
                row, member = self.record(
                    conn,
                    member,
                    "reverse",
                    -take,
                    amount=-(total_credited - Decimal(before.credited)),
                    invoice_id=invoice,
                    credit_note_id=note,
                    reason=f"credit note {e.number}".strip() if e.number else "credit note",
                    actor=SYSTEM,
                    source_event_id=event.id,
                    lots=lots,
                    shortfall=want - take,
                    qualify_time=earn.qualify_time,
                    occur_time=when,
                )
                if row.points or row.shortfall:  # a credit note beyond what earned moves nothing: no event
                    self._publish_movements(tx, [with_member(row, member, prog)])
                self.evaluate_tier(conn, tx, prog, member, now, "spend" if prog.tier_basis == "spend" else "points")

    def on_merged(self, conn: sa.Connection, event: Event) -> None:
        """customer.merged.v1: each programme's member of a merged customer joins the survivor's:
        renamed when the survivor is not a member there, else its movements (lots included,
        their expiry timers keyed by lot stay right) move to the survivor's member, whose
        totals add up, and the merged member goes (its tier timers with it); the survivor's
        tier is evaluated again."""
        msg = event.parse(ce.CustomerMerged)
        survivor = _id(msg.survivor.name)
        merged = sorted({_id(n) for n in msg.merged} - {survivor, ""})
        if not survivor or not merged:
            return
        rows = conn.execute(
            sa.select(loyalty_members)
            .where(m.customer.in_([survivor, *merged]))
            .order_by(m.program_id, m.customer)
            .with_for_update()
        ).all()
        now = self.now()
        by_program: dict = {}
        for r in rows:
            by_program.setdefault(str(r.program_id), []).append(r)
        with self.rt.uow.joined(conn) as tx:
            for program_id, members in by_program.items():
                keep = next((r for r in members if r.customer == survivor), None)
                gone = [r for r in members if r is not keep]
                if keep is None:  # the survivor was no member: the first merged member becomes theirs
                    keep, gone = gone[0], gone[1:]
                    conn.execute(loyalty_members.update().where(m.id == keep.id).values(customer=survivor))
                if not gone:
                    continue
                ids = [r.id for r in gone]
                conn.execute(loyalty_movements.update().where(mv.member_id.in_(ids)).values(member_id=keep.id))
                keep = conn.execute(
                    loyalty_members.update()
                    .where(m.id == keep.id)
                    .values(
                        balance=m.balance + sum(r.balance for r in gone),
                        earned=m.earned + sum(r.earned for r in gone),
                        redeemed=m.redeemed + sum(r.redeemed for r in gone),
                        expired=m.expired + sum(r.expired for r in gone),
                        version=m.version + 1,
                        update_time=sa.func.now(),
                    )
                    .returning(loyalty_members)
                ).one()
                for r in gone:
                    timers.cancel(conn, GRACE, str(r.id))
                    timers.cancel(conn, PERIOD_END, str(r.id))
                    timers.cancel(conn, EXPIRE, str(r.id))
                self.arm_expiry_from_lots(conn, [keep.id])  # the lots it took over
                conn.execute(loyalty_members.delete().where(m.id.in_(ids)))
                prog = Rules(conn.execute(sa.select(loyalty_programs).where(loyalty_programs.c.id == program_id)).one())
                self.evaluate_tier(conn, tx, prog, keep, now, "spend" if prog.tier_basis == "spend" else "points")

    # tiers ----------------------------------------------------------------------------------
    def figure(self, conn, prog: Rules, member_id, start, end) -> Decimal:
        col = mv.amount if prog.tier_basis == "spend" else mv.points
        q = sa.select(sa.func.coalesce(sa.func.sum(col), 0)).where(
            mv.member_id == member_id, mv.kind.in_(["earn", "reverse"])
        )
        if start is not None:
            q = q.where(mv.qualify_time >= start)
        if end is not None:
            q = q.where(mv.qualify_time < end)
        return Decimal(conn.execute(q).scalar_one())

    def evaluate_tier(self, conn, tx, prog: Rules, member, now: dt.datetime, reason: str):
        """Upgrade at once; below the tier: per the downgrade rule. Returns the member row."""
        if not prog.tiers:
            return member
        start, end = prog.period(now)
        target = prog.tier_of(self.figure(conn, prog, member.id, start, end))
        cur, tgt = prog.rank.get(member.tier, 0), prog.rank.get(target, 0)
        rule = prog.row.downgrade
        if tgt > cur:
            member = self.set_tier(conn, tx, prog, member, target, reason, now)
            if rule == "period_end" and end is not None:
                timers.schedule(conn, PERIOD_END, str(member.id), end, {"period_end": end.isoformat()})
        if rule == "grace":
            if tgt < prog.rank.get(member.tier, 0):
                if timers.get(conn, GRACE, str(member.id)) is None:
                    timers.schedule(conn, GRACE, str(member.id), now + dt.timedelta(days=prog.row.downgrade_grace_days))
            else:
                timers.cancel(conn, GRACE, str(member.id))
            if prog.row.tier_period == "rolling_days" and member.tier:
                self._arm_review(conn, prog, member, start)
        return member

    def _arm_review(self, conn, prog: Rules, member, start: dt.datetime) -> None:
        """A rolling window's figure falls as time passes, with no movement to notice it: the
        tier is reviewed when the oldest movement in the window leaves it (`loyalty.tier_review`)."""
        oldest = conn.execute(
            sa.select(sa.func.min(mv.qualify_time)).where(
                mv.member_id == member.id, mv.kind.in_(["earn", "reverse"]), mv.qualify_time >= start
            )
        ).scalar()
        if oldest is not None:
            due = oldest + dt.timedelta(days=prog.row.tier_period_days, microseconds=1)
            timers.schedule(conn, REVIEW, str(member.id), due)

    def fire_review(self, conn, timer: timers.Timer):
        member = self.locked_member(conn, timer.key)
        if member is None or not member.tier:
            return
        prog = Rules(conn.execute(sa.select(loyalty_programs).where(loyalty_programs.c.id == member.program_id)).one())
        now = max(self.now(), timer.due_at)
        with self.rt.uow.joined(conn) as tx:
            self.evaluate_tier(conn, tx, prog, member, now, "points")

    def set_tier(self, conn, tx, prog: Rules, member, tier: str, reason: str, now: dt.datetime):
        previous = member.tier
        after = conn.execute(
            loyalty_members.update()
            .where(m.id == member.id)
            .values(tier=tier, tier_time=now, version=m.version + 1, update_time=sa.func.now())
            .returning(loyalty_members)
        ).one()
        msg = self.tier_event(prog, member.customer, previous, tier, reason, now)
        tx.publish("tier.changed.v1", msg, msg.account)
        return after

    def tier_event(self, prog: Rules, customer: str, previous: str, tier: str, reason: str, now) -> ev.TierEvent:
        up = prog.rank.get(tier, 0) > prog.rank.get(previous, 0)
        msg = ev.TierEvent(
            account=self.member_name(prog.id, customer),
            customer=f"customers/{customer}",
            programme=prog.name,
            previous_tier=previous,
            tier=tier,
            direction="upgrade" if up else "downgrade",
            reason=reason,
        )
        msg.event_time.FromDatetime(now)
        return msg

    # timers ---------------------------------------------------------------------------------
    def fire_expiry(self, conn, due: list[timers.Timer]):
        """The members' due lots expired, then each member's timer armed again at its next
        expiring lot (none left: the fired timer goes)."""
        ids = sorted(t.key for t in due)
        with self.rt.uow.joined(conn) as tx:
            self.expire_due(conn, tx, member_ids=ids, now=max(self.now(), max(t.due_at for t in due)))
        self.arm_expiry_from_lots(conn, ids)

    @staticmethod
    def arm_expiry(conn, soonest: dict) -> None:
        """Members' new lots: member id -> the soonest expire_time among them; each member's
        timer is moved only if that is sooner than the one it has (one upsert, no write else)."""
        timers.schedule_many(conn, [(EXPIRE, str(k), at, None) for k, at in sorted(soonest.items())], keep_earlier=True)

    @staticmethod
    def arm_expiry_from_lots(conn, member_ids) -> None:
        """These members' timers set to their soonest live lot now (replacing what they had);
        a member without one keeps no timer."""
        ids = [str(i) for i in member_ids]
        if not ids:
            return
        nxt = {
            str(k): at
            for k, at in conn.execute(
                sa.select(mv.member_id, sa.func.min(mv.expire_time))
                .where(mv.member_id.in_(ids), mv.remaining > 0, mv.expire_time.isnot(None))
                .group_by(mv.member_id)
            )
        }
        timers.schedule_many(conn, [(EXPIRE, k, at, None) for k, at in sorted(nxt.items())])
        gone = [(EXPIRE, i) for i in ids if i not in nxt]
        if gone:
            timers.cancel_many(conn, gone)

    def fire_period_end(self, conn, timer: timers.Timer):
        member = self.locked_member(conn, timer.key)
        if member is None:
            return
        prog = Rules(conn.execute(sa.select(loyalty_programs).where(loyalty_programs.c.id == member.program_id)).one())
        ended = _time(timer.payload.get("period_end")) or timer.due_at
        now = self.now()
        if now < ended:  # the clock is behind the timer (tests move it): not yet
            timers.schedule(conn, PERIOD_END, timer.key, ended, dict(timer.payload))
            return
        if prog.row.downgrade != "period_end" or prog.period(ended)[1] is None:
            return
        last_start, last_end = prog.period(ended - dt.timedelta(microseconds=1))
        kept = prog.tier_of(self.figure(conn, prog, member.id, last_start, last_end))
        start, end = prog.period(now)
        now_tier = prog.tier_of(self.figure(conn, prog, member.id, start, end))
        target = max(kept, now_tier, key=lambda k: prog.rank.get(k, 0))
        with self.rt.uow.joined(conn) as tx:
            if prog.rank.get(target, 0) < prog.rank.get(member.tier, 0):
                member = self.set_tier(conn, tx, prog, member, target, "period_end", now)
        if member.tier and end is not None:
            timers.schedule(conn, PERIOD_END, timer.key, end, {"period_end": end.isoformat()})

    def fire_grace(self, conn, timer: timers.Timer):
        member = self.locked_member(conn, timer.key)
        if member is None:
            return
        prog = Rules(conn.execute(sa.select(loyalty_programs).where(loyalty_programs.c.id == member.program_id)).one())
        now = self.now()
        start, end = prog.period(now)
        target = prog.tier_of(self.figure(conn, prog, member.id, start, end))
        if prog.rank.get(target, 0) < prog.rank.get(member.tier, 0):
            with self.rt.uow.joined(conn) as tx:
                member = self.set_tier(conn, tx, prog, member, target, "inactivity", now)
            if prog.row.tier_period == "rolling_days" and member.tier:
                self._arm_review(conn, prog, member, start)

    # events ---------------------------------------------------------------------------------
    def _publish_movements(self, tx, rows) -> None:
        """PointsEvent per movement; `rows` carry the movement's columns plus `customer`."""
        items = []
        for r in rows:
            msg = movement_event(r)
            items.append((msg.account, msg))
        for subject, msg in items:
            tx.publish(ROUTING[_KIND_OF[msg.kind]], msg, subject)


_KIND_OF = {w: k for k, w in WORD.items()}


def with_member(row, member, prog: Rules):
    """A movement row with its member's customer and the programme's currency, as
    `movement_event` reads it."""
    d = dict(row._mapping)
    d["customer"] = member.customer
    d["currency"] = prog.currency
    return _Row(d)


class _Row(dict):
    __getattr__ = dict.__getitem__


def movement_event(r) -> ev.PointsEvent:
    member = MEMBER.format(str(r.program_id), r.customer)
    reference = ""
    if r.invoice_id:
        reference = f"invoices/{r.invoice_id}"
    elif r.reward_key:
        reference = f"rewards/{r.reward_key}"
    msg = ev.PointsEvent(
        entry=f"{member}/movements/{r.id}",
        account=member,
        customer=f"customers/{r.customer}",
        programme=PROGRAM.format(str(r.program_id)),
        kind=WORD[r.kind],
        points=r.points,
        balance=r.balance,
        reference=reference,
        reason=r.reason,
    )
    currency = r.get("currency") if isinstance(r, dict) else getattr(r, "currency", "")
    if r.amount and currency:
        msg.amount.CopyFrom(to_money(r.amount, currency))
    if r.expire_time is not None:
        set_timestamp(msg.expire_time, r.expire_time)
    set_timestamp(msg.event_time, r.occur_time)
    return msg


# One statement expiring the given lots: a movement each (the balance after counts down the
# member's lots in expiry order), the lots emptied, the members' balances and totals lowered.
_EXPIRE_SQL = sa.text(
    """
WITH due AS (
  SELECT l.id, l.program_id, l.member_id, l.remaining, l.expire_time,
         sum(l.remaining) OVER (PARTITION BY l.member_id ORDER BY l.expire_time, l.id) AS upto,
         sum(l.remaining) OVER (PARTITION BY l.member_id) AS total
    FROM loyalty_movements l
   WHERE l.id = ANY(CAST(:ids AS bigint[])) AND l.remaining > 0 AND l.expire_time <= :now
),
emptied AS (
  UPDATE loyalty_movements l SET remaining = 0 FROM due WHERE l.id = due.id RETURNING l.id
),
members AS (
  UPDATE loyalty_members mb SET balance = mb.balance - t.total, expired = mb.expired + t.total,
         version = mb.version + 1, update_time = now()
    FROM (SELECT member_id, max(total) AS total FROM due GROUP BY member_id) t
   WHERE mb.id = t.member_id
  RETURNING mb.id, mb.customer, mb.balance + t.total AS before
)
INSERT INTO loyalty_movements (program_id, member_id, kind, points, balance, actor, lots, reason,
                               qualify_time, occur_time)
SELECT due.program_id, due.member_id, 'expire', -due.remaining, members.before - due.upto, 'system',
       jsonb_build_array(jsonb_build_object('lot', due.id, 'points', due.remaining)), '',
       due.expire_time, due.expire_time
  FROM due JOIN members ON members.id = due.member_id
RETURNING id, program_id, member_id, kind, points, balance, amount, invoice_id, reward_key, reason,
          expire_time, occur_time,
          (SELECT customer FROM loyalty_members WHERE loyalty_members.id = member_id) AS customer
"""
)


# -- the part's hooks -------------------------------------------------------------------------
def engine(rt: Campaign) -> Loyalty:
    return rt.once("loyalty", lambda: Loyalty(rt))


def subscriptions(rt: Campaign) -> list[Subscription]:
    lo = engine(rt)
    return [
        Subscription(
            domain="customer",
            handlers={"customer.merged.v1": lo.on_merged},
            requires={"customer.merged.v1": Requires(ce.CustomerMerged, ("survivor",))},
        ),
        Subscription(
            domain="sales",
            handlers={"invoice.paid.v1": lo.on_paid, "invoice.credited.v1": lo.on_credited},
            batch={"invoice.paid.v1": lo.earn_batch},  # the consumer's batches: one set-based earning
            requires={
                "invoice.paid.v1": Requires(se.InvoiceEvent, ("invoice", "customer")),
                "invoice.credited.v1": Requires(se.InvoiceEvent, ("invoice", "customer")),
            },
        ),
    ]


def timer_handlers(rt: Campaign) -> None:
    lo = engine(rt)
    rt.timers.register_batch(EXPIRE, lo.fire_expiry, max_attempts=20)
    rt.timers.register(PERIOD_END, lo.fire_period_end, max_attempts=20)
    rt.timers.register(GRACE, lo.fire_grace, max_attempts=20)
    rt.timers.register(REVIEW, lo.fire_review, max_attempts=20)


__all__ = ["KINDS", "MEMBER", "MOVEMENT", "PROGRAM", "Loyalty", "Rules", "engine", "subscriptions", "timer_handlers"]
