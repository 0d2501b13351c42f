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
    assert worker._fire_group("sla", [claimed["sla"].id], token)[0] == 0  # no firing ran
    assert worker._fire_group("report", [claimed["report"].id], token)[0] == 0
    assert fired(engine) == []
    with engine.connect() as conn:
        assert timers.get(conn, "sla", "moved").due_at == later
        assert timers.get(conn, "report", "daily").due_at == later


def test_cancel_many_removes_exactly_the_pairs_named(engine):
    later = now() + dt.timedelta(hours=1)
    for kind, key in (("sla", "a"), ("sla", "b"), ("report", "a"), ("report", "c")):
        schedule(engine, kind, key, later)
    with engine.begin() as conn:
        # ("report", "b") and ("sla", "c") exist only as halves of other pairs: kept; a pair twice counts once
        gone = timers.cancel_many(conn, [("sla", "a"), ("report", "c"), ("sla", "a"), ("report", "b"), ("x", "y")])
        assert gone == 2
        assert timers.cancel_many(conn, []) == 0
    with engine.connect() as conn:
        left = {(k, key) for k, key in (("sla", "a"), ("sla", "b"), ("report", "a"), ("report", "c"))
                if timers.get(conn, k, key) is not None}  # fmt: skip
    assert left == {("sla", "b"), ("report", "a")}


def test_keep_earlier_moves_a_timer_only_to_a_sooner_time(engine):
    t0 = now() + dt.timedelta(hours=1)
    schedule(engine, "expire", "m1", t0, {"v": 1})
    with engine.begin() as conn:
        timers.schedule_many(
            conn,
            [
                ("expire", "m1", t0 + dt.timedelta(minutes=5), {"v": 2}),  # later than the one it has: kept
                ("expire", "m2", t0 + dt.timedelta(minutes=9), None),  # new; of its two times the earlier
                ("expire", "m2", t0 + dt.timedelta(minutes=7), None),
                ("expire", "m2", t0 + dt.timedelta(minutes=8), None),
            ],
            keep_earlier=True,
        )
    with engine.connect() as conn:
        m1, m2 = timers.get(conn, "expire", "m1"), timers.get(conn, "expire", "m2")
    assert (m1.due_at, m1.payload) == (t0, {"v": 1})
    assert m2.due_at == t0 + dt.timedelta(minutes=7)
    schedule(engine, "expire", "m3", t0)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE timers SET state = 'failed' WHERE key = 'm3'"))
        timers.schedule_many(
            conn,
            [
                ("expire", "m1", t0 - dt.timedelta(minutes=1), {"v": 3}),
                ("expire", "m3", t0 + dt.timedelta(days=1), None),
            ],
            keep_earlier=True,
        )
    with engine.connect() as conn:
        m1, m3 = timers.get(conn, "expire", "m1"), timers.get(conn, "expire", "m3")
    assert (m1.due_at, m1.payload) == (t0 - dt.timedelta(minutes=1), {"v": 3})  # sooner: moved
    assert (m3.state, m3.due_at) == ("scheduled", t0 + dt.timedelta(days=1))  # a failed one is replaced


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


# -- batches ------------------------------------------------------------------------------------
def due_timers(engine, kind: str, n: int, prefix: str = "t") -> None:
    due = now() - dt.timedelta(seconds=1)
    with engine.begin() as conn:
        for i in range(n):
            timers.schedule(conn, kind, f"{prefix}{i}", due + dt.timedelta(milliseconds=i), {"i": i})


def firings(engine, kind: str) -> list:
    with engine.connect() as conn:
        return conn.execute(
            sa.select(timer_firings.c.key, timer_firings.c.attempt, timer_firings.c.ok, timer_firings.c.error)
            .where(timer_firings.c.kind == kind)
            .order_by(timer_firings.c.id)
        ).all()


def remaining(engine, kind: str) -> list:
    with engine.connect() as conn:
        return conn.execute(
            sa.select(timers.timers).where(timers.timers.c.kind == kind).order_by(timers.timers.c.key)
        ).all()


