"""Durable timers against real PostgreSQL: restart, two workers, cancel/reschedule, retries and
giving up, recurring cron schedules in Asia/Tehran, lateness."""

from __future__ import annotations

import datetime as dt
import time

import pytest
import sqlalchemy as sa

from crm_chassis import timers
from crm_chassis.db import create_engine
from crm_chassis.timers import TimerWorker
from crm_chassis.work_tables import timer_firings, work_metadata
from tests.support.harness import wait_for

UTC = dt.UTC


@pytest.fixture
def engine(databases):
    eng = create_engine(databases.fresh("timers"), pool_size=6)
    work_metadata.create_all(eng)
    with eng.begin() as conn:
        conn.execute(sa.text("CREATE TABLE fired (kind text, key text, due_at timestamptz, worker text)"))
    yield eng
    eng.dispose()


def now() -> dt.datetime:
    return dt.datetime.now(UTC)


def fired(engine, kind: str | None = None) -> list:
    q = "SELECT kind, key, due_at, worker FROM fired" + (" WHERE kind = :k" if kind else "") + " ORDER BY due_at"
    with engine.connect() as conn:
        return conn.execute(sa.text(q), {"k": kind}).all()


def recorder(worker_name: str):
    """A handler whose only effect is a row in this database (so exactly once is checkable)."""

    def handle(conn: sa.Connection, timer: timers.Timer) -> None:
        conn.execute(
            sa.text("INSERT INTO fired VALUES (:k, :key, :d, :w)"),
            {"k": timer.kind, "key": timer.key, "d": timer.due_at, "w": worker_name},
        )

    return handle


def schedule(engine, kind, key, at, payload=None):
    with engine.begin() as conn:
        timers.schedule(conn, kind, key, at, payload)


def test_a_timer_scheduled_before_a_restart_fires_once_after_it(engine):
    first = TimerWorker(engine, {"sla": recorder("first")}, poll_seconds=0.1)
    first.start()
    schedule(engine, "sla", "ticket-1", now() + dt.timedelta(seconds=1.5), {"level": 1})
    first.stop()  # the process stops before the timer is due
    assert fired(engine) == []
    time.sleep(1.6)  # ...and is down when it falls due
    second = TimerWorker(engine, {"sla": recorder("second")}, poll_seconds=0.1)
    second.start()
    try:
        wait_for(lambda: fired(engine), what="the timer to fire after the restart")
        time.sleep(0.5)  # a second firing would show up in a few polls
        rows = fired(engine)
        assert [(r.key, r.worker) for r in rows] == [("ticket-1", "second")]
        with engine.connect() as conn:
            assert timers.get(conn, "sla", "ticket-1") is None  # a one-shot timer is gone once fired
    finally:
        second.stop()


def test_the_schedule_commits_with_the_callers_transaction(engine):
    with pytest.raises(RuntimeError), engine.begin() as conn:
        timers.schedule(conn, "sla", "rolled-back", now())
        raise RuntimeError("the state change failed")
    with engine.connect() as conn:
        assert timers.get(conn, "sla", "rolled-back") is None


def test_two_workers_fire_each_timer_exactly_once_even_when_leases_expire(engine):
    due = now() - dt.timedelta(seconds=1)
    with engine.begin() as conn:
        for i in range(60):
            timers.schedule(conn, "send", f"m{i}", due + dt.timedelta(milliseconds=i))

    def slow(name):
        record = recorder(name)

        def handle(conn, timer):
            time.sleep(0.02)  # slower than the lease: claims of the batch expire meanwhile
            record(conn, timer)

        return handle

    workers = [
        TimerWorker(engine, {"send": slow(name)}, batch_size=10, lease_seconds=0.1, poll_seconds=0.05)
        for name in ("a", "b")
    ]
    for w in workers:
        w.start()
    try:
        wait_for(lambda: len(fired(engine)) >= 60, what="60 firings")
        time.sleep(0.5)
        rows = fired(engine)
        assert len(rows) == 60
        assert sorted(r.key for r in rows) == sorted(f"m{i}" for i in range(60))
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM timers")).scalar() == 0
    finally:
        for w in workers:
            w.stop()


def test_a_claim_whose_worker_died_is_taken_over_when_its_lease_expires(engine):
    schedule(engine, "sla", "orphan", now() - dt.timedelta(seconds=1))
    with engine.begin() as conn:  # a worker claimed it, then its process died
        conn.execute(
            sa.text("UPDATE timers SET lease_token = gen_random_uuid(), lease_until = now() + interval '1 second'")
        )
    worker = TimerWorker(engine, {"sla": recorder("survivor")}, poll_seconds=0.1)
    worker.start()
    try:
        wait_for(lambda: fired(engine), what="the orphaned timer to fire")
        assert [(r.key, r.worker) for r in fired(engine)] == [("orphan", "survivor")]
    finally:
        worker.stop()


