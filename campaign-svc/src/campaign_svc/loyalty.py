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
  a consumer that applies deliveries in batches: a few statements whatever the batch size,
  the earned-check inside its one write (`_EARN_WRITE`).
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
ONE = Decimal(1)
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
        # the product rules as `points` looks them up: a product's rule, else its line's (the
        # first of the list that names it), with the multiplier and points per unit read once
        self._by_product: dict[str, tuple[Decimal, Decimal | None]] = {}
        self._by_line: dict[str, tuple[Decimal, Decimal | None]] = {}
        for r in self.product_rules:
            ppu = r.get("points_per_unit")
            spec = (_dec(r.get("multiplier")), Decimal(int(ppu)) if ppu else None)
            if r.get("product"):
                self._by_product.setdefault(r["product"], spec)
            if r.get("product_line"):
                self._by_line.setdefault(r["product_line"], spec)
        # the multipliers with their text for `details`, made once
        self._bonus = [(start, end, x, str(x)) for start, end, x in self.bonus]
        self._tier_text = {t.key: str(t.multiplier) for t in self.tiers}

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

    def points(
        self, lines, net: Decimal, paid_at: dt.datetime, tier_key: str, share=Decimal(1), amounts=None
    ) -> tuple[int, dict]:
        """Points an invoice earns, and how: base per line (times its product rule's
        multiplier), times the bonus period's and the tier's multipliers, plus the per-unit
        extras; rounded by the programme's rule. `amounts`: the lines' amounts, if read already."""
        base = Decimal(0)
        extra = Decimal(0)
        ruled = []
        if lines:
            rate, by_product, by_line = self.rate, self._by_product, self._by_line
            if amounts is None:
                amounts = [_amount(line.amount) for line in lines]
            for line, amount in zip(lines, amounts, strict=True):
                product, product_line = line.product, line.product_line
                rule = (by_product.get(product) if product else None) or (
                    by_line.get(product_line) if product_line else None
                )
                if rule is None:
                    base += amount * rate
                    continue
                mult, ppu = rule
                base += amount * rate * mult
                if ppu is not None:
                    extra += ppu * _dec(line.quantity, "0")
                ruled.append(_id(product) or _id(product_line))
        else:
            base = net * self.rate
        bonus, bonus_text = ONE, "1"
        found = False
        for start, end, x, text in self._bonus:  # the highest multiplier of the periods it falls in
            if start <= paid_at < end and (not found or x > bonus):
                bonus, bonus_text, found = x, text, True
        tier = self.tier(tier_key)
        tier_mult, tier_text = (tier.multiplier, self._tier_text[tier.key]) if tier else (ONE, "1")
        raw = (base * bonus * tier_mult + extra) * share
        points = int(raw.quantize(ONE, rounding=self.rounding)) if raw > 0 else 0
        details = {"base": str(base), "bonus": bonus_text, "tier_multiplier": tier_text, "extra": str(extra)}
        if share != 1:
            details["paid_share"] = str(share)
        if ruled:
            details["product_rules"] = ruled
        return points, details

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


