"""The SLA engine: business-time clocks of a ticket computed from its recorded state intervals
and message times (never accumulated step by step), so a changed calendar or policy recomputes
an open ticket exactly; warnings and breaches on durable timers; breach actions.

Three metrics, each a clock on the calendar of the ticket's team (calendars.calendar_of_team):

- first_response: from create_time to first_response_time (set once by ticketing);
- next_response: from the customer's first message after the last agent reply (the ticket is
  awaiting a reply and has had a first response) to the next agent reply, which clears it;
- resolution: from create_time to resolve_time while resolved or closed; a reopened ticket's
  clock goes on (its resolved interval does not count).

Every clock counts only intervals in running states: waiting_on_customer pauses it (resuming
when the state leaves it), resolved and closed stop it (PAUSED). While a clock is paused no
timer is pending; its due time is `calendar.add(now, remaining)` once it runs again.

The pure functions (`elapsed`, `due_at`, `clock`) take `now`; the rest loads a batch of
tickets (policies selected in SQL, intervals, first unanswered customer message, stored state),
computes, and writes `ticket_sla` + the timers "sla.warn" / "sla.breach" (key
f"{ticket_id}:{metric}"): a timer exists exactly while its clock runs and its flag is not set.

A ticket's policy is always the first active policy (position, create_time, id) whose conditions
(priorities, categories, customer ranks; empty = any) it matches: it is re-selected at every
recompute, so a changed priority, category or customer, or a deactivated policy, moves it.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.dialects.postgresql import insert as pg_insert

from crm.support.v1 import support_events_pb2 as ev_pb
from crm_chassis import timers
from crm_chassis.business_time import BusinessCalendar
from crm_chassis.columns import TIMESTAMPTZ, UUID, id_column, text_column, times
from crm_chassis.db import cacheable
from crm_chassis.resources import ResourceName

from . import calendars as calendar_cache
from .runtime import Support
from .tables import TEXTS, calendars, customer_refs, metadata, teams, ticket_intervals, ticket_messages, tickets
from .ticketing import opened_here, tx_memo

log = logging.getLogger(__name__)

POLICY = ResourceName("slaPolicies/{sla_policy_id}")
TICKET = ResourceName("tickets/{ticket_id}")
METRICS = ("first_response", "next_response", "resolution")
PAUSED = frozenset({"waiting_on_customer", "resolved", "closed"})
OPEN_STATES = ("new", "open", "waiting_on_customer", "waiting_on_third_party", "reopened")
PRIORITY_UP = {"low": "normal", "normal": "high", "high": "urgent"}
ACTIONS = ("notify_manager", "raise_priority", "reassign")
WARN, BREACH = "sla.warn", "sla.breach"
KINDS = (WARN, BREACH)
ACTOR = "system"  # who SLA actions are by
LABELS = {"first_response": "پاسخ اول", "next_response": "پاسخ بعدی", "resolution": "حل درخواست"}

sla_policies = sa.Table(
    "sla_policies",
    metadata,
    id_column(),
    sa.Column("display_name", sa.Text, nullable=False, unique=True),
    text_column("description"),
    sa.Column("position", sa.Integer, nullable=False, server_default="0"),
    sa.Column("priorities", TEXTS, nullable=False, server_default="{}"),  # low | normal | high | urgent
    sa.Column("category_ids", pg.ARRAY(UUID), nullable=False, server_default="{}"),
    sa.Column("ranks", TEXTS, nullable=False, server_default="{}"),  # ranks/{id}, as customer_refs.rank
    sa.Column("first_response_minutes", sa.Integer, nullable=False, server_default="0"),  # business; 0: none
    sa.Column("next_response_minutes", sa.Integer, nullable=False, server_default="0"),
    sa.Column("resolution_minutes", sa.Integer, nullable=False, server_default="0"),
    sa.Column("warning_before_minutes", sa.Integer, nullable=False, server_default="0"),
    sa.Column("breach_actions", TEXTS, nullable=False, server_default="{}"),  # ACTIONS
    sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
    text_column("creator"),
    text_column("request_id"),
    *times(),
)
sa.Index(
    "sla_policies_precedence",
    sla_policies.c.position,
    sla_policies.c.create_time,
    sla_policies.c.id,
    postgresql_where=sla_policies.c.active,
)
sa.Index(
    "sla_policies_request_id",
    sla_policies.c.request_id,
    unique=True,
    postgresql_where=sla_policies.c.request_id != "",
)


def _flags():
    out = []
    for m in METRICS:
        out += [
            sa.Column(f"{m}_warned", sa.Boolean, nullable=False, server_default=sa.false()),
            sa.Column(f"{m}_breached", sa.Boolean, nullable=False, server_default=sa.false()),
        ]
    return out


# Each ticket's SLA state as last computed (what the timers and reports read).
ticket_sla = sa.Table(
    "ticket_sla",
    metadata,
    sa.Column("ticket_id", UUID, sa.ForeignKey("tickets.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("policy_id", UUID, sa.ForeignKey("sla_policies.id")),
    sa.Column("first_response_due", TIMESTAMPTZ),
    sa.Column("next_response_due", TIMESTAMPTZ),
    sa.Column("resolution_due", TIMESTAMPTZ),
    sa.Column("next_response_start", TIMESTAMPTZ),  # the current next-response cycle's start
    *_flags(),
    sa.Column("first_response_met", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("resolution_met", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("first_response_seconds", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("next_response_seconds", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("resolution_seconds", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("computed_at", TIMESTAMPTZ, nullable=False, server_default=sa.func.now()),
)
sa.Index("ticket_sla_policy", ticket_sla.c.policy_id)


# -- pure business-time arithmetic ------------------------------------------------------------
@dataclass(frozen=True)
class Interval:
    """A state from start to end (None: still in it)."""

    state: str
    start: dt.datetime
    end: dt.datetime | None = None


def _running_spans(intervals, start, stop, now, paused_states):
    """[lo, hi) of the intervals in running states, clipped to [start, stop or now), in order."""
    end = min(stop, now) if stop is not None else now
    for iv in sorted(intervals, key=lambda i: i.start):
        if iv.state in paused_states:
            continue
        lo, hi = max(iv.start, start), min(iv.end or now, end)
        if hi > lo:
            yield lo, hi


def elapsed(
    intervals: Iterable[Interval],
    calendar: BusinessCalendar,
    start: dt.datetime,
    stop: dt.datetime | None,
    now: dt.datetime,
    paused_states: frozenset[str] = PAUSED,
) -> float:
    """Business seconds from `start` to `stop` (None: `now`) over the intervals not in
    `paused_states` (waiting on the customer pauses the clock)."""
    return sum(calendar.between(lo, hi) for lo, hi in _running_spans(intervals, start, stop, now, paused_states))


def paused_now(intervals: Sequence[Interval], paused_states: frozenset[str] = PAUSED) -> bool:
    """Whether the ticket's current state (its open interval, else its last) pauses the clock."""
    if not intervals:
        return False
    current = [i for i in intervals if i.end is None] or [max(intervals, key=lambda i: i.start)]
    return current[-1].state in paused_states


