"""Durable timers: "do X at time T", kept in the service's database.

Schedule inside the caller's transaction, so a state change and its timer commit together::

    from crm_chassis import timers

    with engine.begin() as conn:
        conn.execute(tickets.update()...)                       # the ticket opens
        timers.schedule(conn, "ticket.sla", ticket_id, due, {"level": 1})
    ...
    timers.reschedule(conn, "ticket.sla", ticket_id, new_due)   # moved (False if none)
    timers.cancel(conn, "ticket.sla", ticket_id)                # resolved in time
    timers.schedule_many(conn, [("points.expire", member_id, lot_expiry, None)], keep_earlier=True)
                                                  # one timer per owner: the earliest wins
    timers.schedule_recurring(conn, "report.send", report_id, "0 8 * * sat")  # Asia/Tehran

and run a `TimerWorker` (start/stop/wake like the outbox relay) with a handler per kind::

    worker = TimerWorker(engine)

    @worker.handler("ticket.sla")
    def breach(conn, timer):  # runs in the transaction that also marks the timer done
        conn.execute(tickets.update().where(...).values(breached=True))

    @worker.batch_handler("ticket.warn")
    def warn(conn, due):  # many due timers of the kind at once, in one transaction
        ...               # may return {timer.key: reason} for those to retry later

Guarantees:
- A timer is identified by (kind, key): `schedule` sets or moves it (payload replaced, attempts
  reset), `cancel` removes it. Times are timezone-aware.
- Survives restarts and is shared by replicas: due rows are claimed in batches with
  FOR UPDATE SKIP LOCKED and a lease; a claim whose process died expires and another worker
  fires the timer. Only kinds with a handler in this process are claimed. A worker may run
  several claim loops (`loops`); SKIP LOCKED keeps their claims apart.
- The claimed timers of one kind fire together in one transaction: one statement locks them
  and checks, under the row locks, that the claim is still current (a row another transaction
  holds, e.g. a change moving it, is skipped and released for the next claim); the handlers
  run; one statement deletes the one-shots done, advances the recurring ones and sets the
  retries; one INSERT records the firings; one commit. A handler whose effects are only in
  this database takes effect exactly once; effects outside it (an e-mail, an RPC) happen at
  least once, so make them idempotent (key them by `timer.kind, timer.key, timer.due_at`).
- A plain handler runs in a savepoint of its own: one that raises rolls back only its own
  work. After a handler wrote to the timers table the rest of the batch is checked again, so
  a timer it cancelled or moved is not fired by the stale claim; a handler that moves or
  cancels its own timer is honoured (the bookkeeping only touches rows still under this claim).
  A transaction of plain handlers ends after `max_transaction_seconds` (the rest go on in the
  next), so slow handlers do not hold locks and commits back for long. It runs with a short
  lock_timeout (`lock_wait_seconds`): a handler that has to wait for a lock ends it (what is
  done commits, releasing the batch's timer rows, which a change holding that lock may be
  waiting for) and runs again alone, where it waits as long as it must — so batching adds no
  deadlock that firing one timer per transaction did not have.
- A batch handler runs once for the batch (in a savepoint); if it raises, the batch is fired
  one timer at a time (`handler(conn, [timer])`, a savepoint each), so one bad timer fails
  alone. A transaction that fails as a whole (at its commit, say) is done again one timer per
  transaction, and a timer whose own transaction fails so counts a failed attempt.
- A handler that raises (or a timer a batch handler returns for a retry) is retried with
  exponential back-off; after `max_attempts` a one-shot timer stays with state 'failed' and
  the error in `last_error` (see `get`); a recurring one records the failure and moves on to
  its next occurrence.
- Recurring timers take a cron expression (croniter: 5 fields, or 6 with seconds last) in a
  time zone (Asia/Tehran by default); when one fires, its next occurrence after now is armed
  (missed occurrences while no worker ran fire once, not once each).
- Lateness (fire time - due time, on the database clock; the fire time is when the
  transaction's handlers were done, just before its commit) is recorded per firing in
  `timer_firings`; `lateness()` gives count/p50/p95/max over a recent window, and the worker
  logs a warning for a firing later than `late_warning_seconds`.
- A claim that filled the batch is followed by the next claim at once; otherwise the worker
  sleeps until the next due time (at most `poll_seconds`) or a `wake()`.
- A batch handler holds its batch's timer rows while it runs: it must not wait for a lock
  that a transaction waiting for one of those rows could hold (lock with SKIP LOCKED or
  NOWAIT and return the busy ones for a retry, as support-svc's SLA and offer handlers do).

Why a table and not procrastinate: procrastinate (a well-kept PostgreSQL task queue) defers
through its own connection, so a timer could not commit in the caller's SQLAlchemy
transaction; it marks a job done in a statement of its own after the task returns (no
exactly-once effect for database handlers); it has no "move this timer" by key; its worker is
an asyncio loop with its own schema migrations outside Alembic; its periodic tasks are
declared in code, where a scheduled report is data. The outbox relay's claim pattern covers
what is needed in a few hundred lines; cron parsing is croniter's.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import socket
import threading
import time
import uuid
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from croniter import croniter
from sqlalchemy.dialects import postgresql as pg

from . import dates, jsonrows
from .db import cacheable
from .work_tables import timer_firings, timers
from .workers import PollingWorker

log = logging.getLogger("crm.timers")

DEFAULT_TIMEZONE = "Asia/Tehran"
ERROR_LIMIT = 2000  # characters of a handler's error kept


@dataclass(frozen=True)
class Timer:
    kind: str
    key: str
    due_at: dt.datetime
    payload: dict[str, Any]
    state: str = "scheduled"
    attempts: int = 0  # failed attempts so far
    last_error: str | None = None
    cron: str | None = None
    timezone: str | None = None
    fired_at: dt.datetime | None = None  # set while a handler runs: when this firing started

    @property
    def attempt(self) -> int:
        """1 on the first try of this occurrence, 2 on the first retry..."""
        return self.attempts + 1


Handler = Callable[[sa.Connection, Timer], None]


def _aware(at: dt.datetime, name: str = "at") -> dt.datetime:
    if not isinstance(at, dt.datetime) or at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime")
    return at


def next_occurrence(cron: str, timezone: str = DEFAULT_TIMEZONE, after: dt.datetime | None = None) -> dt.datetime:
    """The first time strictly after `after` (default now) that `cron` names, read as wall-clock
    time in `timezone`; returned in UTC."""
    if not croniter.is_valid(cron):
        raise ValueError(f"invalid cron expression {cron!r}")
    if not dates.is_time_zone(timezone):
        raise zoneinfo.ZoneInfoNotFoundError(f"unknown time zone {timezone!r}")
    tz = zoneinfo.ZoneInfo(timezone)
    base = _aware(after, "after") if after is not None else dt.datetime.now(dt.UTC)
    return croniter(cron, base.astimezone(tz)).get_next(dt.datetime).astimezone(dt.UTC)


_UPSERT_COLUMNS = ("kind", "key", "due_at", "next_attempt_at", "payload", "cron", "timezone")


def _upsert_statement():
    """The one upsert of a timer row, built once with bound parameters and kept as cacheable
    text (db.cacheable): SQLAlchemy compiles an ON CONFLICT statement on every execution."""
    stmt = pg.insert(timers).values({c: sa.bindparam(c, type_=timers.c[c].type) for c in _UPSERT_COLUMNS})
    moved = {c: stmt.excluded[c] for c in _UPSERT_COLUMNS if c not in ("kind", "key")}
    reset = {"state": "scheduled", "attempts": 0, "last_error": None, "lease_token": None, "lease_until": None}
    return cacheable(
        stmt.on_conflict_do_update(constraint="timers_kind_key", set_={**moved, **reset, "update_time": sa.func.now()})
    )


_UPSERT = _upsert_statement()


def upsert_sql(param: str = "rows", keep_earlier: bool = False, source: str | None = None) -> str:
    """SQL of the upsert of the timer rows in the jsonb parameter `param` (`upsert_rows` makes
    it), or of the rows of `source` (a SELECT of the caller's giving _UPSERT_COLUMNS in order:
    timers computed by the statement itself), for a statement of the caller's own (a CTE beside
    its other writes: one round trip). With `keep_earlier`, a scheduled timer due no later than
    the new time is left alone (no write at all: the WHERE of ON CONFLICT fails): "fire at the
    earliest of these times"."""
    rows = source if source is not None else jsonrows.select_rows("timers", _UPSERT_COLUMNS, param)
    sql = f"""INSERT INTO timers ({", ".join(_UPSERT_COLUMNS)}) {rows}
        ON CONFLICT ON CONSTRAINT timers_kind_key DO UPDATE SET
        {", ".join(f"{c} = EXCLUDED.{c}" for c in _UPSERT_COLUMNS if c not in ("kind", "key"))},
        state = 'scheduled', attempts = 0, last_error = NULL, lease_token = NULL, lease_until = NULL,
        update_time = now()"""
    if keep_earlier:
        sql += "\n        WHERE timers.state <> 'scheduled' OR EXCLUDED.due_at < timers.due_at"
    return sql