# The members of a batch enrolled and locked in one statement: the new ones inserted (in key
# order; only the keys the statement's snapshot lacks are tried, a conflicting insert costs
# several times an index probe), the others locked FOR UPDATE (in key order) without being written, so the UPDATE
# of earn_batch's write is their only new row version (a row inserted or updated earlier in
# the transaction has its foreign key checked again at the next UPDATE). A member inserted
# by a concurrent transaction that committed after this statement began is neither (the
# insert finds it, the lock's snapshot does not): earn_batch asks again for the keys missing.
_ENROL_MANY = sa.text(
    """WITH keys AS (
          SELECT v.program_id, v.customer, v.enroll_time, v.ordinality AS n
            FROM jsonb_populate_recordset(NULL::loyalty_members, CAST(:keys AS jsonb)) WITH ORDINALITY AS v
       ), ins AS (
          INSERT INTO loyalty_members (program_id, customer, enroll_source, enroll_time)
          SELECT program_id, customer, 'auto', enroll_time FROM keys k
           WHERE NOT EXISTS (SELECT FROM loyalty_members mb WHERE mb.program_id = k.program_id AND mb.customer = k.customer)
           ORDER BY n
          ON CONFLICT ON CONSTRAINT loyalty_members_one_per_program DO NOTHING
          RETURNING *
       ), locked AS (
          SELECT mb.* FROM loyalty_members mb JOIN keys k ON k.program_id = mb.program_id AND k.customer = mb.customer
           ORDER BY mb.program_id, mb.customer
             FOR UPDATE OF mb
       )
       SELECT id::text, program_id::text, customer, balance, earned, tier, tier_time FROM ins
       UNION ALL SELECT id::text, program_id::text, customer, balance, earned, tier, tier_time FROM locked"""
)  # the ids as text: what the JSON rows and the timers' keys take
_PROGRAMS = sa.text(
    "SELECT * FROM loyalty_programs WHERE active AND currency = ANY(CAST(:currencies AS text[])) ORDER BY id"
).columns(*loyalty_programs.c)


def _figures(column: str) -> sa.TextClause:
    return sa.text(
        f"""SELECT member_id::text, sum({column}) FROM loyalty_movements
             WHERE member_id = ANY({_ids("ids", "uuid")}) AND kind IN ('earn', 'reverse')
               AND (CAST(:start AS timestamptz) IS NULL OR qualify_time >= :start)
               AND (CAST(:end AS timestamptz) IS NULL OR qualify_time < :end)
             GROUP BY member_id"""
    )


_FIGURES_POINTS, _FIGURES_SPEND = _figures("points"), _figures("amount")

# earn_batch's writes in ONE statement. `:rows` is one JSON array per earning (`_EARN_ROW`, in
# the order they were computed), `:tiers` [[member id, tier]] the members whose tier went up
# (at `:now`). The statement first looks for earnings already made by the same event or of
# the same invoice (`dup`: an index probe per row, LATERAL ... LIMIT 1, never a scan of the
# ledger, whatever the table's statistics say; with the statement's snapshot: taken after earn_batch locked the
# members, so a concurrent batch's earnings for them are seen; the unique indexes are the
# backstop). If there are any, it writes nothing and returns their row numbers (earn_batch
# computes the batch again without them: the balances, figures and tiers carried through a
# member's earnings depend on which of them count); else it writes the movements, the
# members' balances, totals and tiers (from the movements: sums per member) and each member's
# expiry timer at its soonest new lot (moved only when that is sooner than the one it has:
# one timer per member: `timers.upsert_sql(keep_earlier=True)` with the movements as its
# source), and returns each row's movement id.
_EARN_ROW = ("program_id", "member_id", "points", "balance", "amount", "invoice_id", "source_event_id",
             "expire_time", "details", "paid_at")  # fmt: skip