def due_at(
    intervals: Sequence[Interval],
    calendar: BusinessCalendar,
    start: dt.datetime,
    target_seconds: float,
    now: dt.datetime,
    stop: dt.datetime | None = None,
    paused_states: frozenset[str] = PAUSED,
) -> dt.datetime | None:
    """When `target_seconds` of business time are (or were) reached: the instant in the past if
    the running intervals already hold them; else, from `now` (or from `stop` for a stopped
    clock), `calendar.add` over what remains; None while the clock is paused."""
    acc = 0.0
    for lo, hi in _running_spans(intervals, start, stop, now, paused_states):
        s = calendar.between(lo, hi)
        if acc + s >= target_seconds:
            return calendar.add(lo, dt.timedelta(seconds=target_seconds - acc))
        acc += s
    left = dt.timedelta(seconds=target_seconds - acc)
    if stop is not None:
        return calendar.add(stop, left)
    if paused_now(intervals, paused_states):
        return None
    return calendar.add(now, left)


@dataclass
class Clock:
    """One metric of one ticket, computed at `now`."""

    metric: str
    target_seconds: int
    start: dt.datetime | None
    stop: dt.datetime | None
    elapsed: float = 0.0
    paused: bool = False
    running: bool = False
    due: dt.datetime | None = None
    warn: dt.datetime | None = None
    met: bool = False
    breached: bool = False


