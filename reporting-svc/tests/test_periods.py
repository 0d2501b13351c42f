"""The period SQL functions (0004, inlined SQL since 0015) against jdatetime, day by day, and the Tehran day
and Saturday week."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from crm_chassis.db import migrate, normalise_url
from crm_chassis.persian import to_jalali
from reporting_svc import support_report
from reporting_svc.__main__ import SPEC


def test_jalali_functions_agree_with_jdatetime_every_day_2020_to_2035(svc):
    start, end = dt.date(2020, 1, 1), dt.date(2035, 12, 31)
    with svc.ctx.engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT d::date, jalali_date(d::date), jalali_month(d::date), jalali_quarter(d::date), "
                "jalali_year(d::date), jalali_day_of_month(d::date) FROM generate_series(:a, :b, interval '1 day') d"
            ),
            {"a": start, "b": end},
        ).all()
    assert len(rows) == (end - start).days + 1
    for day, date, month, quarter, year, dom in rows:
        j = to_jalali(day)
        assert (date, month, quarter, year, dom) == (
            f"{j.year:04d}-{j.month:02d}-{j.day:02d}",
            f"{j.year:04d}-{j.month:02d}",
            f"{j.year:04d}-Q{(j.month + 2) // 3}",
            f"{j.year:04d}",
            j.day,
        ), day


def test_month_boundary_tehran_day_and_saturday_weeks(svc):
    with svc.ctx.engine.connect() as conn:
        one = conn.execute(
            sa.text(
                "SELECT jalali_date(date '2026-11-22'), jalali_date(date '2026-11-21'), "
                "jalali_month(timestamptz '2026-11-21 20:29:59+00'), jalali_month(timestamptz '2026-11-21 20:30:00+00'), "
                "week_start_saturday(date '2026-11-27'), week_start_saturday(date '2026-11-28'), "
                "weekday_from_saturday(date '2026-11-21'), weekday_from_saturday(date '2026-11-27')"
            )
        ).one()
    assert tuple(one) == (
        "1405-09-01",
        "1405-08-30",
        "1405-08",  # 23:59:59 in Tehran (UTC+3:30)
        "1405-09",  # midnight in Tehran
        dt.date(2026, 11, 21),  # Friday belongs to the week of the Saturday before
        dt.date(2026, 11, 28),
        0,  # Saturday
        6,  # Friday
    )


KEYS = (
    "SELECT d::date AS day, jalali_ymd(d::date) AS ymd, jalali_date(d::date) AS date, jalali_month(d::date) AS month, "
    "jalali_quarter(d::date) AS quarter, jalali_year(d::date) AS year, jalali_day_of_month(d::date) AS dom "
    "FROM generate_series(date '1900-01-01', date '2200-12-31', interval '1 day') d"
)

LANGUAGE = "SELECT lanname FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang WHERE proname = 'jalali_ymd'"


def test_0015_inlined_functions_give_0004s_keys_every_day_1900_to_2200_and_the_same_report(databases):
    """0015 replaces the PL/pgSQL functions of 0004 by SQL expressions: the same keys every day of
    three centuries, the same support report by Jalali month, and it downgrades to 0004's."""
    url = databases.fresh("rep_periods_0015")
    migrate(url, SPEC.migrations, "0014")
    engine = sa.create_engine(normalise_url(url))
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO support_daily (day, team, agent, channel, requests, closed, csat_sum, csat_count) "
                "SELECT date '2025-03-01' + i, 'teams/' || (i % 3), 'agents/' || (i % 7), 'email', 1 + i % 5, i % 2, "
                "i % 5, 1 FROM generate_series(0, 800) i"
            )
        )
    q = {"start": dt.date(2025, 3, 15), "end": dt.date(2027, 3, 25), "calendar": "jalali", "lang": "fa"}

    def answers():
        with engine.connect() as conn:
            keys = conn.execute(sa.text(KEYS)).all()
            reports = [
                support_report.report(conn, {**q, "period": p, "dims": ["team"]})
                for p in ("day", "week", "month", "quarter", "year", "day_of_month")
            ]
        return keys, reports

    before = answers()
    migrate(url, SPEC.migrations)
    after = answers()
    assert len(after[0]) == (dt.date(2200, 12, 31) - dt.date(1900, 1, 1)).days + 1
    assert after[0] == before[0]
    assert after[1] == before[1] and len(after[1][2].rows) == 26 * 3  # Esfand 1403 .. Farvardin 1406 x 3 teams
    with engine.connect() as conn:
        assert conn.execute(sa.text(LANGUAGE)).scalar() == "sql"
        # inlined: the plan computes the key in place, it calls no jalali_ function per row
        plan = (
            conn.execute(
                sa.text(
                    "EXPLAIN VERBOSE SELECT jalali_month(day), jalali_date(day), jalali_quarter(day) FROM support_daily"
                )
            )
            .scalars()
            .all()
        )
        assert "jalali" not in " ".join(plan), plan
    cfg = Config()
    cfg.set_main_option("script_location", str(SPEC.migrations))
    cfg.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    command.downgrade(cfg, "0014")
    with engine.connect() as conn:
        assert conn.execute(sa.text(LANGUAGE)).scalar() == "plpgsql"
    assert answers() == before
    engine.dispose()
