"""Business dates: the years a sales record's date may fall in.

A date the Gregorian calendar holds may still be one the rest cannot handle: year 1 has no
Jalali year (an order of 0001-01-01 could not be numbered), 9999-12-31 has no next day (a
forecast of 9999 could not end), and both were 500s. Every date a caller gives is kept to
these years instead, as INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import datetime as dt

from crm_chassis.errors import InvalidArgument

MIN_YEAR, MAX_YEAR = 1900, 2999


def in_range(day: dt.date) -> bool:
    return MIN_YEAR <= day.year <= MAX_YEAR


def out_of_range(day: dt.date) -> str:
    """The description of a date outside the business years."""
    return f"{day.isoformat()} is not a business date: the year must be {MIN_YEAR}..{MAX_YEAR}"


def check(day: dt.date | None, field: str) -> dt.date | None:
    if day is not None and not in_range(day):
        raise InvalidArgument.field(field, out_of_range(day))
    return day