_UPSERT_MANY = sa.text(upsert_sql())
_UPSERT_EARLIER = sa.text(upsert_sql(keep_earlier=True))


def _upsert(conn: sa.Connection, values: dict[str, Any] | list[dict[str, Any]], keep_earlier: bool = False) -> None:
    """Insert or replace timer rows (kind, key, due_at, payload, cron, timezone): attempts
    reset, error and lease cleared. Several rows go as one statement (one round trip). With
    `keep_earlier`, an existing scheduled timer due at or before the new time stays as it is."""
    rows = values if isinstance(values, list) else [values]
    if not rows:
        return
    params = [{**r, "next_attempt_at": r["due_at"]} for r in rows]
    if keep_earlier:
        conn.execute(_UPSERT_EARLIER, {"rows": jsonrows.dumps(params)})
    elif len(params) > 1:  # one statement, the rows as one jsonb parameter (crm_chassis.jsonrows)
        conn.execute(_UPSERT_MANY, {"rows": jsonrows.dumps(params)})
    else:
        conn.execute(_UPSERT, params[0])


def schedule(conn: sa.Connection, kind: str, key: str, at: dt.datetime, payload: dict[str, Any] | None = None) -> None:
    """Set timer (kind, key) to fire at `at`, in the caller's transaction. An existing timer
    with that key (one-shot or recurring, even a failed one) is replaced."""
    schedule_many(conn, [(kind, key, at, payload)])


