"""Forecast periods: Gregorian and Jalali months, quarters and years, their labels and bounds.

A label says its calendar by its year: below 1700 it is Jalali (1405-Q1 starts 2026-03-21,
Nowruz), else Gregorian. Bounds are half-open Gregorian days [start, end) in Asia/Tehran.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from crm_chassis import dates, persian
from crm_chassis.errors import InvalidArgument

CALENDARS = ("gregorian", "jalali")
UNITS = ("month", "quarter", "year")
MAX_PERIODS = 120
_YEAR = re.compile(r"(\d{4})")
_QUARTER = re.compile(r"(\d{4})-[Qq]([1-4])")
_MONTH = re.compile(r"(\d{4})[-/](\d{1,2})")


@dataclass(frozen=True)
class Period:
    label: str
    start: dt.date
    end: dt.date  # the day after the last


today = dates.today


start_of_day = dates.start_of_day


def _gregorian_start(year: int, month: int) -> dt.date:
    year, month = year + (month - 1) // 12, (month - 1) % 12 + 1
    return dt.date(year, month, 1)


def period_of(day: dt.date, calendar: str, unit: str) -> Period:
    """The period of `unit` in `calendar` that `day` falls in."""
    if calendar == "jalali":
        p = persian.jalali_period(day, unit)
        return Period(p.label, p.start, p.end)
    if unit == "month":
        start = dt.date(day.year, day.month, 1)
        return Period(f"{day.year:04d}-{day.month:02d}", start, _gregorian_start(day.year, day.month + 1))
    if unit == "quarter":
        q = (day.month - 1) // 3 + 1
        return Period(
            f"{day.year:04d}-Q{q}", _gregorian_start(day.year, 3 * q - 2), _gregorian_start(day.year, 3 * q + 1)
        )
    return Period(f"{day.year:04d}", dt.date(day.year, 1, 1), dt.date(day.year + 1, 1, 1))


def parse_label(text: str, field: str = "period") -> tuple[str, str, Period]:
    """(calendar, unit, period) of a label; INVALID_ARGUMENT naming `field` for anything else."""
    text = persian.to_ascii_digits((text or "").strip())
    bad = InvalidArgument.field(
        field,
        f"{text!r} is not a period: write 1405-Q1, 1405/03 or 1405 (Jalali), 2026-Q2, 2026-05 or 2026 (Gregorian)",
    )
    m = _QUARTER.fullmatch(text) or _MONTH.fullmatch(text) or _YEAR.fullmatch(text)
    if m is None:
        raise bad
    year = int(m.group(1))
    calendar = "jalali" if year < persian.JALALI_BEFORE else "gregorian"
    if m.re is _QUARTER:
        unit, month = "quarter", 3 * int(m.group(2)) - 2
    elif m.re is _MONTH:
        unit, month = "month", int(m.group(2))
        if not 1 <= month <= 12:
            raise bad
    else:
        unit, month = "year", 1
    try:
        first = persian.jalali_to_gregorian(year, month, 1) if calendar == "jalali" else dt.date(year, month, 1)
    except ValueError:
        first = None
    if first is None or not dates.in_range(first):  # 9999 had no end (a 500)
        raise bad
    return calendar, unit, period_of(first, calendar, unit)


def _day(text: str, field: str) -> dt.date:
    try:
        day = persian.parse_date(text)
    except persian.DateError as err:
        raise InvalidArgument.field(field, str(err)) from None
    return dates.check(day, field)  # 9999-12-31 had no period end (a 500)


def _choice(value: str, allowed: tuple[str, ...], field: str) -> str:
    v = (value or "").strip().lower()
    if v and v not in allowed:
        raise InvalidArgument.field(field, f"{value!r} is not one of {', '.join(allowed)}")
    return v


def resolve(
    period: str = "",
    calendar: str = "",
    unit: str = "",
    start: str = "",
    end: str = "",
    default_unit: str = "quarter",
) -> tuple[str, str, list[Period]]:
    """The calendar, unit and periods a request names: one label, or every period overlapping
    the days start..end (inclusive), or the current period. Errors name the field."""
    calendar = _choice(calendar, CALENDARS, "calendar")
    unit = _choice(unit, UNITS, "unit")
    if period.strip():
        if start or end:
            raise InvalidArgument.field("start", "give either period or start/end, not both")
        cal, u, p = parse_label(period)
        if calendar and calendar != cal:
            raise InvalidArgument.field("period", f"{period!r} is a {cal} period, but calendar is {calendar}")
        if unit and unit != u:
            raise InvalidArgument.field("period", f"{period!r} is a {u}, but unit is {unit}")
        return cal, u, [p]
    calendar, unit = calendar or "jalali", unit or default_unit
    if not start.strip():
        if end.strip():
            raise InvalidArgument.field("start", "is required with end")
        return calendar, unit, [period_of(today(), calendar, unit)]
    first = _day(start, "start")
    last = _day(end, "end") if end.strip() else first
    if last < first:
        raise InvalidArgument.field("end", "must not be before start")
    periods = [period_of(first, calendar, unit)]
    while periods[-1].end <= last:
        if len(periods) >= MAX_PERIODS:
            raise InvalidArgument.field("end", f"the range covers more than {MAX_PERIODS} periods")
        periods.append(period_of(periods[-1].end, calendar, unit))
    return calendar, unit, periods
