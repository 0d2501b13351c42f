"""Migration 0008: the points' expiry timers, one per lot before, become one per member at its
soonest-expiring live lot; the downgrade gives each live lot its timer back."""

from __future__ import annotations

import pathlib

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
