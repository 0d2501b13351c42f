"""Migration 0008: the points' expiry timers, one per lot before, become one per member at its
soonest-expiring live lot; the downgrade gives each live lot its timer back."""

from __future__ import annotations

import pathlib

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from campaign_svc.__main__ import SPEC
from crm_chassis.db import migrate, normalise_url


def cfg(url: str) -> Config:
    c = Config()
    c.set_main_option("script_location", str(pathlib.Path(SPEC.migrations)))
    c.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    return c


def expiry_timers(conn) -> list[tuple]:
    return [
        tuple(r)
        for r in conn.execute(
            sa.text(
                "SELECT key, due_at::text, next_attempt_at::text FROM timers WHERE kind = 'loyalty.expire' ORDER BY 2, 1"
            )
        )
    ]


def test_0008_turns_the_lot_timers_into_one_timer_per_member_and_back(databases):
    url = databases.fresh("campaign_migr")
    migrate(url, SPEC.migrations, "0007")
    engine = sa.create_engine(normalise_url(url))
    with engine.begin() as conn:
        conn.execute(sa.text("SET TIME ZONE 'UTC'"))
        prog = conn.execute(
            sa.text(
                "INSERT INTO loyalty_programs (display_name, currency, earn_amount, earn_points) "
                "VALUES ('club', 'IRR', 10000, 1) RETURNING id"
            )
        ).scalar_one()
        a, b = (
            conn.execute(
                sa.text("INSERT INTO loyalty_members (program_id, customer, balance) VALUES (:p, :c, :b) RETURNING id"),
                {"p": prog, "c": c, "b": bal},
            ).scalar_one()
            for c, bal in (("a", 60), ("b", 5))
        )
        lots = [  # member, points, remaining, expire_time
            (a, 10, 0, "2027-01-01 00:00+00"),  # spent: no timer
            (a, 20, 20, "2027-03-01 00:00+00"),
            (a, 30, 30, "2027-02-01 00:00+00"),  # a's soonest live lot
            (a, 0, 0, None),
            (b, 5, 5, None),  # never expires: no timer for b
        ]
        for member, points, remaining, expire in lots:
            lot = conn.execute(
                sa.text(
                    "INSERT INTO loyalty_movements (program_id, member_id, kind, points, balance, remaining, expire_time, "
                    "qualify_time, occur_time) VALUES (:p, :m, 'adjust', :pts, 0, :r, :e, now(), now()) RETURNING id"
                ),
                {"p": prog, "m": member, "pts": points, "r": remaining, "e": expire},
            ).scalar_one()
            if expire is not None:
                conn.execute(
                    sa.text(
                        "INSERT INTO timers (kind, key, due_at, next_attempt_at) VALUES ('loyalty.expire', :k, :e, :e)"
                    ),
                    {"k": str(lot), "e": expire},
                )
    migrate(url, SPEC.migrations, "0008")
    with engine.connect() as conn:
        conn.execute(sa.text("SET TIME ZONE 'UTC'"))
        assert expiry_timers(conn) == [(str(a), "2027-02-01 00:00:00+00", "2027-02-01 00:00:00+00")]
    command.downgrade(cfg(url), "0007")
    with engine.connect() as conn:
        conn.execute(sa.text("SET TIME ZONE 'UTC'"))
        got = expiry_timers(conn)
    assert [due for _, due, _ in got] == ["2027-02-01 00:00:00+00", "2027-03-01 00:00:00+00"]  # the live lots'
    engine.dispose()


def test_0014_keeps_the_ledger_rules_both_ways(databases):
    """Migration 0014 (one foreign key for a movement's member and programme, the ledger check
    inlined): up and down, the same ledgers are accepted and refused."""
    url = databases.fresh("campaign_migr14")
    migrate(url, SPEC.migrations, "0013")
    engine = sa.create_engine(normalise_url(url))

    def member(conn) -> tuple[str, str]:
        prog = conn.execute(
            sa.text(
                "INSERT INTO loyalty_programs (display_name, currency, earn_amount, earn_points) "
                "VALUES ('club', 'IRR', 10000, 1) RETURNING id"
            )
        ).scalar_one()
        mid = conn.execute(
            sa.text("INSERT INTO loyalty_members (program_id, customer, balance) VALUES (:p, 'c', 0) RETURNING id"),
            {"p": prog},
        ).scalar_one()
        return prog, mid

    def move(conn, prog, mid, points: int, balance: int) -> None:
        conn.execute(
            sa.text(
                "INSERT INTO loyalty_movements (program_id, member_id, kind, points, balance, qualify_time, occur_time) "
                "VALUES (:p, :m, 'adjust', :pts, :b, now(), now())"
            ),
            {"p": prog, "m": mid, "pts": points, "b": balance},
        )

    def rules_hold(other_programme_refused: bool) -> None:
        with engine.begin() as conn:  # a balance with its movement: accepted
            prog, mid = member(conn)
            conn.execute(sa.text("UPDATE loyalty_members SET balance = 5 WHERE id = :m"), {"m": mid})
            move(conn, prog, mid, 5, 5)
        try:  # a balance without its movement: refused at commit
            with engine.begin() as conn:
                conn.execute(sa.text("UPDATE loyalty_members SET balance = balance + 1 WHERE id = :m"), {"m": mid})
            raise AssertionError("a balance that is not the ledger sum was committed")
        except sa.exc.IntegrityError as exc:
            assert "not the sum of its movements" in str(exc)
        try:  # a movement naming another programme than its member's
            with engine.begin() as conn:
                other, _ = member(conn)
                conn.execute(sa.text("UPDATE loyalty_members SET balance = balance + 2 WHERE id = :m"), {"m": mid})
                move(conn, other, mid, 2, 7)
            assert not other_programme_refused, "a movement of another programme than its member's was committed"
        except sa.exc.IntegrityError as exc:
            assert other_programme_refused and "loyalty_movements_member_fkey" in str(exc)

    rules_hold(other_programme_refused=False)  # 0013: two keys, each fine on its own
    with pytest.raises(RuntimeError, match="1 loyalty movements name another programme"):
        migrate(url, SPEC.migrations, "0014")  # that movement stops the upgrade
    with engine.begin() as conn:  # corrected by hand
        conn.execute(
            sa.text(
                "UPDATE loyalty_movements l SET program_id = mb.program_id FROM loyalty_members mb "
                "WHERE mb.id = l.member_id AND mb.program_id <> l.program_id"
            )
        )
    migrate(url, SPEC.migrations, "0014")
    with engine.connect() as conn:
        assert conn.execute(
            sa.text("SELECT prolang = (SELECT oid FROM pg_language WHERE lanname = 'sql') FROM pg_proc "
                    "WHERE proname = 'loyalty_check_queued'")
        ).scalar_one()  # fmt: skip
        assert conn.execute(
            sa.text("SELECT reloptions FROM pg_class WHERE relname = 'loyalty_members'")
        ).scalar_one() == ["fillfactor=70"]
    rules_hold(other_programme_refused=True)
    command.downgrade(cfg(url), "0013")
    rules_hold(other_programme_refused=False)
    with engine.begin() as conn:  # deleting a programme still takes its members and their movements
        conn.execute(sa.text("DELETE FROM loyalty_programs"))
        assert conn.execute(sa.text("SELECT count(*) FROM loyalty_movements")).scalar_one() == 0
    migrate(url, SPEC.migrations, "0014")
    rules_hold(other_programme_refused=True)
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM loyalty_programs"))
        assert conn.execute(sa.text("SELECT count(*) FROM loyalty_movements")).scalar_one() == 0
    engine.dispose()
