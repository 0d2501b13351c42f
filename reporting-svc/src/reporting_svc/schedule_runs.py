"""Firing scheduled reports: each schedule has one recurring chassis timer (kind
`reporting.report_schedule`, key its id, its cron expression in its time zone); "run now" is a
one-shot timer (kind `reporting.report_run`, key the run's id). A firing makes the report's
file in this process (exporters.Exporter.render, as the owner) and mails it as an attachment
(crm_chassis.mail compose + SmtpPool) to the recipients; the timer then arms the next slot.

Exactly one mail per slot. A run is a row keyed (schedule, trigger, slot): the slot is the
timer's due time, the same on every retry of it. Its state is committed in transactions of
its own around the send:

    pending/retrying --(report made; committed)--> sending --(SMTP said 250; committed)--> sent

- A firing that finds the run `sent` (the process died after the send was recorded but before
  the timer advanced) sends nothing and lets the timer move on.
- A firing that finds it `sending` (the process died during the SMTP exchange, or just after
  the server accepted the mail and before `sent` was committed) does not send again: the run
  becomes `failed`, saying so. This is the choice of at most once over at least once: a
  manager who misses one weekly report (and can press "run now") is better served than one
  who gets it twice, and the window is one SMTP exchange. The Message-ID is the run's
  (<report-{run id}@MAIL_DOMAIN>), so a mail system that sees it twice may drop the second.
- An SMTP server that cannot be reached or answers 4xx: the run is `retrying` with the error
  and the handler raises, so the timer retries the same slot with exponential back-off
  (MAX_ATTEMPTS tries, about 18 minutes); after the last one, or on a 5xx answer, `failed`.
- A report that fails (its request is no longer valid, the owner lost the permission): the
  run is `failed` naming the error; no retry (the next slot runs as usual). Other errors
  (the database, say) retry as the SMTP ones do.

The firing writes nothing to report_schedules (its next and last run are read from the timer
and the runs), so an Update holding a schedule's row never waits on a firing, nor it on one.

Settings (environment, crm_chassis.mail): SMTP_HOST (127.0.0.1), SMTP_PORT (2526: the local
sink `make run` starts), SMTP_FROM (reports@crm.local), SMTP_FROM_NAME, MAIL_DOMAIN,
SMTP_STARTTLS, SMTP_USER, SMTP_PASSWORD, SMTP_TIMEOUT_SECONDS.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import uuid
import zoneinfo
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from crm_chassis import timers
from crm_chassis.auth import Principal
from crm_chassis.errors import DomainError
from crm_chassis.mail import Attachment, MailError, SmtpPool, compose, smtp_settings
from crm_chassis.persian import format_jalali, to_persian_digits

from . import exporters
from .schedule_tables import report_schedule_runs as runs
from .schedule_tables import report_schedules as schedules

log = logging.getLogger("reporting.schedules")

SCHEDULE = "reporting.report_schedule"  # recurring, key: the schedule's id
RUN_NOW = "reporting.report_run"  # one-shot, key: the run's id; payload {"schedule": id}
MAX_ATTEMPTS = 12  # with the timer's back-off (1 s doubling, at most 300 s): about 18 minutes
DEFAULT_FROM = "reports@crm.local"
INTERRUPTED = "the send was interrupted (the process stopped during the SMTP exchange); not sent again, so that nobody gets it twice"


class _Retry(Exception):
    """This attempt failed for a reason worth another try (the timer backs off)."""


@dataclass
class Mailer:
    settings: object
    pool: SmtpPool

    @classmethod
    def from_env(cls, env=None) -> Mailer:
        settings = smtp_settings(os.environ if env is None else env, default_from=DEFAULT_FROM)
        return cls(settings, SmtpPool(settings, size=2))


def mailer(rt) -> Mailer:
    return rt.once("report_mailer", Mailer.from_env)


def _local(at: dt.datetime, zone: str) -> dt.datetime:
    try:
        return at.astimezone(zoneinfo.ZoneInfo(zone))
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return at.astimezone(dt.UTC)


def window(row, slot: dt.datetime) -> tuple[dt.datetime, dt.datetime] | None:
    """The period a run covers with lookback_days N: the N whole days (in the schedule's zone)
    before the day of its slot, as (first midnight, the slot day's midnight); None for N = 0."""
    if not row.lookback_days:
        return None
    local = _local(slot, row.time_zone)
    end = dt.datetime.combine(local.date(), dt.time(0), tzinfo=local.tzinfo)
    return end - dt.timedelta(days=row.lookback_days), end


def _days(span: tuple[dt.datetime, dt.datetime]) -> tuple[dt.date, dt.date]:
    """The first and last day of a window (its end is the next day's midnight)."""
    return span[0].date(), span[1].date() - dt.timedelta(days=1)


def message_text(row, slot: dt.datetime, out: exporters.Rendered) -> tuple[str, str]:
    """(subject, body) of the mail of a run, in the schedule's language (fa or en)."""
    local = _local(slot, row.time_zone)
    span = window(row, slot)
    if row.language_code == "fa":
        day = format_jalali(local.date(), persian_digits=True)
        clock = to_persian_digits(local.strftime("%H:%M"))
        rows = to_persian_digits(out.row_count)
        subject = f"گزارش زمان‌بندی‌شده: {row.display_name} ({day})"
        period = ""
        if span:
            first, last = (format_jalali(d, persian_digits=True) for d in _days(span))
            period = f"بازه: {first} تا {last}\n"
        body = (
            f"گزارش «{row.display_name}» برای {day} ساعت {clock} ({row.time_zone}) پیوست است:\n"
            f"{period}{out.filename}، {rows} ردیف.\n\n"
            f"این نامه را زمان‌بندی reportSchedules/{row.id} فرستاده است؛ برای تغییر یا توقف آن به CRM بروید."
        )
    else:
        stamp = local.strftime("%Y-%m-%d %H:%M")
        subject = f"Scheduled report: {row.display_name} ({local.strftime('%Y-%m-%d')})"
        period = ""
        if span:
            first, last = _days(span)
            period = f"Period: {first.isoformat()} to {last.isoformat()}\n"
        body = (
            f'The report "{row.display_name}" for {stamp} ({row.time_zone}) is attached:\n'
            f"{period}{out.filename}, {out.row_count} rows.\n\n"
            f"Sent by the schedule reportSchedules/{row.id}; change or pause it in the CRM."
        )
    return subject, body


def build_mail(m: Mailer, row, run_id, slot: dt.datetime, out: exporters.Rendered) -> bytes:
    subject, body = message_text(row, slot, out)
    headers = [
        ("From", m.settings.from_header),
        ("To", ", ".join(row.recipients)),
        ("Subject", subject),
        ("Message-ID", f"<report-{run_id}@{m.settings.domain}>"),
        ("Auto-Submitted", "auto-generated"),  # RFC 3834: auto-responders do not answer
        ("X-CRM-Report-Schedule", f"reportSchedules/{row.id}"),
    ]
    return compose(headers, body, attachments=[Attachment(out.filename, out.content_type, out.data)])


class Runs:
    """The firing of schedules and "run now"s (one per process: rt.once)."""

    def __init__(self, rt):
        self.rt = rt
        self.engine = rt.engine

    # -- the run record, in transactions of its own ---------------------------------------------
    def _claim(self, schedule_id, timer: timers.Timer, manual: bool):
        """The run of this firing, locked and read in a transaction of its own: created for a
        cron slot on its first attempt; a `sending` one left by a dead process becomes failed."""
        with self.engine.begin() as conn:
            if manual:
                where = runs.c.id == uuid.UUID(timer.key)
            else:
                conn.execute(
                    pg.insert(runs)
                    .values(schedule_id=schedule_id, trigger="schedule", slot_time=timer.due_at, state="pending")
                    .on_conflict_do_nothing(constraint="report_schedule_runs_slot")
                )
                where = sa.and_(
                    runs.c.schedule_id == schedule_id, runs.c.trigger == "schedule", runs.c.slot_time == timer.due_at
                )
            run = conn.execute(sa.select(runs).where(where).with_for_update()).one_or_none()
            if run is not None and run.state == "sending":
                run = conn.execute(
                    runs.update()
                    .where(runs.c.id == run.id)
                    .values(state="failed", error=INTERRUPTED, update_time=sa.func.now())
                    .returning(*runs.c)
                ).one()
                log.warning("scheduled report send was interrupted; not sent again", extra={"run": str(run.id)})
        return run

    def _mark(self, run_id, state: str, **values) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                runs.update().where(runs.c.id == run_id).values(state=state, update_time=sa.func.now(), **values)
            )

    # -- the firing ------------------------------------------------------------------------------
    def fire(self, conn: sa.Connection, timer: timers.Timer) -> None:
        manual = timer.kind == RUN_NOW
        schedule_id = uuid.UUID(timer.payload["schedule"] if manual else timer.key)
        row = conn.execute(sa.select(schedules).where(schedules.c.id == schedule_id)).one_or_none()
        if row is None or (row.paused and not manual):
            if not manual:  # deleted or paused meanwhile: the change cancels the timer too
                timers.cancel(conn, timer.kind, timer.key)
            return
        run = self._claim(row.id, timer, manual)
        if run is None or run.state in ("sent", "failed"):
            return  # deleted with its schedule, already sent, or given up
        attempt = run.attempts + 1
        last = timer.attempt >= MAX_ATTEMPTS
        try:
            ex = exporters.exporter(row.report)
            owner = Principal(row.owner, tuple(row.owner_roles))
            req = ex.request(row.parameters, row.format, row.language_code, window(row, run.slot_time))
            out = ex.render(self.rt, req, owner)
        except DomainError as exc:  # the report refused: it will refuse again; no retry
            self._mark(run.id, "failed", attempts=attempt, error=f"the report failed: {exc.message}"[:2000])
            return
        except Exception as exc:
            error = f"the report failed: {type(exc).__name__}: {exc}"[:2000]
            self._mark(run.id, "failed" if last else "retrying", attempts=attempt, error=error)
            if last:
                return
            raise _Retry(error) from None
        m = mailer(self.rt)
        data = build_mail(m, row, run.id, run.slot_time, out)
        # committed before the send: a firing that finds it so does not send again
        self._mark(
            run.id,
            "sending",
            attempts=attempt,
            filename=out.filename,
            size_bytes=len(out.data),
            row_count=out.row_count,
        )
        try:
            m.pool.send(data, m.settings.sender, list(row.recipients))
        except MailError as exc:
            final = exc.permanent or last
            self._mark(run.id, "failed" if final else "retrying", error=str(exc)[:2000])
            if final:
                return
            raise _Retry(str(exc)) from None
        # anything else raised mid-send leaves it `sending`: whether it went is unknown
        self._mark(run.id, "sent", error=None, sent_time=sa.func.now())


def runs_of(rt) -> Runs:
    return rt.once("report_runs", lambda: Runs(rt))


def timer_handlers(rt) -> None:
    mailer(rt)  # the SMTP settings, read once at start (a bad SMTP_PORT stops the process)
    r = runs_of(rt)
    rt.timers.register(SCHEDULE, r.fire, max_attempts=MAX_ATTEMPTS)
    rt.timers.register(RUN_NOW, r.fire, max_attempts=MAX_ATTEMPTS)