_EXPIRY_TIMERS = timers.upsert_sql(
    keep_earlier=True,
    source="""SELECT :expire_kind, member_id::text, min(expire_time), min(expire_time), '{}'::jsonb, NULL, NULL
            FROM ok WHERE expire_time IS NOT NULL GROUP BY member_id ORDER BY member_id""",
)
_EARN_WRITE = sa.text(
    f"""WITH r AS (
          SELECT t.n, (t.x->>0)::uuid AS program_id, (t.x->>1)::uuid AS member_id, (t.x->>2)::bigint AS points,
                 (t.x->>3)::bigint AS balance, (t.x->>4)::numeric AS amount, t.x->>5 AS invoice_id,
                 t.x->>6 AS source_event_id, (t.x->>7)::timestamptz AS expire_time, t.x->8 AS details,
                 (t.x->>9)::timestamptz AS paid_at, 'earn'::text AS kind
            FROM jsonb_array_elements(CAST(:rows AS jsonb)) WITH ORDINALITY AS t(x, n)
        ), dup AS (
          SELECT r.n FROM r
           CROSS JOIN LATERAL (SELECT FROM loyalty_movements l
                                WHERE l.kind = 'earn' AND l.program_id = r.program_id AND l.invoice_id = r.invoice_id
                                LIMIT 1) AS by_invoice
          UNION
          SELECT r.n FROM r
           CROSS JOIN LATERAL (SELECT FROM loyalty_movements l
                                WHERE l.program_id = r.program_id AND l.source_event_id = r.source_event_id
                                  AND l.kind = r.kind  -- not the constant: only loyalty_movements_event fits
                                LIMIT 1) AS by_event
        ), ok AS (
          SELECT r.* FROM r WHERE NOT EXISTS (SELECT FROM dup)
        ), moved AS (
          INSERT INTO loyalty_movements (program_id, member_id, kind, points, balance, amount, invoice_id, actor,
                                         source_event_id, remaining, expire_time, details, qualify_time, occur_time)
          SELECT program_id, member_id, 'earn', points, balance, amount, invoice_id, 'system',
                 source_event_id, points, expire_time, details, paid_at, paid_at
            FROM ok ORDER BY n
          RETURNING id, program_id, source_event_id
        ), members AS (
          UPDATE loyalty_members mb
             SET balance = mb.balance + d.points, earned = mb.earned + d.points,
                 tier = coalesce(up.tier, mb.tier),
                 tier_time = CASE WHEN up.tier IS NULL THEN mb.tier_time ELSE CAST(:now AS timestamptz) END,
                 version = mb.version + 1, update_time = now()
            FROM (SELECT member_id, sum(points) AS points FROM ok GROUP BY member_id) d
            LEFT JOIN (SELECT (u->>0)::uuid AS id, u->>1 AS tier FROM jsonb_array_elements(CAST(:tiers AS jsonb)) AS u) up
                   ON up.id = d.member_id
           WHERE mb.id = d.member_id
        ), armed AS ({_EXPIRY_TIMERS}
        )
        SELECT ok.n, moved.id FROM moved JOIN ok USING (program_id, source_event_id)
        UNION ALL
        SELECT dup.n, NULL FROM dup"""
)


