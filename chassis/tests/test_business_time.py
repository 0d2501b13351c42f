"""Business-time arithmetic: working hours by weekday, holidays, closed days, overrides."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from crm_chassis.business_time import BusinessCalendar, from_settings, parse_ranges

TEH = ZoneInfo("Asia/Tehran")
H = 3600


def at(y, m, d, hh=0, mm=0) -> dt.datetime:
    return dt.datetime(y, m, d, hh, mm, tzinfo=TEH)


# 2026-10-03 is a Saturday; the week of 3-9 October 2026 has no Iranian holiday.
SAT, WED, THU, FRI = at(2026, 10, 3), at(2026, 10, 7), at(2026, 10, 8), at(2026, 10, 9)


@pytest.fixture(scope="module")
def cal():
    return BusinessCalendar()


def test_default_week_is_iran_s(cal):
    assert [len(cal.intervals(dt.date(2026, 10, 3 + i))) for i in range(7)] == [1, 1, 1, 1, 1, 1, 0]
    assert cal.intervals(THU.date()) == [(at(2026, 10, 8, 8), at(2026, 10, 8, 12))]
    assert cal.is_open(at(2026, 10, 3, 8)) and not cal.is_open(at(2026, 10, 3, 16))
    assert not cal.is_open(at(2026, 10, 9, 10))  # Friday


def test_add_within_a_day_and_from_outside_hours(cal):
    assert cal.add(at(2026, 10, 3, 9), 3) == at(2026, 10, 3, 12)
    assert cal.add(at(2026, 10, 3, 9), 7) == at(2026, 10, 3, 16)  # exactly the close
    assert cal.add(at(2026, 10, 3, 6), 1) == at(2026, 10, 3, 9)  # before opening: counts from 08:00
    assert cal.add(at(2026, 10, 3, 20), 1) == at(2026, 10, 4, 9)  # after closing: next morning
    assert cal.add(at(2026, 10, 3, 9), 0) == at(2026, 10, 3, 9)
    assert cal.add(at(2026, 10, 3, 9), dt.timedelta(minutes=90)) == at(2026, 10, 3, 10, 30)
    # The answer is in the calendar's zone, whatever zone the start was given in.
    start = at(2026, 10, 3, 9).astimezone(dt.UTC)
    assert cal.add(start, 1).utcoffset() == dt.timedelta(hours=3, minutes=30)
    assert cal.add(start, 1) == at(2026, 10, 3, 10)


def test_add_across_the_weekend(cal):
    # Wednesday 14:00 + 8 h: 2 on Wednesday, 4 on Thursday (half day), Friday off, 2 on Saturday.
    assert cal.add(at(2026, 10, 7, 14), 8) == at(2026, 10, 10, 10)
    assert cal.between(at(2026, 10, 7, 14), at(2026, 10, 10, 10)) == 8 * H
    # Friday counts nothing; Thursday afternoon neither.
    assert cal.between(at(2026, 10, 8, 12), at(2026, 10, 10, 8)) == 0
    assert cal.add(at(2026, 10, 8, 13), 1) == at(2026, 10, 10, 9)


def test_holidays_are_closed():
    cal = BusinessCalendar()
    # 11 February (Islamic Revolution Day) 2026 is a Wednesday.
    assert cal.holiday(dt.date(2026, 2, 11))
    assert cal.intervals(dt.date(2026, 2, 11)) == []
    # Tuesday 15:00 + 2 h: 1 on Tuesday, Wednesday is a holiday, 1 on Thursday.
    assert cal.add(at(2026, 2, 10, 15), 2) == at(2026, 2, 12, 9)
    assert cal.between(at(2026, 2, 10, 8), at(2026, 2, 13, 0)) == (8 + 4) * H
    # Nowruz: 1-4 Farvardin 1405 (21-24 March 2026) are closed.
    assert all(not cal.is_business_day(dt.date(2026, 3, d)) for d in (21, 22, 23, 24))
    # Without a holiday calendar the same Wednesday is a working day.
    plain = BusinessCalendar(holiday_country=None)
    assert plain.between(at(2026, 2, 10, 8), at(2026, 2, 13, 0)) == (8 + 8 + 4) * H


def test_closed_days_and_overrides():
    cal = BusinessCalendar(
        closed_days={dt.date(2026, 10, 4)},
        overrides={
            dt.date(2026, 10, 5): ["09:00-10:00"],  # a short day
            dt.date(2026, 10, 9): ["10:00-12:00"],  # a Friday opened
            dt.date(2026, 2, 11): ["08:00-09:00"],  # a holiday opened (overrides win)
        },
    )
    assert cal.holiday(dt.date(2026, 10, 4)) == "closed"
    assert cal.add(at(2026, 10, 3, 15), 2) == at(2026, 10, 5, 10)  # Sat 1 h, Sun closed, Mon 1 h
    assert cal.add(at(2026, 10, 8, 11), 2) == at(2026, 10, 9, 11)  # Thu 1 h, Friday 1 h
    assert cal.between(at(2026, 2, 11), at(2026, 2, 12)) == 1 * H
    closed = BusinessCalendar(overrides={dt.date(2026, 10, 3): []})
    assert closed.add(at(2026, 10, 3, 9), 1) == at(2026, 10, 4, 9)


def test_several_ranges_a_day():
    cal = BusinessCalendar(weekly={"sat": ["08:00-12:00", "13:00-17:00"], "sun": ["13:00-17:00", "08:00-12:00"]})
    assert cal.add(at(2026, 10, 3, 11), 2) == at(2026, 10, 3, 14)  # the lunch hour does not count
    assert cal.add(at(2026, 10, 3, 12, 30), 1) == at(2026, 10, 3, 14)  # from lunch: counts from 13:00
    assert cal.add(at(2026, 10, 3, 16), 3) == at(2026, 10, 4, 10)
    assert cal.between(at(2026, 10, 3, 0), at(2026, 10, 5, 0)) == 16 * H
    assert cal.add(at(2026, 10, 4, 17), 1) == at(2026, 10, 10, 9)  # next Saturday (other days closed)
    assert not cal.is_open(at(2026, 10, 3, 12, 30))
    assert cal.next_open(at(2026, 10, 3, 12, 30)) == at(2026, 10, 3, 13)
    # Overlapping or touching ranges merge.
    assert parse_ranges(["08:00-10:00", "09:00-11:00", "11:00-12:00"]) == ((8 * H, 12 * H),)


def test_between_is_the_inverse_of_add(cal):
    start = at(2026, 10, 3, 10, 17)
    for hours in (0.5, 1, 5.25, 7, 12, 30, 45, 100):
        end = cal.add(start, hours)
        assert cal.between(start, end) == pytest.approx(hours * H)
        assert cal.between(end, start) == pytest.approx(-hours * H)
    assert cal.between(start, start) == 0


def test_tehran_has_no_daylight_saving_now_but_had_before_2023():
    always = BusinessCalendar(weekly={d: ["00:00-24:00"] for d in range(7)}, holiday_country=None)
    # 2026: no DST, a day is 24 hours around the old switch dates (21 March, 21 September).
    assert always.between(at(2026, 3, 20), at(2026, 3, 23)) == 72 * H
    assert always.between(at(2026, 9, 20), at(2026, 9, 23)) == 72 * H
    assert at(2026, 6, 1).utcoffset() == dt.timedelta(hours=3, minutes=30)
    # 2020: clocks moved forward at midnight on 21 March, so that day had 23 hours.
    assert always.between(at(2020, 3, 20), at(2020, 3, 23)) == 71 * H
    office = BusinessCalendar(holiday_country=None)
    assert office.between(at(2020, 3, 22, 8), at(2020, 3, 22, 16)) == 8 * H  # wall-clock hours


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="timezone-aware"):
        BusinessCalendar().add(dt.datetime(2026, 10, 3, 9), 1)
    with pytest.raises(ValueError, match="negative"):
        BusinessCalendar().add(SAT, -1)
    for bad in ("16:00-08:00", "8-16", "08:00-25:00", "08:61-09:00"):
        with pytest.raises(ValueError):
            parse_ranges([bad])
    with pytest.raises(ValueError, match="weekday"):
        BusinessCalendar(weekly={"someday": ["08:00-16:00"]})
    with pytest.raises(ValueError, match="no open hours"):
        BusinessCalendar(weekly={}, holiday_country=None).add(SAT, 1)


def test_from_settings():
    cal = from_settings("sat-wed 09:00-13:00,14:00-18:00; thu 09:00-12:00")
    assert cal.intervals(WED.date())[1] == (at(2026, 10, 7, 14), at(2026, 10, 7, 18))
    assert cal.intervals(THU.date()) == [(at(2026, 10, 8, 9), at(2026, 10, 8, 12))]
    assert cal.intervals(FRI.date()) == []
    assert from_settings("").weekly == BusinessCalendar().weekly
    every = from_settings("sat-fri 00:00-24:00", holiday_country=None)
    assert every.between(SAT, SAT + dt.timedelta(days=7)) == 7 * 24 * H
