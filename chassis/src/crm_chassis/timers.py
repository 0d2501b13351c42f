"""Durable timers: "do X at time T", kept in the service's database.

Schedule inside the caller's transaction, so a state change and its timer commit together::

    from crm_chassis import timers

    with engine.begin() as conn:
        conn.execute(tickets.update()...)                       # the ticket opens
        timers.schedule(conn, "ticket.sla", ticket_id, due, {"level": 1})
    ...
    timers.reschedule(conn, "ticket.sla", ticket_id, new_due)   # moved (False if none)
    timers.cancel(conn, "ticket.sla", ticket_id)                # resolved in time
    timers.schedule_recurring(conn, "report.send", report_id, "0 8 * * sat")  # Asia/Tehran

and run a `TimerWorker` (start/stop/wake like the outbox relay) with a handler per kind::

    worker = TimerWorker(engine)

    @worker.handler("ticket.sla")
    def breach(conn, timer):  # runs in the transaction that also marks the timer done
        conn.execute(tickets.update().where(...).values(breached=True))

Guarantees:
- A timer is identified by (kind, key): `schedule` sets or moves it (payload replaced, attempts
  reset), `cancel` removes it. Times are timezone-aware.
- Survives restarts and is shared by replicas: due rows are claimed in batches with
  FOR UPDATE SKIP LOCKED and a lease; a claim whose process died expires and another worker
  fires the timer. Only kinds with a handler in this process are claimed.
- The handler runs in one transaction with marking the timer done (and re-checking, under the
  row lock, that the claim is still current): a handler whose effects are only in this
  database takes effect exactly once; effects outside it (an e-mail, an RPC) happen at least
  once, so make them idempotent (key them by `timer.kind, timer.key, timer.due_at`).
- A handler that raises is rolled back and retried with exponential back-off; after
  `max_attempts` a one-shot timer stays with state 'failed' and the error in `last_error`
  (see `get`); a recurring one records the failure and moves on to its next occurrence.
- Recurring timers take a cron expression (croniter: 5 fields, or 6 with seconds last) in a
  time zone (Asia/Tehran by default); when one fires, its next occurrence after now is armed
  (missed occurrences while no worker ran fire once, not once each).
- Lateness (fire time - due time, on the database clock) is recorded per firing in
  `timer_firings`; `lateness()` gives count/p50/p95/max over a recent window, and the worker
  logs a warning for a firing later than `late_warning_seconds`.

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
import socket
import time
import uuid
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from croniter import croniter
from sqlalchemy.dialects import postgresql as pg

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


def _upsert(conn: sa.Connection, values: dict[str, Any] | list[dict[str, Any]]) -> None:
    """Insert or replace timer rows (kind, key, due_at, payload, cron, timezone): attempts
    reset, error and lease cleared. Several rows go as one executemany (one round trip)."""
    rows = values if isinstance(values, list) else [values]
    if not rows:
        return
    params = [{**r, "next_attempt_at": r["due_at"]} for r in rows]
    conn.execute(_UPSERT, params if len(params) > 1 else params[0])


def schedule(conn: sa.Connection, kind: str, key: str, at: dt.datetime, payload: dict[str, Any] | None = None) -> None:
    """Set timer (kind, key) to fire at `at`, in the caller's transaction. An existing timer
    with that key (one-shot or recurring, even a failed one) is replaced."""
    schedule_many(conn, [(kind, key, at, payload)])


def schedule_many(conn: sa.Connection, items) -> None:
    """`schedule` for many timers at once: `items` are (kind, key, at, payload) tuples, written
    in one round trip. The same (kind, key) twice: the last one wins, as with `schedule` in turn."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for kind, key, at, payload in items:
        rows[(kind, str(key))] = {
            "kind": kind,
            "key": str(key),
            "due_at": _aware(at),
            "payload": payload or {},
            "cron": None,
            "timezone": None,
        }
    _upsert(conn, list(rows.values()))


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


@dataclass
class _Kind:
    handler: Handler
    max_attempts: int