def clock(
    metric: str,
    intervals: Sequence[Interval],
    calendar: BusinessCalendar,
    start: dt.datetime | None,
    stop: dt.datetime | None,
    target_seconds: int,
    warning_seconds: int,
    now: dt.datetime,
    paused_states: frozenset[str] = PAUSED,
) -> Clock:
    """A metric's clock: start None means it has not started (a next response nobody awaits)."""
    c = Clock(metric, target_seconds, start, stop)
    if start is None:
        return c
    c.elapsed = elapsed(intervals, calendar, start, stop, now, paused_states)
    stopped = stop is not None
    c.paused = not stopped and paused_now(intervals, paused_states)
    c.running = not stopped and not c.paused
    try:
        c.due = due_at(intervals, calendar, start, target_seconds, now, stop, paused_states)
        if warning_seconds and warning_seconds < target_seconds:
            c.warn = due_at(intervals, calendar, start, target_seconds - warning_seconds, now, stop, paused_states)
    except ValueError:  # a calendar with no open hours for years: never due (and no timer)
        log.warning("sla calendar has no open hours", extra={"metric": metric, "calendar": repr(calendar)})
        c.due = c.warn = None
    c.met = stopped and c.elapsed <= target_seconds
    c.breached = c.elapsed > target_seconds or (c.running and c.elapsed >= target_seconds)
    return c


def clocks(ticket, intervals, calendar, policy, now, next_start) -> dict[str, Clock]:
    """The clocks of a ticket row under a policy row (those with a target)."""
    if policy is None:
        return {}
    done = ticket.state in ("resolved", "closed")
    spec = {
        "first_response": (ticket.create_time, ticket.first_response_time),
        "next_response": (next_start, None),
        "resolution": (ticket.create_time, (ticket.resolve_time or now) if done else None),
    }
    warning = policy.warning_before_minutes * 60
    out = {}
    for m in METRICS:
        target = getattr(policy, f"{m}_minutes") * 60
        if target > 0:
            start, stop = spec[m]
            out[m] = clock(m, intervals, calendar, start, stop, target, warning, now)
    return out


# -- loading and storing ----------------------------------------------------------------------
def match_clause(p, t_priority, t_category, t_rank):
    """SQL: policy row/alias `p` matches a ticket with these column expressions."""
    return sa.and_(
        sa.or_(sa.func.cardinality(p.c.priorities) == 0, t_priority == sa.any_(p.c.priorities)),
        sa.or_(sa.func.cardinality(p.c.category_ids) == 0, t_category == sa.any_(p.c.category_ids)),
        sa.or_(sa.func.cardinality(p.c.ranks) == 0, t_rank == sa.any_(p.c.ranks)),
    )


def _with_rank(frm):
    """`frm` (with tickets in it) left-joined to the customer's projection row, and the rank
    expression ('' for none)."""
    return frm.outerjoin(customer_refs, customer_refs.c.customer_id == tickets.c.customer_id), sa.func.coalesce(
        customer_refs.c.rank, ""
    )


def _policies_statement() -> sa.Select:
    """Each ticket of :ids with the first active policy it matches (a LATERAL subquery) and its
    team's calendar id and version (so the cached calendar needs no statement of its own).
    Built once: making the alias and the lateral's columns costs milliseconds of Python a call."""
    p = sla_policies.alias("p")
    t = tickets
    frm, rank = _with_rank(t)
    first = (
        sa.select(p)
        .where(p.c.active, match_clause(p, t.c.priority, t.c.category_id, rank))
        .order_by(p.c.position, p.c.create_time, p.c.id)
        .limit(1)
        .lateral("first")
    )
    frm = (
        frm.outerjoin(first, sa.true())
        .outerjoin(teams, teams.c.id == t.c.team_id)
        .outerjoin(calendars, calendars.c.id == teams.c.calendar_id)
    )
    return (
        sa.select(
            t.c.id.label("ticket_id"),
            calendars.c.id.label("calendar_id"),
            calendars.c.version.label("calendar_version"),
            *first.c,
        )
        .select_from(frm)
        .where(t.c.id.in_(sa.bindparam("ticket_ids", expanding=True)))
    )


_POLICIES = _policies_statement()


def _select_policies(conn: sa.Connection, ticket_ids: Sequence[str]) -> dict[str, object]:
    """Each ticket's row of _POLICIES (policy columns, None id for no policy; calendar id and
    version), in one statement."""
    if not ticket_ids:
        return {}
    rows = conn.execute(_POLICIES, {"ticket_ids": [str(i) for i in ticket_ids]}).all()
    return {str(r.ticket_id): r for r in rows}


def select_policies(conn: sa.Connection, ticket_ids: Sequence[str]) -> dict[str, object]:
    """Each ticket's policy row (the first active matching one by precedence) or None, in one
    statement."""
    return {tid: (r if r.id is not None else None) for tid, r in _select_policies(conn, ticket_ids).items()}