def test_a_batch_handler_fires_many_due_timers_in_one_call(engine):
    calls: list[list[str]] = []
    worker = TimerWorker(engine, batch_size=50)

    @worker.batch_handler("sla.many")
    def many(conn, batch):
        calls.append([t.key for t in batch])
        conn.execute(
            sa.text("INSERT INTO fired VALUES (:k, :key, :d, 'w')"),
            [{"k": t.kind, "key": t.key, "d": t.due_at} for t in batch],
        )

    due_timers(engine, "sla.many", 12)
    with engine.begin() as conn:  # and a recurring one of the same kind, due now
        timers.schedule_recurring(conn, "sla.many", "daily", "0 8 * * *", after=now() - dt.timedelta(days=1))
        conn.execute(sa.text("UPDATE timers SET due_at = now() - interval '1 second', next_attempt_at = due_at "
                             "WHERE key = 'daily'"))  # fmt: skip
    assert worker.run_once() == 13
    assert len(calls) == 1 and sorted(calls[0]) == sorted([f"t{i}" for i in range(12)] + ["daily"])
    assert len(fired(engine, "sla.many")) == 13
    assert [(r.attempt, r.ok) for r in firings(engine, "sla.many")] == [(1, True)] * 13
    (left,) = remaining(engine, "sla.many")  # one-shots gone, the recurring one at its next occurrence
    assert left.key == "daily" and left.due_at > now() and left.lease_token is None
    assert worker.run_once() == 0


def test_a_failing_batch_falls_back_to_one_at_a_time_and_the_poison_timer_fails_alone(engine):
    seen: list[int] = []
    worker = TimerWorker(engine, backoff_seconds=60, late_warning_seconds=3600)

    def batch(conn, ts):
        seen.append(len(ts))
        for t in ts:
            if t.key == "t3":
                raise ValueError("cannot do t3")
            recorder("w")(conn, t)

    worker.register_batch("mail.batch", batch, max_attempts=2)
    due_timers(engine, "mail.batch", 6)
    assert worker.run_once() == 6
    assert seen == [6, 1, 1, 1, 1, 1, 1]  # the batch, then each alone
    assert sorted(r.key for r in fired(engine, "mail.batch")) == ["t0", "t1", "t2", "t4", "t5"]  # once each
    (poison,) = remaining(engine, "mail.batch")
    assert poison.key == "t3" and poison.attempts == 1 and poison.state == "scheduled"
    assert poison.last_error == "ValueError: cannot do t3" and poison.next_attempt_at > now()
    with engine.begin() as conn:  # its back-off is over
        timers.reschedule(conn, "mail.batch", "t3", now() - dt.timedelta(seconds=1))
        conn.execute(sa.text("UPDATE timers SET attempts = 1"))
    assert worker.run_once() == 1
    (poison,) = remaining(engine, "mail.batch")
    assert poison.state == "failed" and poison.attempts == 2  # max_attempts: given up
    assert [(r.key, r.ok) for r in firings(engine, "mail.batch") if r.key == "t3"] == [("t3", False), ("t3", False)]


def test_a_batch_handler_may_leave_some_timers_for_a_retry(engine):
    worker = TimerWorker(engine, backoff_seconds=60)

    @worker.batch_handler("sla.some")
    def some(conn, batch):
        for t in batch:
            if t.key != "t1":
                recorder("w")(conn, t)
        return {"t1": "ticket locked by a change"}

    due_timers(engine, "sla.some", 3)
    assert worker.run_once() == 3
    assert sorted(r.key for r in fired(engine, "sla.some")) == ["t0", "t2"]
    (t1,) = remaining(engine, "sla.some")
    assert t1.key == "t1" and t1.attempts == 1 and t1.last_error == "ticket locked by a change"
    assert t1.next_attempt_at > now() and t1.lease_token is None
    assert ("t1", 1, False, "ticket locked by a change") in firings(engine, "sla.some")


def test_plain_handlers_share_a_transaction_and_a_raising_one_rolls_back_only_itself(engine):
    def handle(conn, timer):
        recorder("w")(conn, timer)
        if timer.key == "t2":
            raise RuntimeError("t2 broke")
        if timer.key == "t0":  # cancels a later timer of the same batch, moves another, and itself
            timers.cancel(conn, "plain", "t4")
            timers.reschedule(conn, "plain", "t5", now() + dt.timedelta(hours=1))
            timers.reschedule(conn, "plain", "t0", now() + dt.timedelta(hours=2))

    worker = TimerWorker(engine, {"plain": handle}, backoff_seconds=60, late_warning_seconds=3600)
    due_timers(engine, "plain", 7)
    statements: list[str] = []
    sa.event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    assert worker.run_once() == 5  # t4 cancelled and t5 moved before their turn: not fired
    commits = sum(1 for s in statements if s.strip().upper().startswith("UPDATE TIMERS SET LEASE_TOKEN"))
    assert commits == 1  # one claim
    assert sorted(r.key for r in fired(engine, "plain")) == ["t0", "t1", "t3", "t6"]  # t2 rolled back
    left = {r.key: r for r in remaining(engine, "plain")}
    assert set(left) == {"t0", "t2", "t5"}
    assert left["t0"].due_at > now() + dt.timedelta(minutes=90) and left["t0"].attempts == 0  # its own move kept
    assert left["t2"].attempts == 1 and left["t2"].last_error == "RuntimeError: t2 broke"
    assert left["t5"].due_at > now() + dt.timedelta(minutes=50)
    assert all(r.lease_token is None for r in left.values())