def schedule_many(conn: sa.Connection, items, *, keep_earlier: bool = False) -> None:
    """`schedule` for many timers at once: `items` are (kind, key, at, payload) tuples, written
    in one round trip. The same (kind, key) twice: the last one wins, as with `schedule` in turn.

    With `keep_earlier` a timer fires at the earliest time asked for: an existing scheduled
    timer due at or before `at` is left as it is (payload too; a failed one is replaced), and
    of the same (kind, key) twice the earlier wins. One timer per owner ("the next of its
    deadlines") instead of one per deadline; its handler arms the next one when it fires."""
    rows = _rows_of(items, keep_earlier)
    _upsert(conn, rows, keep_earlier)


def upsert_rows(items, keep_earlier: bool = False) -> str:
    """The jsonb parameter of `upsert_sql` for (kind, key, at, payload) items, as `schedule_many`
    takes them."""
    return jsonrows.dumps({**r, "next_attempt_at": r["due_at"]} for r in _rows_of(items, keep_earlier))


def _rows_of(items, keep_earlier: bool) -> list[dict[str, Any]]:
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for kind, key, at, payload in items:
        had = rows.get((kind, str(key)))
        if keep_earlier and had is not None and had["due_at"] <= at:
            continue
        rows[(kind, str(key))] = {
            "kind": kind,
            "key": str(key),
            "due_at": _aware(at),
            "payload": payload or {},
            "cron": None,
            "timezone": None,
        }
    return list(rows.values())


def schedule_recurring(
    conn: sa.Connection,
    kind: str,
    key: str,
    cron: str,
    payload: dict[str, Any] | None = None,
    timezone: str = DEFAULT_TIMEZONE,
    after: dt.datetime | None = None,
) -> dt.datetime:
    """Set timer (kind, key) to fire at every time `cron` names in `timezone` (from the first
    after `after`, default now); returns the first due time (UTC). ValueError on a bad cron
    expression or time zone."""
    try:
        first = next_occurrence(cron, timezone, after)
    except zoneinfo.ZoneInfoNotFoundError:
        raise ValueError(f"unknown time zone {timezone!r}") from None
    _upsert(
        conn,
        {"kind": kind, "key": str(key), "due_at": first, "payload": payload or {}, "cron": cron, "timezone": timezone},
    )
    return first


def reschedule(conn: sa.Connection, kind: str, key: str, at: dt.datetime) -> bool:
    """Move an existing timer to `at` (payload kept, attempts reset); False if there is none.
    A recurring timer fires once at `at`, then follows its schedule again."""
    at = _aware(at)
    return bool(
        conn.execute(
            timers.update()
            .where(timers.c.kind == kind, timers.c.key == str(key))
            .values(
                due_at=at,
                next_attempt_at=at,
                state="scheduled",
                attempts=0,
                last_error=None,
                lease_token=None,
                lease_until=None,
                update_time=sa.func.now(),
            )
        ).rowcount
    )


def cancel(conn: sa.Connection, kind: str, key: str) -> bool:
    """Remove timer (kind, key); False if there was none. A firing already in flight for it
    is not completed (its handler's transaction waits for this one, then finds no timer)."""
    return bool(conn.execute(timers.delete().where(timers.c.kind == kind, timers.c.key == str(key))).rowcount)