def test_a_claim_made_before_the_timer_moved_does_not_fire_it(engine):
    """A worker claimed the timer, then the ticket changed and the timer moved an hour later:
    the stale claim must not fire it (nor a recurring timer's next occurrence early)."""
    schedule(engine, "sla", "moved", now() - dt.timedelta(seconds=1))
    with engine.begin() as conn:
        timers.schedule_recurring(conn, "report", "daily", "0 8 * * *", after=now() - dt.timedelta(days=1))
        conn.execute(sa.text("UPDATE timers SET due_at = now() - interval '1 second', next_attempt_at = due_at"))
    worker = TimerWorker(engine, {"sla": recorder("w"), "report": recorder("w")})
    token = "00000000-0000-0000-0000-000000000001"
    claimed = {r.kind: r for r in worker._claim(token)}
    assert set(claimed) == {"sla", "report"}
    later = now() + dt.timedelta(hours=1)
    with engine.begin() as conn:
        timers.reschedule(conn, "sla", "moved", later)
        timers.reschedule(conn, "report", "daily", later)
    assert worker._fire(claimed["sla"], token) is False
    assert worker._fire(claimed["report"], token) is False
    assert fired(engine) == []
    with engine.connect() as conn:
        assert timers.get(conn, "sla", "moved").due_at == later
        assert timers.get(conn, "report", "daily").due_at == later


def test_cancel_and_reschedule(engine):
    later = now() + dt.timedelta(hours=1)
    schedule(engine, "sla", "cancelled", now() + dt.timedelta(milliseconds=300))
    schedule(engine, "sla", "moved-earlier", later, {"v": 1})
    schedule(engine, "sla", "moved-later", now() + dt.timedelta(milliseconds=300))
    schedule(engine, "sla", "replaced", later, {"v": 1})
    with engine.begin() as conn:
        assert timers.cancel(conn, "sla", "cancelled") is True
        assert timers.cancel(conn, "sla", "never-scheduled") is False
        assert timers.reschedule(conn, "sla", "moved-earlier", now()) is True
        assert timers.reschedule(conn, "sla", "moved-later", later) is True
        assert timers.reschedule(conn, "sla", "never-scheduled", now()) is False
        timers.schedule(conn, "sla", "replaced", now(), {"v": 2})  # same key: replaced, not added
    seen: list[tuple[str, dict]] = []

    def handle(conn, timer):
        seen.append((timer.key, timer.payload))

    worker = TimerWorker(engine, {"sla": handle}, poll_seconds=0.1)
    worker.start()
    try:
        wait_for(lambda: len(seen) >= 2, what="the two due timers")
        time.sleep(0.8)  # past the cancelled and moved-later timers' original due times
        assert sorted(seen) == [("moved-earlier", {"v": 1}), ("replaced", {"v": 2})]
        with engine.connect() as conn:
            assert timers.get(conn, "sla", "cancelled") is None
            assert timers.get(conn, "sla", "moved-later").due_at == later
    finally:
        worker.stop()


def test_naive_times_and_bad_cron_are_refused(engine):
    with engine.begin() as conn:
        with pytest.raises(ValueError, match="timezone-aware"):
            timers.schedule(conn, "sla", "naive", dt.datetime(2030, 1, 1))
        with pytest.raises(ValueError, match="cron"):
            timers.schedule_recurring(conn, "report", "r", "every day")
        with pytest.raises(ValueError, match="time zone"):
            timers.schedule_recurring(conn, "report", "r", "0 8 * * *", timezone="Mars/Olympus")


def test_a_failing_handler_is_retried_with_backoff_then_gives_up_keeping_the_error(engine):
    calls: list[int] = []

    def flaky(conn, timer):
        calls.append(timer.attempt)
        conn.execute(sa.text("INSERT INTO fired VALUES ('x', 'written-before-the-error', now(), 'w')"))
        raise ValueError(f"mail server said no (try {timer.attempt})")

    worker = TimerWorker(
        engine, poll_seconds=0.05, backoff_seconds=0.05, max_backoff_seconds=0.2, late_warning_seconds=3600
    )
    worker.register("mail", flaky, max_attempts=3)
    worker.start()
    try:
        schedule(engine, "mail", "invoice-7", now())
        with engine.connect() as conn:
            wait_for(lambda: timers.get(conn, "mail", "invoice-7").state == "failed", what="give up")
            t = timers.get(conn, "mail", "invoice-7")
            attempts = conn.execute(
                sa.select(timer_firings.c.attempt, timer_firings.c.ok, timer_firings.c.error).order_by(
                    timer_firings.c.id
                )
            ).all()
        assert calls == [1, 2, 3]
        assert t.attempts == 3 and t.last_error == "ValueError: mail server said no (try 3)"
        assert [(a.attempt, a.ok) for a in attempts] == [(1, False), (2, False), (3, False)]
        assert fired(engine) == []  # each failed attempt's writes rolled back
        time.sleep(0.4)
        assert calls == [1, 2, 3]  # given up: no fourth try
        # Scheduling the key again revives it.
        schedule(engine, "mail", "invoice-7", now())
        wait_for(lambda: len(calls) == 4, what="a new try after rescheduling")
    finally:
        worker.stop()