def test_a_full_batch_is_followed_by_another_claim_at_once(engine):
    worker = TimerWorker(engine, {"bulk": recorder("w")}, batch_size=5, poll_seconds=60)
    due_timers(engine, "bulk", 23)
    worker.start()
    try:  # with a sleep of poll_seconds after each batch this would take minutes
        wait_for(lambda: len(fired(engine, "bulk")) == 23, timeout=20, what="23 firings in 5 batches")
    finally:
        worker.stop()


def test_stop_finishes_the_transaction_and_releases_the_rest(engine):
    worker = TimerWorker(engine, batch_size=10)

    def handle(conn, timer):
        recorder("w")(conn, timer)
        if timer.key == "t1":
            worker._signal_stop()  # SIGTERM arrives while t1 fires

    worker.register("slow", handle)
    due_timers(engine, "slow", 6)
    assert worker.run_once() == 2
    assert sorted(r.key for r in fired(engine, "slow")) == ["t0", "t1"]
    left = remaining(engine, "slow")
    assert [r.key for r in left] == ["t2", "t3", "t4", "t5"]
    assert all(r.lease_token is None for r in left)  # free for another worker now


def test_a_timer_row_held_by_another_transaction_is_skipped_and_fired_later(engine):
    worker = TimerWorker(engine, {"held": recorder("w")})
    due_timers(engine, "held", 3)
    with engine.connect() as holder:  # a change is moving t1 right now
        holder.execute(sa.text("SELECT 1 FROM timers WHERE key = 't1' FOR UPDATE"))
        assert worker.run_once() == 2
        holder.rollback()  # ...and gives up
    assert sorted(r.key for r in fired(engine, "held")) == ["t0", "t2"]
    (t1,) = remaining(engine, "held")
    assert t1.lease_token is None and t1.attempts == 0  # released, not failed
    assert worker.run_once() == 1
    assert sorted(r.key for r in fired(engine, "held")) == ["t0", "t1", "t2"]


def test_several_claim_loops_fire_each_timer_once(engine):
    worker = TimerWorker(engine, {"loops": recorder("w")}, batch_size=7, loops=3, poll_seconds=0.05)
    due_timers(engine, "loops", 60)
    worker.start()
    try:
        wait_for(lambda: len(fired(engine, "loops")) >= 60, what="60 firings")
        time.sleep(0.3)
    finally:
        worker.stop()
    assert sorted(r.key for r in fired(engine, "loops")) == sorted(f"t{i}" for i in range(60))
    assert remaining(engine, "loops") == []


def test_a_handler_waiting_for_a_lock_lets_its_batch_commit_and_runs_alone(engine):
    """t1's handler needs a row a change holds (a change that could be waiting for one of the
    batch's timer rows): t0 commits without waiting for it, and t1 fires alone once the change
    is over, with no failed attempt."""
    import threading

    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE res (id int PRIMARY KEY)"))
        conn.execute(sa.text("INSERT INTO res VALUES (1)"))

    def handle(conn, timer):
        if timer.key == "t1":
            conn.execute(sa.text("SELECT id FROM res WHERE id = 1 FOR UPDATE"))
        recorder("w")(conn, timer)

    worker = TimerWorker(engine, {"lockwait": handle}, late_warning_seconds=3600)
    due_timers(engine, "lockwait", 3)
    result = {}
    with engine.connect() as holder:
        holder.execute(sa.text("SELECT id FROM res WHERE id = 1 FOR UPDATE"))
        th = threading.Thread(target=lambda: result.setdefault("n", worker.run_once()))
        th.start()
        wait_for(lambda: [r.key for r in fired(engine, "lockwait")] == ["t0"], what="t0 committed meanwhile")
        holder.rollback()
    th.join(20)
    assert result["n"] == 3
    assert sorted(r.key for r in fired(engine, "lockwait")) == ["t0", "t1", "t2"]
    assert [(r.key, r.ok) for r in firings(engine, "lockwait") if r.key == "t1"] == [("t1", True)]
    assert remaining(engine, "lockwait") == []