def load_intervals(conn: sa.Connection, ticket_ids: Sequence[str]) -> dict[str, list[Interval]]:
    out: dict[str, list[Interval]] = {str(i): [] for i in ticket_ids}
    rows = conn.execute(
        sa.select(ticket_intervals.c.ticket_id, ticket_intervals.c.state, ticket_intervals.c.start_time,
                  ticket_intervals.c.end_time)
        .where(ticket_intervals.c.ticket_id.in_(ticket_ids))
        .order_by(ticket_intervals.c.ticket_id, ticket_intervals.c.start_time, ticket_intervals.c.id)
    )  # fmt: skip
    for r in rows:
        out[str(r.ticket_id)].append(Interval(r.state, r.start_time, r.end_time))
    return out


def load_next_starts(conn: sa.Connection, rows) -> dict[str, dt.datetime]:
    """The customer's first message after the last agent reply, of tickets awaiting a reply
    that have had a first response (one statement)."""
    ids = [r.id for r in rows if r.awaiting_reply and r.first_response_time is not None]
    if not ids:
        return {}
    m, t = ticket_messages, tickets
    q = (
        sa.select(m.c.ticket_id, sa.func.min(m.c.create_time))
        .select_from(m.join(t, t.c.id == m.c.ticket_id))
        .where(
            m.c.ticket_id.in_(ids),
            m.c.kind == "customer",
            m.c.create_time > sa.func.coalesce(t.c.last_agent_message_time, t.c.first_response_time),
        )
        .group_by(m.c.ticket_id)
    )
    return {str(tid): at for tid, at in conn.execute(q)}


def load_stored(conn: sa.Connection, ticket_ids: Sequence[str]) -> dict[str, object]:
    return {
        str(r.ticket_id): r for r in conn.execute(sa.select(ticket_sla).where(ticket_sla.c.ticket_id.in_(ticket_ids)))
    }


@dataclass
class Computed:
    """A ticket's SLA state: its policy, clocks and the warned/breached flags of this cycle."""

    ticket: object
    policy: object | None
    clocks: dict[str, Clock]
    now: dt.datetime
    next_start: dt.datetime | None
    flags: dict[str, dict[str, bool]] = field(default_factory=dict)
    old: object | None = None  # the stored ticket_sla row before

    def unchanged(self, metric: str) -> bool:
        """Whether the metric's timers are as stored (same policy, due and flags): not re-armed,
        so a recompute that changes nothing writes no timer (and resets no claimed one)."""
        o, c = self.old, self.clocks.get(metric)
        if self.policy is None and o is not None and o.policy_id is None:
            return True  # no policy before or now: no timers
        if o is None or self.policy is None or str(o.policy_id) != str(self.policy.id) or c is None:
            return False
        due = c.due if c.running else None
        return getattr(o, f"{metric}_due") == due and all(
            getattr(o, f"{metric}_{f}") == self.flags[metric][f] for f in ("warned", "breached")
        )

    def values(self) -> dict:
        c = self.clocks
        v = {
            "ticket_id": self.ticket.id,
            "policy_id": self.policy.id if self.policy is not None else None,
            "next_response_start": self.next_start,
            "computed_at": self.now,
        }
        for m in METRICS:
            k = c.get(m)
            v[f"{m}_due"] = k.due if k is not None and k.running else None
            v[f"{m}_seconds"] = int(k.elapsed) if k is not None else 0
            v[f"{m}_warned"] = self.flags[m]["warned"]
            v[f"{m}_breached"] = self.flags[m]["breached"]
        v["first_response_met"] = bool(c.get("first_response") and c["first_response"].met)
        v["resolution_met"] = bool(c.get("resolution") and c["resolution"].met)
        return v


# The stored state's columns (Computed.values) and its upsert, built once (compiled once).
STORED = (
    "ticket_id",
    "policy_id",
    "next_response_start",
    "computed_at",
    *(f"{m}_{f}" for m in METRICS for f in ("due", "seconds", "warned", "breached")),
    "first_response_met",
    "resolution_met",
)


def _store_statement():
    stmt = pg_insert(ticket_sla).values({c: sa.bindparam(c, type_=ticket_sla.c[c].type) for c in STORED})
    excluded = {c: stmt.excluded[c] for c in STORED if c != "ticket_id"}
    return cacheable(stmt.on_conflict_do_update(index_elements=["ticket_id"], set_=excluded))


_STORE = _store_statement()
MEMO_LIMIT = 1024  # entries of a transaction's memo before it is emptied (a bulk change)


def _key(row) -> tuple:
    """A ticket row's version in this transaction (every change bumps version)."""
    return (str(row.id), row.version, row.update_time)