_CANCEL_MANY = sa.text(
    """
DELETE FROM timers t
 USING unnest(CAST(:kinds AS text[]), CAST(:keys AS text[])) AS d(kind, key)
 WHERE t.kind = d.kind AND t.key = d.key
"""
)


def cancel_many(conn: sa.Connection, items) -> int:
    """`cancel` for many timers in one statement: `items` are (kind, key) pairs; returns how many
    there were."""
    pairs = list(dict.fromkeys((kind, str(key)) for kind, key in items))
    if not pairs:
        return 0
    return conn.execute(_CANCEL_MANY, {"kinds": [k for k, _ in pairs], "keys": [k for _, k in pairs]}).rowcount


def _to_timer(row, fired_at: dt.datetime | None = None) -> Timer:
    return Timer(
        kind=row.kind,
        key=row.key,
        due_at=row.due_at,
        payload=dict(row.payload or {}),
        state=row.state,
        attempts=row.attempts,
        last_error=row.last_error,
        cron=row.cron,
        timezone=row.timezone,
        fired_at=fired_at,
    )


def get(conn: sa.Connection, kind: str, key: str) -> Timer | None:
    """The timer (kind, key) as stored (None when there is none, e.g. a one-shot that fired)."""
    row = conn.execute(sa.select(timers).where(timers.c.kind == kind, timers.c.key == str(key))).one_or_none()
    return None if row is None else _to_timer(row)


@dataclass(frozen=True)
class Lateness:
    """Seconds between due time and fire time over successful firings in a window."""

    count: int
    p50: float | None
    p95: float | None
    max: float | None


def lateness(conn: sa.Connection, kind: str | None = None, window: dt.timedelta = dt.timedelta(hours=1)) -> Lateness:
    """p50/p95/max lateness of the successful firings of the last `window` (of `kind`, or all)."""
    f = timer_firings.c
    lat = f.lateness_seconds
    q = sa.select(
        sa.func.count(),
        sa.func.percentile_cont(0.5).within_group(lat),
        sa.func.percentile_cont(0.95).within_group(lat),
        sa.func.max(lat),
    ).where(f.ok, f.fired_at >= sa.func.now() - sa.literal(window, sa.Interval))
    if kind is not None:
        q = q.where(f.kind == kind)
    count, p50, p95, top = conn.execute(q).one()
    return Lateness(int(count), p50, p95, top)


BatchHandler = Callable[[sa.Connection, list[Timer]], Mapping[str, str] | None]


@dataclass
class _Kind:
    handler: Handler | None
    max_attempts: int
    batch: BatchHandler | None = None


@dataclass
class _Outcome:
    row: Any  # the timer row as locked (with fired_at)
    error: str | None  # None: done


# Lock and verify the claimed rows of one transaction: still ours (lease token), not locked by
# another transaction (a change cancelling or moving one: skipped, released after the commit).
_LOCK = (
    sa.select(timers, sa.func.clock_timestamp().label("fired_at"))
    .where(timers.c.id.in_(sa.bindparam("ids", expanding=True)), timers.c.lease_token == sa.bindparam("token"))
    .order_by(timers.c.next_attempt_at, timers.c.id)
    .with_for_update(skip_locked=True)
)

# Which of these rows are still ours (after a handler wrote to the timers table).
_CURRENT = sa.select(timers.c.id).where(
    timers.c.id.in_(sa.bindparam("ids", expanding=True)), timers.c.lease_token == sa.bindparam("token")
)

# The done and failed timers of a transaction in one statement: one-shots that fired are
# deleted; recurring ones advance (due), failed ones get their retry time (delay) or state
# 'failed'. Rows whose lease is no longer this claim's (the handler moved or cancelled its own
# timer) are left as they are.
_FINISH = sa.text(
    """
WITH v AS (
  SELECT * FROM unnest(CAST(:ids AS bigint[]), CAST(:ops AS text[]), CAST(:dues AS timestamptz[]),
                       CAST(:delays AS float8[]), CAST(:attempts AS int[]), CAST(:states AS text[]),
                       CAST(:errors AS text[]))
         AS v(id, op, due_at, delay, attempts, state, error)
), gone AS (
  DELETE FROM timers t USING v
   WHERE v.op = 'delete' AND t.id = v.id AND t.lease_token = CAST(:token AS uuid)
)
UPDATE timers t
   SET due_at = coalesce(v.due_at, t.due_at),
       next_attempt_at = CASE WHEN v.due_at IS NOT NULL THEN v.due_at
                              WHEN v.delay IS NOT NULL THEN now() + make_interval(secs => v.delay)
                              ELSE t.next_attempt_at END,
       attempts = v.attempts,
       state = coalesce(v.state, t.state),
       last_error = CASE WHEN v.op = 'failed' THEN v.error ELSE t.last_error END,
       lease_token = NULL,
       lease_until = NULL,
       update_time = now()
  FROM v
 WHERE v.op <> 'delete' AND t.id = v.id AND t.lease_token = CAST(:token AS uuid)
"""
)