class _Member:
    """A member as earn_batch carries it through the batch's earnings."""

    __slots__ = ("balance", "earned", "end", "figure", "id", "prog", "row", "start", "tier", "tier_time")

    def __init__(self, row, figure: Decimal, start, end):
        self.row, self.id = row, row.id  # (id text, program_id text, customer, balance, earned, tier, tier_time)
        self.balance, self.earned, self.tier, self.tier_time = row.balance, row.earned, row.tier, row.tier_time
        self.figure, self.start, self.end = figure, start, end
        self.prog = None


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
        members enrolled and locked by one statement (`_ENROL_MANY`: the new ones inserted, the
        others locked FOR UPDATE, each in key order), each member's points,
        balance, figure and tier carried through its events in order in Python, then ONE
        statement (`_EARN_WRITE`) that skips the batch if an earning was made already (same
        event or invoice: the batch is computed again without those), else writes the
        movements, the members and the expiry timers; the events by COPY. Returns the
        movements written."""
        items = []
        for event in events:
            e = event.parse(se.InvoiceEvent)
            if (e.kind or "invoice") != "invoice":
                continue
            customer, invoice = _id(e.customer), _id(e.invoice)
            if not customer or not invoice:
                continue
            amounts = [_amount(x.amount) for x in e.lines]
            net = sum(amounts, Decimal(0)) if amounts else _amount(e.total) - _amount(e.tax_total)
            # A credit note issued before the payment left less to pay: only what was paid earns.
            total, paid_total = _amount(e.total), _amount(e.paid_total)
            share = paid_total / total if 0 < paid_total < total else ONE
            net *= share
            if net > 0:
                paid_at = e.event_time.ToDatetime(dt.UTC) if e.event_time.seconds else event.time
                items.append((event, e, customer, invoice, paid_at, net, share, amounts))
        if not items:
            return 0
        currencies = sorted({i[1].total.currency_code for i in items})
        progs: dict[str, list[Rules]] = {}
        for r in conn.execute(_PROGRAMS, {"currencies": currencies}):
            progs.setdefault(r.currency, []).append(Rules(r))
        work = [(p, i) for i in items for p in progs.get(i[1].total.currency_code, ())]
        if not work:
            return 0
        now = self.now()
        first: dict[tuple, dt.datetime] = {}
        for p, i in work:
            key = (p.id, i[2])
            had = first.get(key)
            if had is None or i[4] < had:
                first[key] = i[4]
        members: dict = {}
        keys = sorted(first)  # the members are locked in this order
        for _attempt in range(3):
            enrol = _json({"program_id": k[0], "customer": k[1], "enroll_time": first[k].isoformat()} for k in keys)
            members.update(((r.program_id, r.customer), r) for r in conn.execute(_ENROL_MANY, {"keys": enrol}))
            keys = [k for k in keys if k not in members]  # enrolled meanwhile by another transaction
            if not keys:
                break
        else:
            raise RuntimeError(f"earn_batch: members {keys[:3]} could not be enrolled nor locked")
        # the figure of each member of a programme with tiers, in the current period
        figures: dict = {}
        periods: dict = {}
        for prog in {p.id: p for p, _i in work}.values():
            start, end = periods[prog.id] = prog.period(now)
            if prog.tiers:
                ids = [r.id for (pid, _c), r in members.items() if pid == prog.id]
                q = _FIGURES_SPEND if prog.tier_basis == "spend" else _FIGURES_POINTS
                figures.update(
                    (k, Decimal(v)) for k, v in conn.execute(q, {"ids": _json(ids), "start": start, "end": end})
                )
        skip: set = set()  # (programme, ("invoice" | "event", id)) earned before this batch
        for _attempt in range(len(work) + 1):
            state = {}
            for (pid, _c), r in members.items():
                sid = r.id
                state[(pid, r.customer)] = _Member(r, figures.get(sid, Decimal(0)), *periods[pid])
            moves, rows, tiers_changed = self._plan(work, state, skip, now)
            if not rows:
                return 0
            written = conn.execute(
                _EARN_WRITE,
                {
                    "rows": jsonrows.dumps(rows),
                    "tiers": _json([s.id, s.tier] for s in {id(x[1]): x[1] for x in tiers_changed}.values()),
                    "now": now,
                    "expire_kind": EXPIRE,
                },
            ).all()
            ids = {n: mid for n, mid in written}
            if None not in ids.values():
                break
            for n, mid in written:  # earned before: computed again without them
                if mid is None:
                    row = rows[n - 1]
                    skip.add((row[0], ("invoice", row[5])))
                    skip.add((row[0], ("event", row[6])))
        else:  # pragma: no cover - every attempt skips at least one more earning
            raise RuntimeError("earn_batch: the earnings already made kept changing")
        with self.rt.uow.joined(conn) as tx:
            earned = []
            for n, (prog, s, points, balance, amount, invoice, expire, occur) in enumerate(moves, 1):
                if points:
                    msg = _earned_event(prog, s.row.customer, ids[n], points, balance, amount, invoice, expire, occur)
                    earned.append((msg.account, msg))
            _publish_all(tx, ROUTING["earn"], earned)
            changes, arm = [], []
            for prog, s, previous, tier in tiers_changed:
                msg = self.tier_event(
                    prog, s.row.customer, previous, tier, "spend" if prog.tier_basis == "spend" else "points", now
                )
                changes.append((msg.account, msg))
                if prog.row.downgrade == "period_end" and s.end is not None:
                    arm.append((PERIOD_END, s.id, s.end, {"period_end": s.end.isoformat()}))
            _publish_all(tx, "tier.changed.v1", changes)
            if arm:
                timers.schedule_many(conn, arm)
            touched = sorted({s.id: s for _p, s, *_rest in moves}.items())
            for mid, s in touched:  # the rules that need a timer looked at, per member (rare ones)
                prog = s.prog
                if prog.tiers and prog.row.downgrade == "grace":
                    below = prog.rank.get(prog.tier_of(s.figure), 0) < prog.rank.get(s.tier, 0)
                    if not below:
                        timers.cancel(conn, GRACE, mid)
                    elif timers.get(conn, GRACE, mid) is None:
                        timers.schedule(conn, GRACE, mid, now + dt.timedelta(days=prog.row.downgrade_grace_days))
                    if prog.row.tier_period == "rolling_days" and s.tier:
                        self._arm_review(conn, prog, s.row, s.start)
        return len(ids)

    @staticmethod
    def _plan(work, state: dict, skip: set, now: dt.datetime):
        """The batch's earnings in order, each member (`state`: (programme, customer) ->
        _Member) carried through them: (moves, the rows of `_EARN_WRITE`, the tier changes).
        An event or invoice that earned in a programme (`skip`, or earlier in the batch) earns
        there no more."""
        seen = set(skip)
        moves, rows, tiers_changed = [], [], []
        for prog, (event, e, customer, invoice, paid_at, net, share, amounts) in work:
            pid = prog.id
            by_invoice, by_event = (pid, ("invoice", invoice)), (pid, ("event", event.id))
            if by_invoice in seen or by_event in seen:
                continue  # this event (or invoice) earned here already
            seen.add(by_invoice)
            seen.add(by_event)
            s = state[(pid, customer)]
            s.prog = prog
            points, details = prog.points(e.lines, net, paid_at, s.tier, share, amounts)
            s.balance += points
            s.earned += points
            expire = prog.lifetime_end(paid_at) if points > 0 else None
            moves.append((prog, s, points, s.balance, net, invoice, expire, paid_at))
            rows.append(
                [pid, s.id, points, s.balance, str(net), invoice, event.id,
                 expire.isoformat() if expire is not None else None, details, paid_at.isoformat()]
            )  # fmt: skip
            if prog.tiers:
                if (s.start is None or s.start <= paid_at) and (s.end is None or paid_at < s.end):
                    s.figure += net if prog.tier_basis == "spend" else points
                target = prog.tier_of(s.figure)
                if prog.rank.get(target, 0) > prog.rank.get(s.tier, 0):
                    tiers_changed.append((prog, s, s.tier, target))
                    s.tier, s.tier_time = target, now
        return moves, rows, tiers_changed

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


def _earned_event(
    prog: Rules,
    customer: str,
    movement_id,
    points: int,
    balance: int,
    amount: Decimal,
    invoice: str,
    expire: dt.datetime | None,
    occur: dt.datetime,
) -> ev.PointsEvent:
    """points.earned.v1 of an earning, built from what earn_batch computed (as `movement_event`
    builds it from a movement row: the amount as the numeric(18, 2) column keeps it)."""
    member = f"{prog.name}/members/{customer}"
    msg = ev.PointsEvent(
        entry=f"{member}/movements/{movement_id}",
        account=member,
        customer=f"customers/{customer}",
        programme=prog.name,
        kind="earned",
        points=points,
        balance=balance,
        reference=f"invoices/{invoice}",
    )
    cents = int(amount.quantize(CENT, ROUND_HALF_UP).scaleb(2))
    if cents:
        units, rest = divmod(cents, 100)
        msg.amount.currency_code = prog.currency
        msg.amount.units = units
        msg.amount.nanos = rest * 10_000_000
    if expire is not None:
        set_timestamp(msg.expire_time, expire)
    set_timestamp(msg.event_time, occur)
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
