"""Grouping by period, in SQL over a rollup's `day` column (a Tehran business day): Gregorian or
Jalali day, week (Saturday to Friday), month, quarter, year, weekday and day of month. The
Jalali keys come from the SQL functions of migration 0004 (jalali_month(date) -> '1405-09').
Labels for readers in English or Persian are made here from the keys.
"""

from __future__ import annotations

import datetime as dt
import functools

import sqlalchemy as sa

from crm_chassis import dates, persian
from crm_chassis.errors import FieldViolation, InvalidArgument
from crm_chassis.persian import JALALI_MONTHS, JALALI_QUARTERS, to_persian_digits

PERIODS = ("all", "day", "week", "month", "quarter", "year", "weekday", "day_of_month")
CALENDARS = ("gregorian", "jalali")

GREGORIAN_MONTHS_EN = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
GREGORIAN_MONTHS_FA = (
    "ژانویه", "فوریه", "مارس", "آوریل", "مه", "ژوئن",
    "ژوئیه", "اوت", "سپتامبر", "اکتبر", "نوامبر", "دسامبر",
)  # fmt: skip
JALALI_MONTHS_EN = (
    "Farvardin", "Ordibehesht", "Khordad", "Tir", "Mordad", "Shahrivar",
    "Mehr", "Aban", "Azar", "Dey", "Bahman", "Esfand",
)  # fmt: skip
WEEKDAYS_EN = ("Saturday", "Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday")
WEEKDAYS_FA = ("شنبه", "یکشنبه", "دوشنبه", "سه‌شنبه", "چهارشنبه", "پنجشنبه", "جمعه")
SEASONS_EN = ("Spring", "Summer", "Autumn", "Winter")


def check(period: str, calendar: str, field_prefix: str = "") -> tuple[str, str]:
    """The period and calendar of a request (defaults: all, gregorian); INVALID_ARGUMENT on the
    field otherwise."""
    period = (period or "all").strip().lower()
    calendar = (calendar or "gregorian").strip().lower()
    if period not in PERIODS:
        raise InvalidArgument.field(
            f"{field_prefix}period", f"unknown period {period!r}; use one of {', '.join(PERIODS)}"
        )
    if calendar not in CALENDARS:
        raise InvalidArgument.field(
            f"{field_prefix}calendar", f"unknown calendar {calendar!r}; use gregorian or jalali"
        )
    return period, calendar


def parse_request(req, prefix: str = "") -> dict:
    """The range (Tehran days, both included), period, calendar and language of a report request
    with fields start_date, end_date, period, calendar, language_code."""
    bad: list[FieldViolation] = []
    start = dates.from_proto(req.start_date, f"{prefix}start_date", bad) if req.HasField("start_date") else None
    end = dates.from_proto(req.end_date, f"{prefix}end_date", bad) if req.HasField("end_date") else None
    if bad:
        raise InvalidArgument(bad)
    if start and end and end < start:
        raise InvalidArgument.field(f"{prefix}end_date", "must not be before start_date")
    period, calendar = check(req.period, req.calendar, prefix)
    lang = "fa" if req.language_code.lower().startswith("fa") else "en"
    return {"start": start, "end": end, "period": period, "calendar": calendar, "lang": lang}


def in_range(day: sa.ColumnElement, q: dict) -> list[sa.ColumnElement]:
    """The conditions keeping a rollup's `day` within a parsed request's start and end (both
    included; none for an open end)."""
    out = []
    if q["start"]:
        out.append(day >= q["start"])
    if q["end"]:
        out.append(day <= q["end"])
    return out


def dimensions(values, allowed: tuple[str, ...], prefix: str = "") -> list[str]:
    """A request's grouping dimensions, lower-cased, once each, in the order asked;
    INVALID_ARGUMENT on `dimensions[i]` for one not in `allowed`."""
    dims: list[str] = []
    for i, d in enumerate(values):
        d = d.strip().lower()
        if d not in allowed:
            raise InvalidArgument.field(
                f"{prefix}dimensions[{i}]", f"unknown dimension {d!r}; use one of {', '.join(allowed)}"
            )
        if d not in dims:
            dims.append(d)
    return dims