def test_a_handler_that_recovers_takes_effect_once(engine):
    tries: list[int] = []

    def recovers(conn, timer):
        tries.append(timer.attempt)
        recorder("w")(conn, timer)
        if timer.attempt < 3:
            raise ConnectionError("downstream is down")

    worker = TimerWorker(engine, {"mail": recovers}, poll_seconds=0.05, backoff_seconds=0.05)
    worker.start()
    try:
        schedule(engine, "mail", "reminder-1", now())
        wait_for(lambda: fired(engine), what="the successful attempt")
        time.sleep(0.3)
        assert tries == [1, 2, 3]
        assert len(fired(engine)) == 1
    finally:
        worker.stop()


def test_cron_occurrences_are_wall_clock_times_in_asia_tehran():
    after = dt.datetime(2026, 3, 1, 0, 0, tzinfo=UTC)  # 03:30 in Tehran
    # 09:30 Tehran (UTC+03:30) is 06:00 UTC, the same day.
    assert timers.next_occurrence("30 9 * * *", after=after) == dt.datetime(2026, 3, 1, 6, 0, tzinfo=UTC)
    # Saturday 08:00 (the first day of the Iranian week): 2026-03-07 is a Saturday.
    assert timers.next_occurrence("0 8 * * sat", after=after) == dt.datetime(2026, 3, 7, 4, 30, tzinfo=UTC)
    # Another zone when asked; the default is Asia/Tehran.
    assert timers.next_occurrence("30 9 * * *", "UTC", after) == dt.datetime(2026, 3, 1, 9, 30, tzinfo=UTC)
    # Strictly after: an occurrence at `after` itself is not returned.
    at = dt.datetime(2026, 3, 1, 6, 0, tzinfo=UTC)
    assert timers.next_occurrence("30 9 * * *", after=at) == dt.datetime(2026, 3, 2, 6, 0, tzinfo=UTC)


def test_a_recurring_timer_fires_and_rearms_on_its_schedule(engine):
    with engine.begin() as conn:
        first = timers.schedule_recurring(conn, "report", "weekly-sales", "* * * * * */1", {"report": "sales"})
        t = timers.get(conn, "report", "weekly-sales")
    assert t.cron == "* * * * * */1" and t.timezone == "Asia/Tehran" and t.due_at == first
    worker = TimerWorker(engine, {"report": recorder("w")}, poll_seconds=0.1)
    worker.start()
    try:
        wait_for(lambda: len(fired(engine)) >= 3, what="three occurrences")
    finally:
        worker.stop()
    rows = fired(engine)
    dues = [r.due_at for r in rows]
    assert dues[0] == first
    assert len(set(dues)) == len(dues)  # each occurrence once
    assert all(d.microsecond == 0 for d in dues)  # whole seconds, as the schedule names
    with engine.connect() as conn:
        t = timers.get(conn, "report", "weekly-sales")
    assert t.state == "scheduled" and t.due_at > dues[-1]  # armed for the next occurrence


def test_lateness_is_recorded_per_firing_and_summarised(engine):
    worker = TimerWorker(engine, {"sla": recorder("w")}, poll_seconds=0.1, late_warning_seconds=3600)
    schedule(engine, "sla", "overdue", now() - dt.timedelta(seconds=10))  # due 10 s ago
    schedule(engine, "sla", "on-time", now())
    worker.start()
    try:
        wait_for(lambda: len(fired(engine)) == 2, what="both firings")
    finally:
        worker.stop()
    with engine.connect() as conn:
        per_firing = dict(conn.execute(sa.select(timer_firings.c.key, timer_firings.c.lateness_seconds)).all())
        summary = timers.lateness(conn, "sla")
        assert timers.lateness(conn, "other-kind").count == 0
    assert per_firing["overdue"] >= 10.0  # it fired at least 10 s after its due time
    assert per_firing["on-time"] >= 0.0
    assert summary.count == 2
    assert summary.max == max(per_firing.values())
    assert summary.p50 <= summary.p95 <= summary.max
