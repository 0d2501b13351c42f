"""Calendar dates as the contracts carry them (crm.type.v1.Date) and the business day.

- `from_proto(d, field, bad=None)`: a Date message as a `datetime.date`; all zero is None (unset);
  a day the calendar lacks, or (with `business=True`, the default) a year outside
  MIN_YEAR..MAX_YEAR, is a violation naming `field`: appended to `bad` when given (to report
  every field at once), else raised as INVALID_ARGUMENT. Year 1 has no Jalali year and
  9999-12-31 no next day, so a record's dates stay within business years.
- `to_proto(day)`: the other way (None stays None).
- `TEHRAN`, `today()`, `start_of_day(day)`, `end_of_day(day)`: the business day is Asia/Tehran's.
- `country_zones()`: ISO 3166 country code -> the IANA zone its people's clocks keep, for the
  countries where the country alone tells it (from the tzdata package's zone.tab).
"""

from __future__ import annotations

import datetime as dt
import functools
import importlib.resources
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from crm.type.v1 import date_pb2

from .errors import FieldViolation, InvalidArgument

TEHRAN = ZoneInfo("Asia/Tehran")
MIN_YEAR, MAX_YEAR = 1900, 2999


def today() -> dt.date:
    """Today in Asia/Tehran (the business day)."""
    return dt.datetime.now(TEHRAN).date()


def start_of_day(day: dt.date) -> dt.datetime:
    """Midnight at the start of a Tehran day, as an aware datetime."""
    return dt.datetime.combine(day, dt.time(0), tzinfo=TEHRAN)


def end_of_day(day: dt.date) -> dt.datetime:
    """The end of a Tehran day (the next midnight there), as an aware datetime."""
    return start_of_day(day + dt.timedelta(days=1))


def in_range(day: dt.date) -> bool:
    return MIN_YEAR <= day.year <= MAX_YEAR


def out_of_range(day: dt.date) -> str:
    """The description of a date outside the business years."""
    return f"{day.isoformat()} is not a business date: the year must be {MIN_YEAR}..{MAX_YEAR}"


def check(day: dt.date | None, field: str) -> dt.date | None:
    """INVALID_ARGUMENT naming `field` for a date outside the business years."""
    if day is not None and not in_range(day):
        raise InvalidArgument.field(field, out_of_range(day))
    return day


def to_proto(day: dt.date | None) -> date_pb2.Date | None:
    return None if day is None else date_pb2.Date(year=day.year, month=day.month, day=day.day)


def from_proto(
    d: date_pb2.Date, field: str, bad: list[FieldViolation] | None = None, *, business: bool = True
) -> dt.date | None:
    if not (d.year or d.month or d.day):
        return None
    problem = None
    try:
        day = dt.date(d.year, d.month, d.day)
    except ValueError:
        day, problem = None, f"{d.year:04d}-{d.month:02d}-{d.day:02d} is not a calendar date"
    if day is not None and business and not in_range(day):
        day, problem = None, out_of_range(day)
    if problem is None:
        return day
    if bad is None:
        raise InvalidArgument.field(field, problem)
    bad.append(FieldViolation(field, problem))
    return None


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def set_timestamp(ts, value: dt.datetime) -> None:
    """Timestamp.FromDatetime, a few times faster for an aware datetime (one subtraction instead
    of a time tuple): what event building does per row. A naive one is read as UTC, as
    FromDatetime reads it."""
    if value.tzinfo is None:
        ts.FromDatetime(value)
        return
    d = value - _EPOCH
    ts.seconds = d.days * 86400 + d.seconds
    ts.nanos = d.microseconds * 1000


def timestamp(value: dt.datetime | None):
    """A google.protobuf.Timestamp of an aware datetime, or None (a field left unset)."""
    if value is None:
        return None
    from google.protobuf import timestamp_pb2

    out = timestamp_pb2.Timestamp()
    set_timestamp(out, value)
    return out


def set_times(message, row, *fields: str) -> None:
    """Copy these datetime attributes of a row into the message's Timestamp fields of the same
    names (unset where the row has None)."""
    for f in fields:
        value = getattr(row, f)
        if value is not None:
            set_timestamp(getattr(message, f), value)


ZONE_NAME_LIMIT = 64  # the longest IANA name is 30 characters


def is_time_zone(name: str) -> bool:
    """Whether `name` is an IANA time zone this process knows. A name ZoneInfo would take as a
    path it cannot open (too long for the file system, a folder such as "Asia") is not one:
    ZoneInfo raises OSError for those, not ZoneInfoNotFoundError."""
    if not name or len(name) > ZONE_NAME_LIMIT:
        return False
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return False
    return True


@functools.cache
def country_zones() -> dict[str, str]:
    """ISO 3166 alpha-2 code -> an IANA zone, for every country whose zones (zone.tab of the
    tzdata package) all keep the same clock: the same UTC offset in January and in July of
    this year and the next (Iran: Asia/Tehran; Germany: Europe/Berlin, Busingen keeps the
    same time). A country whose zones differ (US, RU, BR, AU...) is absent: its people's time
    zone cannot be told from the country alone. The first zone zone.tab lists is given."""
    text = importlib.resources.files("tzdata").joinpath("zoneinfo/zone.tab").read_text(encoding="utf-8")
    by_country: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        code, _coordinates, zone, *_ = line.split("\t")
        by_country.setdefault(code, []).append(zone)
    year = dt.date.today().year
    instants = [dt.datetime(y, m, 15, 12, tzinfo=dt.UTC) for y in (year, year + 1) for m in (1, 7)]

    def clock(zone: str) -> tuple:
        tz = ZoneInfo(zone)
        return tuple(t.astimezone(tz).utcoffset() for t in instants)

    return {code: zones[0] for code, zones in by_country.items() if len({clock(z) for z in zones}) == 1}