class TimerWorker(PollingWorker):
    """Fires due timers of the kinds it has handlers for. One per process; replicas share."""

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
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._kinds: dict[str, _Kind] = {}
        for kind, fn in (handlers or {}).items():
            self.register(kind, fn)
        super().__init__()
        self._next_cleanup = 0.0
        self.fired_total = 0
        self.failed_total = 0

    # -- handlers ----------------------------------------------------------------------------
    def register(self, kind: str, handler: Handler, *, max_attempts: int | None = None) -> None:
        """Fire timers of `kind` with `handler(conn, timer)` (in the firing's transaction; it must
        not commit). Register before start()."""
        self._kinds[kind] = _Kind(handler, max_attempts or self.max_attempts)

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the firing in progress, release the rest of the claimed batch, stop."""
        self._signal_stop()
        self._join(timeout)

    # -- work --------------------------------------------------------------------------------
    def run_once(self) -> int:
        """Claim one batch of due timers and fire them; return how many firings ran."""
        if not self._kinds:
            return 0
        token = str(uuid.uuid4())
        claimed = self._claim(token)
        done, i = 0, 0
        try:
            for i, row in enumerate(claimed):  # noqa: B007 (i is read in finally)
                if self._stopping.is_set():
                    break
                if self._fire(row, token):
                    done += 1
            else:
                i = len(claimed)
        finally:
            if i < len(claimed):  # stopping, or a firing failed: others may take the rest now
                try:
                    self._release(token, [r.id for r in claimed[i:]])
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
        return sorted(rows, key=lambda r: r.next_attempt_at)

    def _release(self, token: str, ids: list[int]) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                timers.update()
                .where(timers.c.id.in_(ids), timers.c.lease_token == token)
                .values(lease_token=None, lease_until=None)
            )

    def _fire(self, claimed, token: str) -> bool:
        """One firing in its own transaction; False if the claim is no longer current."""
        t = timers.c
        spec = self._kinds[claimed.kind]
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(timers, sa.func.clock_timestamp().label("fired_at"))
                .where(t.id == claimed.id, t.lease_token == token)
                .with_for_update()
            ).one_or_none()
            if row is None:  # cancelled, moved, or taken over after our lease expired
                return False
            timer = _to_timer(row, row.fired_at)
            late = (row.fired_at - row.due_at).total_seconds()
            error = None
            try:
                with conn.begin_nested():
                    spec.handler(conn, timer)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"[:ERROR_LIMIT]
            current = conn.execute(sa.select(t.lease_token).where(t.id == row.id)).scalar_one_or_none()
            if current == token:  # the handler did not move or cancel its own timer
                if error is None:
                    self._done(conn, row)
                else:
                    self._failed(conn, row, spec, error)
            conn.execute(
                timer_firings.insert().values(
                    kind=row.kind,
                    key=row.key,
                    due_at=row.due_at,
                    fired_at=row.fired_at,
                    lateness_seconds=late,
                    attempt=row.attempts + 1,
                    ok=error is None,
                    error=error,
                )
            )
        extra = {"kind": row.kind, "key": row.key, "lateness_seconds": round(late, 3), "attempt": row.attempts + 1}
        if error is None:
            self.fired_total += 1
            if late > self.late_warning_seconds:
                log.warning("timer fired late", extra=extra)
            else:
                log.debug("timer fired", extra=extra)
        else:
            self.failed_total += 1
            log.warning("timer handler failed", extra={**extra, "error": error})
        return True

    def _done(self, conn: sa.Connection, row) -> None:
        t = timers.c
        if row.cron:
            nxt = next_occurrence(row.cron, row.timezone or DEFAULT_TIMEZONE, max(row.due_at, row.fired_at))
            conn.execute(
                timers.update()
                .where(t.id == row.id)
                .values(
                    due_at=nxt,
                    next_attempt_at=nxt,
                    attempts=0,
                    lease_token=None,
                    lease_until=None,
                    update_time=sa.func.now(),
                )
            )
        else:
            conn.execute(timers.delete().where(t.id == row.id))

    def _failed(self, conn: sa.Connection, row, spec: _Kind, error: str) -> None:
        t = timers.c
        attempts = row.attempts + 1
        values: dict[str, Any] = {
            "attempts": attempts,
            "last_error": error,
            "lease_token": None,
            "lease_until": None,
            "update_time": sa.func.now(),
        }
        if attempts < spec.max_attempts:
            delay = min(self.backoff_seconds * 2 ** (attempts - 1), self.max_backoff_seconds)
            values["next_attempt_at"] = sa.func.now() + sa.literal(dt.timedelta(seconds=delay), sa.Interval)
        elif row.cron:  # give this occurrence up; the schedule goes on
            nxt = next_occurrence(row.cron, row.timezone or DEFAULT_TIMEZONE, max(row.due_at, row.fired_at))
            values.update(due_at=nxt, next_attempt_at=nxt, attempts=0)
            log.error("recurring timer gave up an occurrence", extra={"kind": row.kind, "key": row.key, "error": error})
        else:
            values["state"] = "failed"
            log.error("timer gave up", extra={"kind": row.kind, "key": row.key, "attempts": attempts, "error": error})
        conn.execute(timers.update().where(t.id == row.id).values(**values))

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
        while not self._stopping.is_set():
            try:
                n = self.run_once()
                backoff = 0.2
                if n >= self.batch_size:
                    continue
                if time.monotonic() >= self._next_cleanup:
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
