"""Business time: working hours, holidays and arithmetic in them (SLA clocks, "untouched for
N business hours").

::

    cal = BusinessCalendar()                         # Asia/Tehran, Sat-Wed 08-16, Thu 08-12
    due = cal.add(start, 4)                          # the instant 4 business hours after start
    cal.between(a, b)                                # business seconds in [a, b) (negative if b < a)
    cal.is_open(t), cal.next_open(t), cal.intervals(day)

    BusinessCalendar(
        timezone="Asia/Tehran",
        weekly={"sat": ["08:00-12:00", "13:00-17:00"], "thu": ["08:00-12:00"]},  # others closed
        holiday_country="IR",                        # the `holidays` package's calendar; None: none
        closed_days={date(2026, 5, 1)},              # more closed days
        overrides={date(2026, 3, 19): ["09:00-11:00"], date(2026, 3, 20): []},  # a day's own hours
    )

- A day's hours are ranges of wall-clock time in the calendar's zone, ``start < end``, with
  ``24:00`` for the end of the day (a range never crosses midnight: write two). Several ranges a
  day are allowed; overlapping ones are merged.
- Precedence for one day: an override (its ranges, ``[]`` = closed) wins over everything; else a
  holiday or closed day is closed; else the weekday's hours.
- Holidays come from the `holidays` package (Iran: the Solar Hijri fixed days and the Islamic
  lunar days as it estimates them; governments announce some lunar days late, which is what
  overrides and closed days are for).
- Arithmetic is done on absolute instants (UTC); the ranges are placed by wall clock, so a zone
  with daylight saving gets the right lengths (Tehran has none since 2022; earlier dates follow
  the tz database). Results are aware datetimes in the calendar's zone.
- Instants must be timezone-aware (a naive one is refused: ValueError).
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from zoneinfo import ZoneInfo

UTC = dt.UTC
DAY = 86_400
WEEKDAYS = {"mon": 0, "tue": 1, "wed": 2, "thu": 3, "fri": 4, "sat": 5, "sun": 6}
# Iran's usual working week: Saturday to Wednesday, a half day on Thursday, Friday off.
IRAN_WEEK: dict[int, tuple[str, ...]] = {
    5: ("08:00-16:00",),
    6: ("08:00-16:00",),
    0: ("08:00-16:00",),
    1: ("08:00-16:00",),
    2: ("08:00-16:00",),
    3: ("08:00-12:00",),
}
# How far add() looks for open hours before it gives up (a calendar with no open time at all).
MAX_SEARCH_DAYS = 3 * 366

_RANGE = re.compile(r"\s*([0-9]{1,2}):([0-9]{2})\s*-\s*([0-9]{1,2}):([0-9]{2})\s*")

Range = tuple[int, int]  # seconds after midnight, [start, end)
RangeSpec = str | tuple[dt.time | str, dt.time | str]


def _seconds(t: dt.time | str, end: bool) -> int:
    if isinstance(t, dt.time):
        s = t.hour * 3600 + t.minute * 60 + t.second
        return DAY if end and s == 0 else s
    m = re.fullmatch(r"\s*([0-9]{1,2}):([0-9]{2})\s*", t)
    if not m:
        raise ValueError(f"{t!r}: expected HH:MM")
    return _hm(int(m.group(1)), int(m.group(2)), t)


def _hm(h: int, m: int, text: str) -> int:
    if m > 59 or h > 24 or (h == 24 and m):
        raise ValueError(f"{text!r}: not a time of day (00:00 to 24:00)")
    return h * 3600 + m * 60


def parse_range(spec: RangeSpec) -> Range:
    """``"08:00-12:30"`` or ``(time(8), time(12, 30))`` as seconds after midnight."""
    if isinstance(spec, str):
        m = _RANGE.fullmatch(spec)
        if not m:
            raise ValueError(f"{spec!r}: expected HH:MM-HH:MM")
        a, b = _hm(int(m[1]), int(m[2]), spec), _hm(int(m[3]), int(m[4]), spec)
    else:
        a, b = _seconds(spec[0], False), _seconds(spec[1], True)
    if a >= b:
        raise ValueError(f"{spec!r}: a range ends after it starts (use 24:00 for midnight; split one across it)")
    return a, b


def parse_ranges(specs: Iterable[RangeSpec]) -> tuple[Range, ...]:
    """Ranges sorted, overlapping or touching ones merged."""
    out: list[list[int]] = []
    for a, b in sorted(parse_range(s) for s in specs):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return tuple((a, b) for a, b in out)


def _weekday(key: int | str) -> int:
    if isinstance(key, int) and 0 <= key <= 6:
        return key
    k = str(key).strip().lower()[:3]
    if k not in WEEKDAYS:
        raise ValueError(f"{key!r}: a weekday is 0-6 (Monday 0) or a name (sat, sun, ...)")
    return WEEKDAYS[k]


def _aware(t: dt.datetime, name: str) -> dt.datetime:
    if not isinstance(t, dt.datetime) or t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime")
    return t


class BusinessCalendar:
    """Working hours by weekday, holidays, closed days and per-day overrides, in one zone."""

    def __init__(
        self,
        timezone: str = "Asia/Tehran",
        weekly: Mapping[int | str, Sequence[RangeSpec]] | None = None,
        *,
        holiday_country: str | None = "IR",
        holiday_subdivision: str | None = None,
        closed_days: Iterable[dt.date] = (),
        overrides: Mapping[dt.date, Sequence[RangeSpec]] | None = None,
    ):
        self.timezone = timezone
        self.zone = ZoneInfo(timezone)
        week = IRAN_WEEK if weekly is None else weekly
        self.weekly: dict[int, tuple[Range, ...]] = {d: () for d in range(7)}
        for key, specs in week.items():
            self.weekly[_weekday(key)] = parse_ranges(specs)
        self.holiday_country = holiday_country
        self.holiday_subdivision = holiday_subdivision
        self.closed_days = frozenset(closed_days)
        self.overrides: dict[dt.date, tuple[Range, ...]] = {
            d: parse_ranges(specs) for d, specs in (overrides or {}).items()
        }
        if holiday_country:
            self._holidays_of(dt.date.today().year)  # an unknown country fails here, not later

    def __repr__(self) -> str:
        return f"BusinessCalendar({self.timezone!r}, holidays={self.holiday_country!r})"

    # -- days ------------------------------------------------------------------------------
    @functools.lru_cache(maxsize=64)  # noqa: B019 (a calendar lives as long as the process)
    def _holidays_of(self, year: int) -> Mapping[dt.date, str]:
        if not self.holiday_country:
            return {}
        import holidays  # imported when first needed: it builds many countries' classes

        return dict(
            holidays.country_holidays(self.holiday_country, subdiv=self.holiday_subdivision, years=year).items()
        )

    def holiday(self, day: dt.date) -> str | None:
        """The holiday's name on this day, "closed" for an extra closed day, else None."""
        if day in self.closed_days:
            return "closed"
        return self._holidays_of(day.year).get(day)

    def hours(self, day: dt.date) -> tuple[Range, ...]:
        """The day's open ranges, seconds after its midnight (wall clock)."""
        if day in self.overrides:
            return self.overrides[day]
        if self.holiday(day) is not None:
            return ()
        return self.weekly[day.weekday()]

    def intervals(self, day: dt.date) -> list[tuple[dt.datetime, dt.datetime]]:
        """The day's open intervals as aware datetimes in the calendar's zone."""
        midnight = dt.datetime.combine(day, dt.time(), self.zone)
        out = []
        for a, b in self.hours(day):
            # Wall-clock placement: midnight + offset keeps the zone and recomputes its offset.
            out.append((self._wall(midnight, a), self._wall(midnight, b)))
        return out

    def _wall(self, midnight: dt.datetime, seconds: int) -> dt.datetime:
        if seconds >= DAY:
            nxt = midnight.date() + dt.timedelta(days=1)
            return dt.datetime.combine(nxt, dt.time(), self.zone)
        h, rest = divmod(seconds, 3600)
        return midnight.replace(hour=h, minute=rest // 60, second=rest % 60)

    def _utc_intervals(self, day: dt.date) -> list[tuple[dt.datetime, dt.datetime]]:
        return [(a.astimezone(UTC), b.astimezone(UTC)) for a, b in self.intervals(day)]

    def local_date(self, t: dt.datetime) -> dt.date:
        return _aware(t, "t").astimezone(self.zone).date()

    def is_business_day(self, day: dt.date) -> bool:
        return bool(self.hours(day))

    # -- instants --------------------------------------------------------------------------
    def is_open(self, t: dt.datetime) -> bool:
        """Whether `t` falls in open hours (a range's start is in it, its end is not)."""
        u = _aware(t, "t").astimezone(UTC)
        return any(a <= u < b for a, b in self._utc_intervals(self.local_date(t)))

    def next_open(self, t: dt.datetime) -> dt.datetime:
        """`t` if open, else the start of the next open range."""
        return self.add(t, 0) if self.is_open(t) else self._next_start(t)

    def _next_start(self, t: dt.datetime) -> dt.datetime:
        u = _aware(t, "t").astimezone(UTC)
        day = self.local_date(t)
        for _ in range(MAX_SEARCH_DAYS):
            for a, _b in self._utc_intervals(day):
                if a >= u:
                    return a.astimezone(self.zone)
            day += dt.timedelta(days=1)
        raise ValueError(f"no open hours within {MAX_SEARCH_DAYS} days of {t.isoformat()}")

    def add(self, start: dt.datetime, hours: float | dt.timedelta) -> dt.datetime:
        """The instant at which `hours` business hours have passed since `start` (a start
        outside open hours counts from the next opening; 0 hours is `start` itself)."""
        u = _aware(start, "start").astimezone(UTC)
        left = hours if isinstance(hours, dt.timedelta) else dt.timedelta(hours=hours)
        if left < dt.timedelta(0):
            raise ValueError("hours must not be negative")
        if not left:
            return u.astimezone(self.zone)
        day = self.local_date(start)
        for _ in range(MAX_SEARCH_DAYS):
            for a, b in self._utc_intervals(day):
                if b <= u:
                    continue
                a = max(a, u)
                if left <= b - a:
                    return (a + left).astimezone(self.zone)
                left -= b - a
            day += dt.timedelta(days=1)
        raise ValueError(f"no open hours within {MAX_SEARCH_DAYS} days of {start.isoformat()}")

    def between(self, a: dt.datetime, b: dt.datetime) -> float:
        """Business seconds from `a` to `b` (negative when `b` is before `a`)."""
        ua, ub = _aware(a, "a").astimezone(UTC), _aware(b, "b").astimezone(UTC)
        if ub < ua:
            return -self.between(b, a)
        total = dt.timedelta(0)
        day, last = self.local_date(a), self.local_date(b)
        while day <= last:
            for s, e in self._utc_intervals(day):
                lo, hi = max(s, ua), min(e, ub)
                if hi > lo:
                    total += hi - lo
            day += dt.timedelta(days=1)
        return total.total_seconds()

    def business_hours_between(self, a: dt.datetime, b: dt.datetime) -> float:
        return self.between(a, b) / 3600


def from_settings(
    text: str = "", *, timezone: str = "Asia/Tehran", holiday_country: str | None = "IR"
) -> BusinessCalendar:
    """A calendar from a one-line setting: ``"sat-wed 08:00-16:00; thu 08:00-12:00"`` (days or
    day spans, then ranges separated by commas; unnamed days are closed). Empty: Iran's week."""
    if not text.strip():
        return BusinessCalendar(timezone, holiday_country=holiday_country)
    week: dict[int, list[str]] = {}
    order = ["sat", "sun", "mon", "tue", "wed", "thu", "fri"]  # spans run in Iran's week order
    for part in filter(None, (p.strip() for p in text.split(";"))):
        days, _, ranges = part.partition(" ")
        first, _, last = days.lower().partition("-")
        i, j = order.index(first[:3]), order.index((last or first)[:3])
        span = order[i : j + 1] if i <= j else order[i:] + order[: j + 1]
        for d in span:
            week.setdefault(WEEKDAYS[d], []).extend(r for r in ranges.split(",") if r.strip())
    return BusinessCalendar(timezone, week, holiday_country=holiday_country)