def _fields_of(s: Computed) -> dict:
    """The SLA fields of a TicketEvent from a computed state."""
    if s.policy is None:
        return {}
    fr, res = s.clocks.get("first_response"), s.clocks.get("resolution")
    out = {"sla_policy": POLICY.format(s.policy.id)}
    if fr is not None and fr.stop is not None:
        out["first_response_business_seconds"] = int(fr.elapsed)
        out["sla_first_response_met"] = fr.met
    if res is not None and res.stop is not None:
        out["resolution_business_seconds"] = int(res.elapsed)
        out["sla_resolution_met"] = res.met
    return out


def _memo(conn: sa.Connection, name: str) -> dict:
    memo = tx_memo(conn, name)
    if len(memo) > MEMO_LIMIT:
        memo.clear()
    return memo


class Engine:
    """Computes and stores SLA state of tickets (one object per process: support.once).

    Within one transaction a ticket version (id, version, update_time) is computed once at its
    own update_time: the events of a change and the `changed` hook that stores it share that
    computation (`tx_memo`); a store drops it, so the next computation reads the stored flags.
    A ticket opened in this transaction (ticketing.opened_here) and not stored yet has no
    stored state and no timers, and while it is still new its one interval is known: neither is
    read."""

    def __init__(self, support: Support):
        self.support = support

    # computing ----------------------------------------------------------------------------
    def compute(self, conn: sa.Connection, rows: Sequence, now: dt.datetime) -> list[Computed]:
        """The SLA state of ticket rows at `now` (no writes): policies selected, flags carried
        over from the stored state unless the policy or the next-response cycle changed."""
        if not rows:
            return []
        memo = _memo(conn, "sla.computed")
        out: list[Computed | None] = [None] * len(rows)
        todo = []
        for i, r in enumerate(rows):
            hit = memo.get(_key(r)) if now == r.update_time else None
            if hit is not None:
                out[i] = hit
            else:
                todo.append(r)
        if todo:
            stored_here = tx_memo(conn, "sla.stored")
            fresh = {str(r.id) for r in todo if str(r.id) not in stored_here and opened_here(conn, r.id)}
            ids = [str(r.id) for r in todo]
            context = _select_policies(conn, ids)
            known = {
                str(r.id): [Interval("new", r.create_time)] for r in todo if str(r.id) in fresh and r.state == "new"
            }
            intervals = (
                {**load_intervals(conn, [i for i in ids if i not in known]), **known}
                if len(known) < len(ids)
                else known
            )
            nexts = load_next_starts(conn, todo)
            stored = load_stored(conn, [i for i in ids if i not in fresh]) if len(fresh) < len(ids) else {}
            cals: dict = {}
            done = {}
            for r in todo:
                tid = str(r.id)
                ctx = context.get(tid)
                cal_key = (ctx.calendar_id, ctx.calendar_version) if ctx is not None else (None, None)
                if cal_key not in cals:
                    cals[cal_key] = calendar_cache.of_version(conn, *cal_key)
                policy = ctx if ctx is not None and ctx.id is not None else None
                nxt = nexts.get(tid)
                cs = clocks(r, intervals.get(tid, []), cals[cal_key], policy, now, nxt)
                old = stored.get(tid)
                same_policy = old is not None and policy is not None and str(old.policy_id) == str(policy.id)
                flags = {}
                for m in METRICS:
                    keep = same_policy and (m != "next_response" or old.next_response_start == nxt)
                    flags[m] = {
                        "warned": bool(keep and getattr(old, f"{m}_warned")),
                        "breached": bool(keep and getattr(old, f"{m}_breached")),
                    }
                c = Computed(r, policy, cs, now, nxt, flags, old)
                done[id(r)] = c
                if now == r.update_time:
                    memo[_key(r)] = c
            out = [o if o is not None else done[id(r)] for o, r in zip(out, rows, strict=True)]
        return out

    # storing ------------------------------------------------------------------------------
    def store(self, conn: sa.Connection, states: Sequence[Computed], force: bool = False) -> None:
        """Write ticket_sla and set/cancel the timers of these states (those of an unchanged
        metric are left alone unless `force`): one upsert, at most one DELETE of timers and one
        upsert of the armed ones."""
        if not states:
            return
        conn.execute(_STORE, [s.values() for s in states])
        computed, fields, stored_here = (
            _memo(conn, "sla.computed"),
            _memo(conn, "sla.fields"),
            tx_memo(conn, "sla.stored"),
        )
        drop, arm = [], []
        for s in states:
            tid = str(s.ticket.id)
            fresh = s.old is None and tid not in stored_here and opened_here(conn, tid)  # no timers yet
            for m in METRICS:
                c = s.clocks.get(m)
                key = f"{tid}:{m}"
                if not force and s.unchanged(m):
                    continue
                for kind, flag, at in ((WARN, "warned", c and c.warn), (BREACH, "breached", c and c.due)):
                    if c is not None and c.running and at is not None and not s.flags[m][flag]:
                        arm.append((kind, key, at, {"ticket_id": tid, "metric": m}))
                    elif not fresh:
                        drop.append((kind, key))
            stored_here[tid] = True
            k = _key(s.ticket)
            if s.now == s.ticket.update_time:
                fields.setdefault(k, _fields_of(s))
            computed.pop(k, None)  # stored: a computation from now on reads these flags
        timers.cancel_many(conn, drop)
        timers.schedule_many(conn, arm)

    def recompute(self, conn: sa.Connection, rows: Sequence, now: dt.datetime | None = None) -> list[Computed]:
        """Compute and store (the tickets are locked by the caller)."""
        if now is None:
            now = conn.execute(sa.select(sa.func.now())).scalar()
        states = self.compute(conn, rows, now)
        self.store(conn, states)
        return states

    def recompute_ids(self, ids: Sequence[str], batch: int = 200) -> int:
        """Recompute tickets by id in batches, each batch its own transaction (tickets locked
        in id order, closed ones skipped)."""
        ids = sorted({str(i) for i in ids})
        done = 0
        for i in range(0, len(ids), batch):
            with self.support.uow.begin() as tx:
                rows = tx.conn.execute(
                    sa.select(tickets)
                    .where(tickets.c.id.in_(ids[i : i + batch]), tickets.c.state.in_(OPEN_STATES))
                    .order_by(tickets.c.id)
                    .with_for_update()
                ).all()
                self.recompute(tx.conn, rows)
                done += len(rows)
        return done

    # events -------------------------------------------------------------------------------
    def event_fields(self, conn: sa.Connection, row) -> dict:
        """The SLA fields of a TicketEvent, computed for the ticket as it is in this change
        (once per transaction and ticket version: a change publishes several events, and its
        `changed` hook stores the same computation)."""
        fields = _memo(conn, "sla.fields")
        key = _key(row)
        if key not in fields:
            fields[key] = self._event_fields(conn, row)
        return dict(fields[key])

    def _event_fields(self, conn: sa.Connection, row) -> dict:
        (s,) = self.compute(conn, [row], row.update_time)
        return _fields_of(s)

    # timers -------------------------------------------------------------------------------
    def fire(self, conn: sa.Connection, timer: timers.Timer) -> None:
        """One sla.warn / sla.breach timer (`fire_batch` of one); a ticket held by a change
        raises, so the timer is retried."""
        retry = self.fire_batch(conn, [timer])
        if timer.key in retry:
            raise TicketBusy(retry[timer.key])

    @staticmethod
    def _notice(s: Computed, metric: str, managers: dict) -> str:
        """The system note telling of a breach (notify_manager), naming the team's manager."""
        manager = managers.get(str(s.ticket.team_id), "") if s.ticket.team_id else ""
        who = f"agents/{manager}" if manager else "—"
        name = s.policy.display_name
        return (
            f"SLA: مهلت {LABELS[metric]} گذشت (سیاست «{name}»). مدیر تیم: {who}\n"
            f"SLA breached: {metric.replace('_', ' ')} (policy «{name}»). Team manager: {who}."
        )

    def _actions(self, tx, s: Computed, metric: str) -> list[str]:
        """The breach actions of the policy that change the ticket (notify_manager's notes are
        added for the whole batch beforehand); their changes go through ticketing (its hooks
        recompute the ticket again: a raised priority may select another policy)."""
        row, wanted = s.ticket, set(s.policy.breach_actions or ())
        taken = ["notify_manager"] if "notify_manager" in wanted else []
        tickets_ = self.support.tickets
        reason = f"sla {metric} breached"
        if "raise_priority" in wanted and row.priority in PRIORITY_UP:
            tickets_.update(
                tx, row.id, {"priority": PRIORITY_UP[row.priority]}, ACTOR, routing_key="ticket.escalated.v1",
                reason=reason,
            )  # fmt: skip
            taken.append("raise_priority")
        if "reassign" in wanted and row.assignee_id:
            tickets_.update(tx, row.id, {"assignee_id": ""}, ACTOR, reason=reason)
            taken.append("reassign")
        return taken

    def fire_batch(self, conn: sa.Connection, due: list[timers.Timer]) -> dict[str, str]:
        """sla.warn / sla.breach, many timers of one kind at once (the timer worker's batch
        handler). Recompute first (a clock may have paused or a policy changed); each metric
        really due and not yet flagged is flagged, its event published and (breach) the
        policy's actions taken. Returns {timer key: reason} of the timers to retry.

        The tickets are locked SKIP LOCKED, in id order: a ticket held by a change is left out
        (that change wins; its timer is retried soon), so the timer rows and a ticket are never
        waited on in the other order (the change holding the ticket may be waiting for its timer
        rows, which this transaction holds). One `compute` and one `store` for the batch; the
        events by one `publish_many`; the actions per ticket where the policy asks."""
        if not due:
            return {}
        level = "warned" if due[0].kind == WARN else "breached"
        wanted: dict[str, list[tuple[timers.Timer, str]]] = {}
        for t in due:
            tid, _, metric = t.key.rpartition(":")
            wanted.setdefault(tid, []).append((t, metric))
        ids = sorted(wanted)
        rows = conn.execute(
            sa.select(tickets).where(tickets.c.id.in_(ids)).order_by(tickets.c.id).with_for_update(skip_locked=True)
        ).all()
        got = {str(r.id) for r in rows}
        retry: dict[str, str] = {}
        missing = [i for i in ids if i not in got]
        if missing:  # locked by a change, or gone (then there is nothing to do)
            busy = conn.execute(sa.select(tickets.c.id).where(tickets.c.id.in_(missing))).scalars()
            for tid in busy:
                for t, _ in wanted[str(tid)]:
                    retry[t.key] = f"ticket {tid} is locked by another transaction; retried"
        if not rows:
            return retry
        now = conn.execute(sa.select(sa.func.now())).scalar()
        states = self.compute(conn, rows, now)
        fired: list[tuple[Computed, str, Clock]] = []
        for s in states:
            for _, metric in wanted[str(s.ticket.id)]:
                c = s.clocks.get(metric)
                at = None if c is None else (c.warn if level == "warned" else c.due)
                if c is None or not c.running or at is None or at > now or s.flags[metric][level]:
                    continue
                s.flags[metric][level] = True
                if level == "breached":
                    s.flags[metric]["warned"] = True  # no warning after the breach
                fired.append((s, metric, c))
        self.store(conn, states, force=True)
        if fired:
            self._publish_fired(conn, fired, level, now)
        return retry

    def _publish_fired(self, conn: sa.Connection, fired: list, level: str, now: dt.datetime) -> None:
        """The breach actions (where its policy asks) and the SLA events of a batch: the
        managers' notes of the whole batch set-based (Tickets.add_notes, their events' SLA
        fields those just computed: a note changes no clock), then the actions that change a
        ticket one by one, then the SLA events by one publish_many."""
        with self.support.uow.joined(conn) as tx:
            if level == "breached":
                notify = [(s, m) for s, m, _ in fired if "notify_manager" in (s.policy.breach_actions or ())]
                if notify:
                    team_ids = sorted({str(s.ticket.team_id) for s, _ in notify if s.ticket.team_id})
                    managers = {
                        str(i): m or ""
                        for i, m in conn.execute(
                            sa.select(teams.c.id, teams.c.manager_id).where(teams.c.id.in_(team_ids))
                        )
                    }
                    by_id = {str(s.ticket.id): s for s, _ in notify}

                    def prime(rows) -> None:
                        fields = _memo(conn, "sla.fields")
                        for r in rows:
                            fields.setdefault(_key(r), _fields_of(by_id[str(r.id)]))

                    self.support.tickets.add_notes(
                        tx,
                        [(str(s.ticket.id), self._notice(s, m, managers)) for s, m in notify],
                        author="sla",
                        actor=ACTOR,
                        prime=prime,
                    )
            items = []
            for s, metric, c in fired:
                row = s.ticket
                actions = self._actions(tx, s, metric) if level == "breached" else []
                e = ev_pb.SlaEvent(
                    ticket=TICKET.format(row.id),
                    policy=POLICY.format(s.policy.id),
                    metric=metric,
                    team=f"teams/{row.team_id}" if row.team_id else "",
                    assignee=f"agents/{row.assignee_id}" if row.assignee_id else "",
                    customer=f"customers/{row.customer_id}" if row.customer_id else "",
                    actions=actions,
                )
                e.due_time.FromDatetime(c.due)
                e.event_time.FromDatetime(now)
                items.append((TICKET.format(row.id), e))
            key = "ticket.sla_warning.v1" if level == "warned" else "ticket.sla_breached.v1"
            tx.publish_many(key, items)

    # policies -----------------------------------------------------------------------------
    @staticmethod
    def tickets_of_policy(conn: sa.Connection, policy_id: str) -> list[str]:
        """Open tickets whose policy it is or that it matches (one statement)."""
        p = sla_policies.alias("p")
        t = tickets
        frm, rank = _with_rank(t.join(p, p.c.id == policy_id).outerjoin(ticket_sla, ticket_sla.c.ticket_id == t.c.id))
        q = (
            sa.select(t.c.id)
            .select_from(frm)
            .where(
                t.c.state.in_(OPEN_STATES),
                sa.or_(ticket_sla.c.policy_id == policy_id, match_clause(p, t.c.priority, t.c.category_id, rank)),
            )
        )
        return [str(i) for i in conn.execute(q).scalars()]

    @staticmethod
    def tickets_of_calendar(conn: sa.Connection, calendar_id: str | None) -> list[str]:
        """Open tickets of the teams working by the calendar (None: every open ticket)."""
        q = sa.select(tickets.c.id).where(tickets.c.state.in_(OPEN_STATES))
        if calendar_id is not None:
            q = q.join(teams, teams.c.id == tickets.c.team_id).where(teams.c.calendar_id == calendar_id)
        return [str(i) for i in conn.execute(q).scalars()]

    @staticmethod
    def release(conn: sa.Connection, policy_id: str) -> list[str]:
        """A deactivated policy lets its open tickets go, set-based: their timers cancelled and
        their policy cleared in two statements; returns their ids (to re-select a policy)."""
        open_of = (
            sa.select(ticket_sla.c.ticket_id)
            .join(tickets, tickets.c.id == ticket_sla.c.ticket_id)
            .where(ticket_sla.c.policy_id == policy_id, tickets.c.state.in_(OPEN_STATES))
        )
        keys = sa.union_all(
            *[
                sa.select(sa.cast(ticket_sla.c.ticket_id, sa.Text) + f":{m}")
                .join(tickets, tickets.c.id == ticket_sla.c.ticket_id)
                .where(ticket_sla.c.policy_id == policy_id, tickets.c.state.in_(OPEN_STATES))
                for m in METRICS
            ]
        )
        # The tickets first, in id order (as every change does): the trigger on ticket_sla writes
        # their SLA summary (migration 0013), which must not wait for a change holding a ticket
        # while this transaction holds its ticket_sla row.
        conn.execute(sa.select(tickets.c.id).where(tickets.c.id.in_(open_of)).order_by(tickets.c.id).with_for_update())
        t = timers.timers
        # A timer firing right now is skipped (its row is locked): its handler recomputes, and
        # the re-selection after this commit locks the ticket after it and sets it right.
        # Waiting for it instead could deadlock with that handler arming the ticket's other timer.
        pending = sa.select(t.c.id).where(t.c.kind.in_(KINDS), t.c.key.in_(keys)).with_for_update(skip_locked=True)
        conn.execute(t.delete().where(t.c.id.in_(pending.scalar_subquery())))
        released = conn.execute(
            ticket_sla.update()
            .where(ticket_sla.c.ticket_id.in_(open_of))
            .values(
                policy_id=None,
                first_response_due=None,
                next_response_due=None,
                resolution_due=None,
                computed_at=sa.func.now(),
            )
            .returning(ticket_sla.c.ticket_id)
        ).scalars()
        return [str(i) for i in released]


def engine(support: Support) -> Engine:
    return support.once("sla", lambda: Engine(support))


# -- the part ---------------------------------------------------------------------------------
def install(support: Support) -> None:
    eng = engine(support)

    def opened(tx, row):
        eng.recompute(tx.conn, [row], row.update_time)

    def changed(tx, before, after):
        # Messages need no hook of their own: a customer or agent message, and any message that
        # moves the state, runs `changed` too (ticketing); notes move no clock.
        eng.recompute(tx.conn, [after], after.update_time)

    support.hooks.opened.append(opened)
    support.hooks.changed.append(changed)
    support.hooks.event_fields.append(eng.event_fields)


def timer_handlers(support: Support) -> None:
    eng = engine(support)
    for kind in KINDS:
        support.timers.register_batch(kind, eng.fire_batch, max_attempts=20)


class TicketBusy(Exception):
    """The ticket of an SLA timer is held by a change: the firing is retried."""
