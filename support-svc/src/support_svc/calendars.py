"""A team's business calendar: its `calendars` row (weekly hours, zone, holiday country) plus
the admin's `calendar_days` (extra closed days, days with their own hours), as a
crm_chassis.business_time.BusinessCalendar. A team without a calendar uses the default one
(Asia/Tehran, Saturday to Wednesday 08-16, Thursday 08-12, Iran's holidays).

Calendars are cached per process by (id, version) with a short life, so SLA arithmetic over
many tickets reads each calendar once; an edit bumps the version and is seen at once by the
process that made it, and within CACHE_SECONDS by the others.
"""

from __future__ import annotations

import time

import sqlalchemy as sa

from crm_chassis.business_time import BusinessCalendar

from .tables import calendar_days, calendars, teams

CACHE_SECONDS = 30.0
DEFAULT = BusinessCalendar()
_cache: dict[str, tuple[int, float, BusinessCalendar]] = {}
_VERSION = sa.select(calendars.c.version).where(calendars.c.id == sa.bindparam("id"))
_OF_TEAM = (
    sa.select(calendars.c.id, calendars.c.version)
    .select_from(teams.join(calendars, calendars.c.id == teams.c.calendar_id))
    .where(teams.c.id == sa.bindparam("team"))
)


def build(row, days) -> BusinessCalendar:
    """The BusinessCalendar of a calendars row and its calendar_days rows."""
    weekly = {day: [f"{a}-{b}" for a, b in ranges] for day, ranges in (row.weekly_hours or {}).items()}
    closed = {d.day for d in days if d.kind == "closed"}
    overrides = {d.day: [f"{a}-{b}" for a, b in d.ranges] for d in days if d.kind == "open"}
    return BusinessCalendar(
        row.timezone,
        weekly,
        holiday_country=row.holiday_country or None,
        closed_days=closed,
        overrides=overrides,
    )


def calendar(conn: sa.Connection, calendar_id: str | None) -> BusinessCalendar:
    """The calendar by id (the default one for None or a missing id)."""
    if not calendar_id:
        return DEFAULT
    version = conn.execute(_VERSION, {"id": str(calendar_id)}).scalar()
    return of_version(conn, calendar_id, version)


def of_version(conn: sa.Connection, calendar_id: str | None, version: int | None) -> BusinessCalendar:
    """The calendar by id whose current version the caller has just read (in a statement of
    its own, e.g. joined to the tickets it computes): the cached one when it is of that version
    and still fresh, else read (two statements). None for either: the default calendar."""
    if not calendar_id or version is None:
        return DEFAULT
    key = str(calendar_id)
    hit = _cache.get(key)
    if hit is not None and hit[0] == version and hit[1] > time.monotonic():
        return hit[2]
    row = conn.execute(sa.select(calendars).where(calendars.c.id == key)).one_or_none()
    if row is None:
        return DEFAULT
    days = conn.execute(sa.select(calendar_days).where(calendar_days.c.calendar_id == key)).all()
    cal = build(row, days)
    _cache[key] = (row.version, time.monotonic() + CACHE_SECONDS, cal)
    return cal


def calendar_of_team(conn: sa.Connection, team_id: str | None) -> BusinessCalendar:
    """The calendar the team works by (the default one for no team or no calendar): one
    statement (the team's calendar and its version) when the calendar is cached."""
    if not team_id:
        return DEFAULT
    row = conn.execute(_OF_TEAM, {"team": str(team_id)}).one_or_none()
    return DEFAULT if row is None else of_version(conn, row.id, row.version)


def forget(calendar_id: str) -> None:
    """Drop a cached calendar (after an edit in this process)."""
    _cache.pop(str(calendar_id), None)