# The firings of a transaction, one multi-row INSERT; fired_at is when the handlers were done.
_RECORD = sa.text(
    """
INSERT INTO timer_firings (kind, key, due_at, fired_at, lateness_seconds, attempt, ok, error)
SELECT kind, key, due_at, clock_timestamp(), extract(epoch FROM clock_timestamp() - due_at), attempt, ok, error
  FROM unnest(CAST(:kinds AS text[]), CAST(:keys AS text[]), CAST(:dues AS timestamptz[]),
              CAST(:attempts AS int[]), CAST(:oks AS boolean[]), CAST(:errors AS text[]))
       AS f(kind, key, due_at, attempt, ok, error)
RETURNING key, lateness_seconds
"""
)

_TIMERS_TABLE = re.compile(r"\btimers\b", re.IGNORECASE)


_LOCK_WAITS = ("55P03", "40P01")  # lock_not_available (lock_timeout, NOWAIT), deadlock_detected


def _waited_for_a_lock(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 10:
        for e in (exc, getattr(exc, "orig", None)):
            if getattr(e, "sqlstate", None) in _LOCK_WAITS:
                return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:ERROR_LIMIT]


class _TimerWrites:
    """Notes whether a statement naming the timers table ran on `conn` (a handler scheduled,
    moved or cancelled a timer, maybe one later in the batch): the rest is then re-verified."""

    def __init__(self, conn: sa.Connection):
        self.conn = conn
        self.dirty = False

    def _seen(self, conn, cursor, statement, parameters, context, executemany):
        if not self.dirty and _TIMERS_TABLE.search(statement):
            self.dirty = True

    def __enter__(self):
        sa.event.listen(self.conn, "before_cursor_execute", self._seen)
        return self

    def __exit__(self, *exc):
        sa.event.remove(self.conn, "before_cursor_execute", self._seen)


