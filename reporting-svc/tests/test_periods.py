"""The period SQL functions of migration 0004 against jdatetime, day by day, and the Tehran day
and Saturday week."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

from crm_chassis.persian import to_jalali


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