def key_expr(day: sa.ColumnElement, period: str, calendar: str) -> sa.ColumnElement:
    """The SQL expression of a row's period key (text, sortable)."""
    f = sa.func
    j = calendar == "jalali"
    if period == "all":
        return sa.literal("")
    if period == "day":
        return f.jalali_date(day) if j else f.to_char(day, "YYYY-MM-DD")
    if period == "week":
        start = f.week_start_saturday(day)
        return f.jalali_date(start) if j else f.to_char(start, "YYYY-MM-DD")
    if period == "month":
        return f.jalali_month(day) if j else f.to_char(day, "YYYY-MM")
    if period == "quarter":
        return f.jalali_quarter(day) if j else f.to_char(day, 'YYYY-"Q"Q')
    if period == "year":
        return f.jalali_year(day) if j else f.to_char(day, "YYYY")
    if period == "weekday":
        return sa.cast(f.weekday_from_saturday(day), sa.Text)
    if period == "day_of_month":
        dom = f.jalali_day_of_month(day) if j else sa.cast(sa.extract("day", day), sa.Integer)
        return f.lpad(sa.cast(dom, sa.Text), 2, "0")
    raise ValueError(period)


def keys_by_day(day: sa.ColumnElement, where: list, period: str, calendar: str) -> sa.CTE:
    """A CTE of (day, period_key) over the distinct days of `day`'s table (in `where`): joined on
    the day, the period functions (PL/pgSQL for Jalali keys) run once per day instead of once per
    rollup row. MATERIALIZED: inlined, PostgreSQL would evaluate them per joined row again."""
    days = sa.select(day.label("day")).where(*where).distinct().subquery("days")
    return (
        sa.select(days.c.day, key_expr(days.c.day, period, calendar).label("period_key"))
        .cte("period_keys")
        .prefix_with("MATERIALIZED")
    )


def label(key: str, period: str, calendar: str, lang: str) -> str:
    """A reader's label of a period key: 'Azar 1405' / 'آذر ۱۴۰۵', 'Saturday' / 'شنبه', ..."""
    fa = lang.lower().startswith("fa")
    digits = to_persian_digits if fa else str
    j = calendar == "jalali"
    if period == "all":
        return "همه" if fa else "All"
    if period == "weekday":
        return (WEEKDAYS_FA if fa else WEEKDAYS_EN)[int(key)]
    if period == "day_of_month":
        return digits(str(int(key)))
    if period == "year":
        return digits(key)
    if period == "quarter":
        y, q = key.split("-Q")
        if j:
            return f"{JALALI_QUARTERS[int(q) - 1]} {digits(y)}" if fa else f"{SEASONS_EN[int(q) - 1]} {y}"
        return f"سه‌ماهه {digits(q)} {digits(y)}" if fa else f"Q{q} {y}"
    if period == "month":
        y, m = key.split("-")
        names = (
            (JALALI_MONTHS if fa else JALALI_MONTHS_EN) if j else (GREGORIAN_MONTHS_FA if fa else GREGORIAN_MONTHS_EN)
        )
        return f"{names[int(m) - 1]} {digits(y)}"
    # day, week: the date itself (a week by its Saturday)
    text = key.replace("-", "/") if j else key
    if period == "week":
        return f"هفته از {digits(text)}" if fa else f"week of {text}"
    return digits(text)


# -- whole months (the monthly rollups) ------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def month_start(day: dt.date, calendar: str) -> dt.date:
    """The first day of `day`'s month in `calendar` (a Jalali month: the Gregorian date of its
    1st; SQL: day - (jalali_day_of_month(day) - 1))."""
    if calendar == "jalali":
        return day - dt.timedelta(days=persian.to_jalali(day).day - 1)
    return day.replace(day=1)


def next_month_start(day: dt.date, calendar: str) -> dt.date:
    """The first day of the month after `day`'s, in `calendar`."""
    return month_start(month_start(day, calendar) + dt.timedelta(days=32), calendar)


def whole_months(start: dt.date | None, end: dt.date | None, calendar: str) -> tuple | None:
    """The whole months of `calendar` within [start, end] (either end open) as (lo, hi): the
    months m with lo <= m < hi (their first days; None: unbounded), the days before lo and from
    hi on being the range's ragged edges; None when no whole month fits."""
    lo = (
        None
        if start is None
        else (start if month_start(start, calendar) == start else next_month_start(start, calendar))
    )
    if end is None:
        hi = None
    else:
        after = end + dt.timedelta(days=1)
        hi = after if month_start(after, calendar) == after else month_start(end, calendar)
    if lo is not None and hi is not None and lo >= hi:
        return None
    return lo, hi