class TimerWorker(PollingWorker):
    """Fires due timers of the kinds it has handlers for. One per process (with `loops` claim
    loops); replicas share."""

    name = "timer-worker"

    def __init__(
        self,
        engine: sa.Engine,
        handlers: dict[str, Handler] | None = None,
        *,
        batch_size: int = 100,
        poll_seconds: float = 1.0,
        lease_seconds: float = 60.0,
        max_attempts: int = 5,
        backoff_seconds: float = 1.0,
        max_backoff_seconds: float = 300.0,
        retention_days: float = 7.0,
        late_warning_seconds: float = 30.0,
        max_transaction_seconds: float = 1.0,
        lock_wait_seconds: float = 0.1,
        loops: int = 1,
        worker_id: str | None = None,
    ):
        self.engine = engine
        self.batch_size = batch_size
        self.poll_seconds = poll_seconds
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.backoff_seconds = backoff_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self.retention_days = retention_days
        self.late_warning_seconds = late_warning_seconds
        self.max_transaction_seconds = max_transaction_seconds
        self.lock_wait_seconds = lock_wait_seconds
        self.loops = max(1, loops)
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._kinds: dict[str, _Kind] = {}
        for kind, fn in (handlers or {}).items():
            self.register(kind, fn)
        super().__init__()
        self._threads: list[threading.Thread] = []
        self._count_lock = threading.Lock()
        self._next_cleanup = 0.0
        self.fired_total = 0
        self.failed_total = 0
        self._full = threading.local()  # per claim loop: whether its last claim was a full batch

    # -- handlers ----------------------------------------------------------------------------
    def register(self, kind: str, handler: Handler, *, max_attempts: int | None = None) -> None:
        """Fire timers of `kind` with `handler(conn, timer)` (in the firing's transaction, in a
        savepoint of its own; it must not commit). Register before start()."""
        self._kinds[kind] = _Kind(handler, max_attempts or self.max_attempts)

    def register_batch(self, kind: str, handler: BatchHandler, *, max_attempts: int | None = None) -> None:
        """Fire the due timers of `kind` together: `handler(conn, timers)` once for a batch (in
        one transaction; it must not commit). It may return {timer.key: reason} for timers it
        could not do now (e.g. a row locked by a change): those count as a failed attempt and are
        retried with back-off. If it raises, the batch is fired one timer at a time
        (`handler(conn, [timer])`, a savepoint each), so one bad timer fails alone."""
        self._kinds[kind] = _Kind(None, max_attempts or self.max_attempts, handler)

    def batch_handler(self, kind: str, **options: Any) -> Callable[[Callable], Callable]:
        """Decorator form of `register_batch`."""

        def deco(fn: Callable) -> Callable:
            self.register_batch(kind, fn, **options)
            return fn

        return deco

    # -- running -----------------------------------------------------------------------------
    def start(self) -> None:
        self._stopping.clear()
        self._threads = [
            threading.Thread(target=self._run, name=f"{self.name}-{i}" if i else self.name, daemon=True)
            for i in range(self.loops)
        ]
        self._thread = self._threads[0]
        for t in self._threads:
            t.start()

    def _join(self, timeout: float) -> None:
        end = time.monotonic() + max(0.0, timeout)
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the transaction in progress, release the rest of the claimed batch, stop."""
        self._signal_stop()
        self._join(timeout)

    # -- work --------------------------------------------------------------------------------
    def run_once(self) -> int:
        """Claim one batch of due timers and fire them; return how many firings ran."""
        self._full.value = False
        if not self._kinds:
            return 0
        token = str(uuid.uuid4())
        claimed = self._claim(token)
        self._full.value = len(claimed) >= self.batch_size
        groups: dict[str, list[int]] = {}
        for r in claimed:  # in due order; one kind at a time
            groups.setdefault(r.kind, []).append(r.id)
        pending = [r.id for r in claimed]  # claimed and not fired yet
        done = 0
        try:
            for kind, ids in groups.items():
                left = ids
                while left and not self._stopping.is_set():
                    n, rest, skipped = self._fire_group(kind, left, token)
                    done += n
                    finished = set(left) - set(rest)
                    pending = [i for i in pending if i not in finished]
                    if skipped:  # held by another transaction: let them be claimed again
                        self._release(token, skipped)
                    left = rest
                if self._stopping.is_set():
                    break
        finally:
            if pending:  # stopping, or a transaction failed: others may take the rest now
                try:
                    self._release(token, pending)
                except sa.exc.SQLAlchemyError:
                    pass  # their leases expire instead
        return done

    def _claim(self, token: str) -> list:
        t = timers.c
        due = (
            sa.select(t.id)
            .where(
                t.state == "scheduled",
                t.kind.in_(list(self._kinds)),
                t.next_attempt_at <= sa.func.now(),
                sa.or_(t.lease_until.is_(None), t.lease_until < sa.func.now()),
            )
            .order_by(t.next_attempt_at)
            .limit(self.batch_size)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        with self.engine.begin() as conn:
            rows = conn.execute(
                timers.update()
                .where(t.id.in_(due))
                .values(
                    lease_token=token,
                    lease_until=sa.func.now() + sa.literal(dt.timedelta(seconds=self.lease_seconds), sa.Interval),
                )
                .returning(t.id, t.kind, t.next_attempt_at)
            ).all()
        return sorted(rows, key=lambda r: (r.next_attempt_at, r.id))

    def _release(self, token: str, ids: list[int]) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                timers.update()
                .where(timers.c.id.in_(ids), timers.c.lease_token == token)
                .values(lease_token=None, lease_until=None)
            )

    def _fire_group(self, kind: str, ids: list[int], token: str) -> tuple[int, list[int], list[int]]:
        """Fire claimed timers of one kind in one transaction: (firings, ids left for another
        transaction, ids skipped because another transaction holds them). A transaction that
        fails as a whole (at commit, say) is done again one timer per transaction, and a timer
        whose own transaction fails so is recorded as a failed attempt."""
        spec = self._kinds[kind]
        try:
            return self._transaction(spec, ids, token)
        except sa.exc.SQLAlchemyError as exc:
            if len(ids) == 1:
                self._attempt_failed(spec, ids[0], token, _error_text(exc))
                return 1, [], []
            log.warning("timer batch failed; firing its timers one by one", extra={"kind": kind, "error": str(exc)})
        done, skipped = 0, []
        for i, tid in enumerate(ids):
            if self._stopping.is_set():
                return done, ids[i:], skipped
            try:
                n, _, sk = self._transaction(spec, [tid], token)
            except sa.exc.SQLAlchemyError as exc:
                self._attempt_failed(spec, tid, token, _error_text(exc))
                n, sk = 1, []
            done += n
            skipped += sk
        return done, [], skipped

    def _transaction(self, spec: _Kind, ids: list[int], token: str) -> tuple[int, list[int], list[int]]:
        deadline = time.monotonic() + self.max_transaction_seconds
        alone = None
        with self.engine.begin() as conn:
            rows = conn.execute(_LOCK, {"ids": ids, "token": token}).all()
            locked = {r.id for r in rows}
            skipped = [i for i in ids if i not in locked]  # not ours any more, or held by a change
            if spec.batch is not None:
                outcomes, left = self._run_batch(conn, spec, rows, token), []
            else:
                shared = len(rows) > 1 and self.lock_wait_seconds > 0
                if shared:  # see _run_each: a handler waiting for a lock must not hold the others
                    conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{max(1, int(self.lock_wait_seconds * 1000))}ms'")
                outcomes, left, alone = self._run_each(conn, spec.handler, rows, token, deadline, shared)
            records = self._finish(conn, spec, outcomes, token)
        self._count(outcomes, records)
        done = len(outcomes)
        if alone is not None:  # in a transaction of its own it may wait as long as it must
            n, _, more = self._transaction(spec, [alone], token)
            done += n
            skipped += more
            left = [i for i in left if i != alone]
        return done, left, skipped

    def _run_batch(self, conn: sa.Connection, spec: _Kind, rows: list, token: str) -> list[_Outcome]:
        if not rows:
            return []
        try:
            with conn.begin_nested():
                retry = spec.batch(conn, [_to_timer(r, r.fired_at) for r in rows]) or {}
        except Exception as exc:
            if len(rows) == 1:
                return [_Outcome(rows[0], _error_text(exc))]
            log.warning(
                "batch timer handler failed; firing one at a time",
                extra={"kind": rows[0].kind, "timers": len(rows), "error": _error_text(exc)},
            )
            return self._run_each(conn, lambda c, t: self._single(spec, c, t), rows, token, None)[0]
        return [_Outcome(r, retry[r.key][:ERROR_LIMIT] if r.key in retry else None) for r in rows]

    @staticmethod
    def _single(spec: _Kind, conn: sa.Connection, timer: Timer) -> None:
        retry = spec.batch(conn, [timer]) or {}
        if timer.key in retry:
            raise _Retry(retry[timer.key])

    def _run_each(self, conn, handler, rows, token, deadline, shared=False):
        """Per-timer handlers, a savepoint each: (outcomes, ids left for the next transaction,
        the id of a timer to fire alone). Stops early when stopping or past `deadline`.
        Re-verifies the rest of the batch after a handler wrote to the timers table (it may have
        moved or cancelled one of them). In a `shared` transaction (several timers, a short
        lock_timeout) a handler that has to wait for a lock (or meets a deadlock) ends it: what
        is done commits, releasing the batch's timer rows (a change holding that lock may be
        waiting for one of them), and it runs again alone."""
        out: list[_Outcome] = []
        gone: set[int] = set()
        with _TimerWrites(conn) as writes:
            for i, r in enumerate(rows):
                if i and (self._stopping.is_set() or (deadline is not None and time.monotonic() > deadline)):
                    return out, [x.id for x in rows[i:]], None
                if writes.dirty:
                    rest = [x.id for x in rows[i:]]
                    current = set(conn.execute(_CURRENT, {"ids": rest, "token": token}).scalars())
                    gone |= set(rest) - current
                    writes.dirty = False
                if r.id in gone:  # moved or cancelled by an earlier handler of this transaction
                    continue
                error = None
                try:
                    with conn.begin_nested():
                        handler(conn, _to_timer(r, r.fired_at))
                except _Retry as exc:
                    error = str(exc)[:ERROR_LIMIT]
                except Exception as exc:
                    if shared and _waited_for_a_lock(exc):
                        return out, [x.id for x in rows[i:]], r.id
                    error = _error_text(exc)
                out.append(_Outcome(r, error))
        return out, [], None

    def _finish(self, conn: sa.Connection, spec: _Kind, outcomes: list[_Outcome], token: str) -> list:
        """Set-based bookkeeping: done/failed timers in one statement, the firings in another."""
        if not outcomes:
            return []
        cols: dict[str, list] = {k: [] for k in ("ids", "ops", "dues", "delays", "attempts", "states", "errors")}

        def add(row, op, due=None, delay=None, attempts=0, state=None, error=None):
            for k, v in zip(cols, (row.id, op, due, delay, attempts, state, error), strict=True):
                cols[k].append(v)

        for o in outcomes:
            r = o.row
            if o.error is None:
                if r.cron:
                    add(r, "advance", due=self._next(r))
                else:
                    add(r, "delete")
                continue
            attempts = r.attempts + 1
            if attempts < spec.max_attempts:
                delay = min(self.backoff_seconds * 2 ** (attempts - 1), self.max_backoff_seconds)
                add(r, "failed", delay=delay, attempts=attempts, error=o.error)
            elif r.cron:  # give this occurrence up; the schedule goes on
                add(r, "failed", due=self._next(r), attempts=0, error=o.error)
                log.error(
                    "recurring timer gave up an occurrence", extra={"kind": r.kind, "key": r.key, "error": o.error}
                )
            else:
                add(r, "failed", attempts=attempts, state="failed", error=o.error)
                log.error("timer gave up", extra={"kind": r.kind, "key": r.key, "attempts": attempts, "error": o.error})
        conn.execute(_FINISH, {**cols, "token": token})
        return conn.execute(
            _RECORD,
            {
                "kinds": [o.row.kind for o in outcomes],
                "keys": [o.row.key for o in outcomes],
                "dues": [o.row.due_at for o in outcomes],
                "attempts": [o.row.attempts + 1 for o in outcomes],
                "oks": [o.error is None for o in outcomes],
                "errors": [o.error for o in outcomes],
            },
        ).all()

    @staticmethod
    def _next(row) -> dt.datetime:
        return next_occurrence(row.cron, row.timezone or DEFAULT_TIMEZONE, max(row.due_at, row.fired_at))

    def _attempt_failed(self, spec: _Kind, timer_id: int, token: str, error: str) -> None:
        """A timer whose transaction failed as a whole (not in its handler): a failed attempt,
        recorded in a transaction of its own, so it backs off instead of blocking the others."""
        log.warning("timer transaction failed", extra={"timer_id": timer_id, "error": error})
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(timers, sa.func.clock_timestamp().label("fired_at"))
                .where(timers.c.id == timer_id, timers.c.lease_token == token)
                .with_for_update()
            ).one_or_none()
            if row is None:
                return
            outcomes = [_Outcome(row, error)]
            records = self._finish(conn, spec, outcomes, token)
        self._count(outcomes, records)

    def _count(self, outcomes: list[_Outcome], records: list) -> None:
        late = dict(records)
        ok = sum(1 for o in outcomes if o.error is None)
        with self._count_lock:
            self.fired_total += ok
            self.failed_total += len(outcomes) - ok
        for o in outcomes:
            r = o.row
            extra = {
                "kind": r.kind,
                "key": r.key,
                "lateness_seconds": round(late.get(r.key, 0.0), 3),
                "attempt": r.attempts + 1,
            }
            if o.error is not None:
                log.warning("timer handler failed", extra={**extra, "error": o.error})
            elif extra["lateness_seconds"] > self.late_warning_seconds:
                log.warning("timer fired late", extra=extra)
            elif log.isEnabledFor(logging.DEBUG):
                log.debug("timer fired", extra=extra)

    def cleanup(self) -> int:
        """Delete firing records older than retention_days."""
        with self.engine.begin() as conn:
            return conn.execute(
                timer_firings.delete().where(
                    timer_firings.c.fired_at
                    < sa.func.now() - sa.literal(dt.timedelta(days=self.retention_days), sa.Interval)
                )
            ).rowcount

    def _log_lateness(self) -> None:
        """Every ten minutes: the lateness of the last ten minutes' firings, all replicas."""
        with self.engine.connect() as conn:
            figures = lateness(conn, window=dt.timedelta(minutes=10))
        if figures.count:
            log.info(
                "timer lateness",
                extra={
                    "firings": figures.count,
                    "p50_seconds": round(figures.p50, 3),
                    "p95_seconds": round(figures.p95, 3),
                    "max_seconds": round(figures.max, 3),
                },
            )

    def _seconds_to_next(self) -> float:
        t = timers.c
        with self.engine.connect() as conn:
            wait = conn.execute(
                sa.select(sa.func.extract("epoch", sa.func.min(t.next_attempt_at) - sa.func.now())).where(
                    t.state == "scheduled", t.kind.in_(list(self._kinds)), t.lease_until.is_(None)
                )
            ).scalar()
        return self.poll_seconds if wait is None else max(0.02, min(float(wait), self.poll_seconds))

    def _run(self) -> None:
        backoff = 0.2
        first = threading.current_thread() is self._thread
        while not self._stopping.is_set():
            try:
                self.run_once()
                backoff = 0.2
                if getattr(self._full, "value", False):
                    continue  # a full batch: more may be due right now, claim again at once
                if first and time.monotonic() >= self._next_cleanup:
                    self._next_cleanup = time.monotonic() + 600
                    self.cleanup()
                    self._log_lateness()
                self._idle(self._seconds_to_next())
            except sa.exc.SQLAlchemyError as exc:
                log.warning("timer database error", extra={"error": str(exc)})
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:
                log.exception("timer worker error")
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)


class _Retry(Exception):
    """A batch handler fired alone said its timer is to be retried (the reason as message)."""
