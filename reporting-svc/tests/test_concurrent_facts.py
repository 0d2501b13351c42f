"""Two consumers inserting the same new fact at once (competing consumers on one queue, or two
replicas): the second one's INSERT ... ON CONFLICT DO NOTHING waits for the first to commit and
then takes the update path against the row it stored (Facts.apply_many), with no error and no
fact counted twice: the rollups equal those of the same events applied by one consumer."""

from __future__ import annotations

import datetime as dt
import threading
import time

import sqlalchemy as sa

from crm.support.v1 import ticket_pb2
from reporting_svc import support
from reporting_svc.__main__ import SPEC
from reporting_svc.projection import Writes
from tests.support.harness import start_service

D1 = dt.datetime(2026, 11, 2, 6, 0, tzinfo=dt.UTC)
EMAIL = ticket_pb2.Channel.Value("CHANNEL_EMAIL")


def _changes(events) -> list:
    return [(key, values) for facts, key, values in map(support.fact_ticket, events)]


def _apply(engine, changes) -> None:
    with engine.begin() as conn:
        support.TICKETS.apply_many(conn, changes)


def _state(engine) -> tuple:
    with engine.connect() as c:
        daily = c.execute(sa.text("SELECT * FROM support_daily ORDER BY day, team, agent, channel")).all()
        monthly = c.execute(
            sa.text("SELECT * FROM support_monthly ORDER BY calendar, month, team, agent, channel")
        ).all()
        facts = c.execute(sa.text("SELECT ticket_id, version FROM ticket_facts ORDER BY ticket_id")).all()
    return daily, monthly, facts


def _blocked(engine, pid: int) -> bool:
    with engine.connect() as c:
        return c.execute(
            sa.text("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = :p"), {"p": pid}
        ).scalar()


def test_a_concurrent_insert_of_the_same_fact_takes_the_update_path(databases, broker, ev):
    t1, t2, t3 = (
        ev.tickets(
            n,
            agent=f"agents/a{n}",
            channel=EMAIL,
            created=D1 + n * dt.timedelta(hours=1),
            first_response=600,
            resolved=3600,
            closed=D1 + dt.timedelta(days=40),
        )  # fmt: skip
        for n in (1, 2, 3)
    )  # each: opened (v1), first_responded, resolved, closed (v4: a month later)
    live = start_service(SPEC, databases.fresh("rep_concurrent"), broker.url, consumers=False)
    ref = start_service(SPEC, databases.fresh("rep_concurrent_ref"), broker.url, consumers=False)
    try:
        engine = live.ctx.engine
        # A stores ticket 1 at v3 and ticket 3 at v1 and holds its transaction open; B meanwhile
        # brings ticket 1 at v2 (older), ticket 3 at v4 (newer) and ticket 2 (new to both)
        a = engine.connect()
        a_tx = a.begin()
        support.TICKETS.apply_many(a, _changes([t1[2], t3[0]]))
        errors: list = []

        def b() -> None:
            try:
                with engine.begin() as conn:
                    pids.append(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar())
                    writes = Writes()
                    support.TICKETS.apply_many(conn, _changes([t1[1], t3[3], t2[3]]), writes)
                    writes.write(conn)
            except Exception as exc:  # pragma: no cover - the failure the test looks for
                errors.append(exc)

        pids: list = []
        thread = threading.Thread(target=b)
        thread.start()
        deadline = time.monotonic() + 10
        while not (pids and _blocked(engine, pids[0])) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pids and _blocked(engine, pids[0]), "B did not wait for A's uncommitted rows"
        a_tx.commit()
        a.close()
        thread.join(10)
        assert not thread.is_alive() and errors == []
        # then the rest of each ticket's history, older versions among them, as a later batch
        _apply(engine, _changes([*t1, *t2[:2], *t3[:3]]))

        for e in (*t1, *t2, *t3):  # the reference: one consumer, one event at a time
            _apply(ref.ctx.engine, _changes([e]))
        got, want = _state(engine), _state(ref.ctx.engine)
        assert [(f.ticket_id[-1], f.version) for f in got[2]] == [("1", 4), ("2", 4), ("3", 4)]
        assert sum(r.requests for r in got[0]) == 3 and sum(r.closed for r in got[0]) == 3
        assert got == want
    finally:
        live.stop(0)
        ref.stop(0)
