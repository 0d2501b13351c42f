"""ReportScheduleService (proto crm/reporting/v1/schedules.proto): scheduled reports as an AIP
resource, reportSchedules/{id}, and their runs, reportSchedules/{id}/runs/{run_id}.

A caller sees and changes their own schedules (another's is NOT_FOUND); reports.admin sees and
changes every one. Saving a schedule checks everything a run needs: the report (exporters),
its parameters as the report's Export request, the format against the exporter's, the cron
expression (five fields, croniter), the time zone (IANA) and the recipients. The owner's roles
are kept with it (refreshed whenever the owner saves it): a run is made with them.

Arming: a schedule that is not paused has its recurring timer (schedule_runs.SCHEDULE), set
in the transaction that saves it, and cancelled by a pause or a delete. next_run_time is that
timer's due time; last_run_time and last_run_state are those of its newest run.

Lock order, timer rows then the schedule's row (then, in Delete, its runs), in Update and
Delete: a firing holds its timer's row while it runs, reads the schedule without a lock and
writes its run in transactions of its own, so a change waits for a firing to end and a firing
never waits for a change (no cycle, not even one through the firing's second connection).
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from croniter import croniter
from google.protobuf import json_format

from crm.reporting.v1 import schedules_pb2 as pb
from crm.reporting.v1 import schedules_pb2_grpc
from crm_chassis import dates, timers
from crm_chassis.auth import Principal
from crm_chassis.dates import set_times
from crm_chassis.errors import FieldViolation, InvalidArgument
from crm_chassis.filtering import FieldType, FilterField, FilterSchema, keyset_page, query_fingerprint
from crm_chassis.grpc_server import Registration
from crm_chassis.interceptors import current_principal
from crm_chassis.mail import is_address
from crm_chassis.pagination import PageTokens, page_size
from crm_chassis.resources import ResourceName, UpdateMask, changes, check_etag, etag, required_text, same_requester
from crm_chassis.work_tables import timers as timer_table

from . import exporters
from .schedule_runs import RUN_NOW, SCHEDULE, runs_of
from .schedule_tables import report_schedule_runs as runs
from .schedule_tables import report_schedules as schedules

FIELD = "report_schedule"
SCHEDULE_NAME = ResourceName("reportSchedules/{id}")
RUN_NAME = ResourceName("reportSchedules/{schedule_id}/runs/{id}")
ADMIN = "reports.admin"  # sees and changes every user's schedules
DEFAULT_ZONE = timers.DEFAULT_TIMEZONE
LANGUAGES = ("fa", "en")
MAX_RECIPIENTS = 20
MAX_LOOKBACK_DAYS = 3660
REQUEST_ID_LIMIT = 128

MASK = UpdateMask(
    [
        "display_name",
        "parameters",
        "format",
        "cron",
        "time_zone",
        "recipients",
        "language_code",
        "paused",
        "lookback_days",
    ],
    immutable={"report": "create a schedule of the other report instead", "owner": "", "name": ""},
)
s_ = schedules.c
FILTERS = FilterSchema(
    FilterField("display_name", s_.display_name),
    FilterField("report", s_.report),
    FilterField("format", s_.format),
    FilterField("paused", s_.paused, FieldType.BOOL),
    FilterField("owner", s_.owner),
    FilterField("create_time", s_.create_time, FieldType.TIMESTAMP),
)
NEWEST = [(s_.create_time, True), (s_.id, True)]
RUNS_NEWEST = [(runs.c.slot_time, True), (runs.c.id, True)]

_NEXT = (
    sa.select(timer_table.c.due_at)
    .where(timer_table.c.kind == SCHEDULE, timer_table.c.key == sa.cast(s_.id, sa.Text))
    .scalar_subquery()
)


def _last(column):
    return (
        sa.select(column)
        .where(runs.c.schedule_id == s_.id)
        .order_by(runs.c.slot_time.desc(), runs.c.create_time.desc())
        .limit(1)
        .scalar_subquery()
    )


# A schedule as it is read: its row, the timer's due time and its newest run.
READ = sa.select(
    *s_,
    _NEXT.label("next_run_time"),
    _last(runs.c.slot_time).label("last_run_time"),
    _last(runs.c.state).label("last_run_state"),
)


def _state(value: str | None) -> int:
    return pb.ReportRunState.Value(f"REPORT_RUN_STATE_{value.upper()}") if value else 0


def to_proto(row) -> pb.ReportSchedule:
    m = pb.ReportSchedule(
        name=SCHEDULE_NAME.format(row.id),
        display_name=row.display_name,
        report=row.report,
        format=row.format,
        cron=row.cron,
        time_zone=row.time_zone,
        recipients=list(row.recipients),
        language_code=row.language_code,
        paused=row.paused,
        lookback_days=row.lookback_days,
        last_run_state=_state(row.last_run_state),
        owner=row.owner,
        etag=etag(row.version),
    )
    m.parameters.update(row.parameters or {})
    set_times(m, row, "next_run_time", "last_run_time", "create_time", "update_time")
    return m


def run_to_proto(row) -> pb.ReportScheduleRun:
    trigger = pb.ReportScheduleRun.Trigger.Value(f"TRIGGER_{row.trigger.upper()}")
    m = pb.ReportScheduleRun(
        name=RUN_NAME.format(row.schedule_id, row.id),
        trigger=trigger,
        state=_state(row.state),
        attempts=row.attempts,
        error=row.error or "",
        filename=row.filename or "",
        size_bytes=row.size_bytes or 0,
        row_count=row.row_count or 0,
    )
    set_times(m, row, "slot_time", "sent_time", "create_time", "update_time")
    return m


# -- checks --------------------------------------------------------------------------------------
def check_cron(value: str, where: str) -> str:
    cron = " ".join((value or "").split())
    if not cron:
        raise InvalidArgument.field(where, 'is required: five fields, e.g. "0 8 * * sat" (Saturdays at 08:00)')
    if len(cron.split(" ")) != 5 or not croniter.is_valid(cron):
        raise InvalidArgument.field(
            where,
            f'{cron!r} is not a cron expression of five fields (minute hour day month weekday), e.g. "0 8 * * sat"',
        )
    return cron


def check_zone(value: str, where: str) -> str:
    zone = (value or "").strip() or DEFAULT_ZONE
    if not dates.is_time_zone(zone):
        raise InvalidArgument.field(where, f"{zone!r} is not an IANA time zone (e.g. Asia/Tehran)")
    return zone


def check_recipients(values, where: str, owner: str) -> list[str]:
    found = [v.strip().lower() for v in values if v.strip()]
    if not found:
        if is_address(owner):
            return [owner.lower()]
        raise InvalidArgument.field(where, "name at least one e-mail address")
    if len(found) > MAX_RECIPIENTS:
        raise InvalidArgument.field(where, f"at most {MAX_RECIPIENTS} addresses")
    bad = [
        FieldViolation(f"{where}[{i}]", f"{v!r} is not an e-mail address")
        for i, v in enumerate(found)
        if not is_address(v)
    ]
    if bad:
        raise InvalidArgument(bad)
    return list(dict.fromkeys(found))


def check_language(value: str, where: str) -> str:
    code = (value or "fa").strip().lower().replace("_", "-").split("-")[0]
    if code not in LANGUAGES:
        raise InvalidArgument.field(where, "choose fa or en")
    return code


def check_lookback(value: int, where: str) -> int:
    if not 0 <= value <= MAX_LOOKBACK_DAYS:
        raise InvalidArgument.field(where, f"must be 0 (the parameters' dates) to {MAX_LOOKBACK_DAYS} days")
    return value


def check_window(ex: exporters.Exporter, parameters: dict, lookback: int) -> None:
    """A window of days needs a report with a period, and parameters that give none."""
    if not lookback:
        return
    pair = ex.range_fields()
    where = f"{FIELD}.lookback_days"
    if pair is None:
        raise InvalidArgument.field(where, f"the {ex.name} report takes no period; leave it 0")
    given = [f for f in pair if f in parameters]
    if given:
        raise InvalidArgument.field(where, f"the parameters give {' and '.join(given)}; leave it 0 or drop them")


def _values(m: pb.ReportSchedule, paths, report: str, owner: str) -> dict:
    """The stored values of the named fields of `m` (every problem at once where they are
    independent), for a schedule of `report`."""
    ex = exporters.exporter(report, f"{FIELD}.report")
    checks = {
        "display_name": lambda: required_text(200)(m.display_name, f"{FIELD}.display_name"),
        "parameters": lambda: ex.parameters(json_format.MessageToDict(m.parameters), f"{FIELD}.parameters"),
        "format": lambda: ex.check_format(m.format, f"{FIELD}.format"),
        "cron": lambda: check_cron(m.cron, f"{FIELD}.cron"),
        "time_zone": lambda: check_zone(m.time_zone, f"{FIELD}.time_zone"),
        "recipients": lambda: check_recipients(m.recipients, f"{FIELD}.recipients", owner),
        "language_code": lambda: check_language(m.language_code, f"{FIELD}.language_code"),
        "paused": lambda: bool(m.paused),
        "lookback_days": lambda: check_lookback(m.lookback_days, f"{FIELD}.lookback_days"),
    }
    out, bad = {}, []
    for p in paths:
        try:
            out[p] = checks[p]()
        except InvalidArgument as e:
            bad += e.violations
    if bad:
        raise InvalidArgument(bad)
    return out


def _arm(conn, schedule_id, values: dict) -> None:
    """Set (or cancel, when paused) the schedule's timer at its next cron time in its zone."""
    if values["paused"]:
        timers.cancel(conn, SCHEDULE, str(schedule_id))
    else:
        timers.schedule_recurring(conn, SCHEDULE, str(schedule_id), values["cron"], {}, values["time_zone"])


# -- the use cases -------------------------------------------------------------------------------
class Schedules:
    def __init__(self, rt):
        self.rt = rt
        self.uow = rt.uow
        self.tokens = PageTokens(rt.settings.jwt_secret, "report-schedules")
        self.run_tokens = PageTokens(rt.settings.jwt_secret, "report-schedule-runs")

    @staticmethod
    def _mine(principal: Principal):
        return sa.true() if principal.has(ADMIN) else s_.owner == principal.subject

    def _read(self, conn, schedule_id, name: str, principal: Principal):
        return SCHEDULE_NAME.one(conn, READ.where(s_.id == schedule_id, self._mine(principal)), name)

    def _lock(self, conn, name: str, principal: Principal, field: str = "name", runs_too: bool = False):
        """The schedule's timer row (and with `runs_too` its "run now" timers), then its row,
        locked (NOT_FOUND for another's): a firing in progress holds its timer's row, so this
        waits for it to end before touching the schedule or its runs."""
        sid = SCHEDULE_NAME.parse(name, field).id
        t = timer_table.c
        mine = sa.and_(t.kind == SCHEDULE, t.key == sid)
        if runs_too:
            mine = sa.or_(mine, sa.and_(t.kind == RUN_NOW, t.payload["schedule"].astext == sid))
        conn.execute(sa.select(t.id).where(mine).order_by(t.id).with_for_update())
        q = sa.select(schedules).where(s_.id == sid, self._mine(principal)).with_for_update()
        return SCHEDULE_NAME.one(conn, q, name)

    def create(self, m: pb.ReportSchedule, request_id: str, principal: Principal) -> pb.ReportSchedule:
        if len(request_id) > REQUEST_ID_LIMIT:
            raise InvalidArgument.field("request_id", f"must be at most {REQUEST_ID_LIMIT} characters")
        values = _values(m, MASK.updatable, m.report, principal.subject)
        ex = exporters.exporter(m.report, f"{FIELD}.report")
        report = ex.name
        check_window(ex, values["parameters"], values["lookback_days"])
        try:
            with self.uow.begin() as tx:
                if request_id:
                    seen = tx.execute(sa.select(s_.id, s_.owner).where(s_.request_id == request_id)).one_or_none()
                    if seen is not None:
                        same_requester(seen.owner, principal, "report schedule")
                        return to_proto(tx.execute(READ.where(s_.id == seen.id)).one())
                sid = tx.execute(
                    schedules.insert()
                    .values(
                        **values,
                        report=report,
                        owner=principal.subject,
                        owner_roles=list(principal.roles),
                        request_id=request_id or None,
                    )
                    .returning(s_.id)
                ).scalar_one()
                _arm(tx.conn, sid, values)
                row = tx.execute(READ.where(s_.id == sid)).one()
        except sa.exc.IntegrityError:
            if not request_id:
                raise
            with self.uow.read() as conn:
                seen = conn.execute(READ.where(s_.request_id == request_id)).one()
            same_requester(seen.owner, principal, "report schedule")
            return to_proto(seen)
        return to_proto(row)

    def get(self, name: str, principal: Principal) -> pb.ReportSchedule:
        sid = SCHEDULE_NAME.parse(name).id
        with self.uow.read() as conn:
            return to_proto(self._read(conn, sid, name, principal))

    def list(self, req: pb.ListReportSchedulesRequest, principal: Principal):
        limit = page_size(req.page_size)
        where = FILTERS.compile(req.filter)
        with self.uow.read() as conn:
            rows, token = keyset_page(
                conn,
                READ.where(where, self._mine(principal)),
                NEWEST,
                self.tokens,
                query_fingerprint(req.filter, "", who=principal.subject),
                limit,
                req.page_token,
            )
        return [to_proto(r) for r in rows], token

    def update(self, m: pb.ReportSchedule, mask, principal: Principal) -> pb.ReportSchedule:
        paths = MASK.paths(mask)
        with self.uow.begin() as tx:
            row = self._lock(tx.conn, m.name, principal, f"{FIELD}.name")
            check_etag(m.etag, row.version, m.name)
            values = _values(m, paths, row.report, row.owner)
            check_window(
                exporters.exporter(row.report),
                values.get("parameters", row.parameters),
                values.get("lookback_days", row.lookback_days),
            )
            diff = changes(row._mapping, values)
            write = {c.field: values[c.field] for c in diff}
            if principal.subject == row.owner and list(row.owner_roles) != list(principal.roles):
                write["owner_roles"] = list(principal.roles)  # a run is made with the owner's roles of now
            if write:
                tx.execute(
                    schedules.update()
                    .where(s_.id == row.id)
                    .values(**write, version=s_.version + 1, update_time=sa.func.now())
                )
            if {c.field for c in diff} & {"cron", "time_zone", "paused"}:
                merged = {k: write.get(k, getattr(row, k)) for k in ("cron", "time_zone", "paused")}
                _arm(tx.conn, row.id, merged)
            out = tx.execute(READ.where(s_.id == row.id)).one()
        return to_proto(out)

    def delete(self, req: pb.DeleteReportScheduleRequest, principal: Principal) -> None:
        with self.uow.begin() as tx:
            row = self._lock(tx.conn, req.name, principal, runs_too=True)
            check_etag(req.etag, row.version, req.name)
            tx.execute(schedules.delete().where(s_.id == row.id))  # its runs go with it (cascade)
            timers.cancel(tx.conn, SCHEDULE, str(row.id))
            tx.execute(
                timer_table.delete().where(
                    timer_table.c.kind == RUN_NOW, timer_table.c.payload["schedule"].astext == str(row.id)
                )
            )

    def run_now(self, name: str, principal: Principal) -> pb.ReportScheduleRun:
        sid = SCHEDULE_NAME.parse(name).id
        with self.uow.begin() as tx:
            row = self._read(tx.conn, sid, name, principal)
            run = tx.execute(
                runs.insert()
                .values(schedule_id=row.id, trigger="manual", slot_time=sa.func.now(), state="pending")
                .returning(*runs.c)
            ).one()
            timers.schedule(tx.conn, RUN_NOW, str(run.id), dt.datetime.now(dt.UTC), {"schedule": str(row.id)})
        self.rt.timers.wake()
        return run_to_proto(run)

    def get_run(self, name: str, principal: Principal) -> pb.ReportScheduleRun:
        ids = RUN_NAME.parse(name)
        with self.uow.read() as conn:
            self._read(conn, ids.schedule_id, SCHEDULE_NAME.format(ids.schedule_id), principal)
            q = sa.select(runs).where(runs.c.id == ids.id, runs.c.schedule_id == ids.schedule_id)
            return run_to_proto(RUN_NAME.one(conn, q, name))

    def list_runs(self, req: pb.ListReportScheduleRunsRequest, principal: Principal):
        sid = SCHEDULE_NAME.parse(req.parent, "parent").id
        limit = page_size(req.page_size)
        with self.uow.read() as conn:
            self._read(conn, sid, req.parent, principal)
            rows, token = keyset_page(
                conn,
                sa.select(runs).where(runs.c.schedule_id == sid),
                RUNS_NEWEST,
                self.run_tokens,
                query_fingerprint("", "", parent=req.parent),
                limit,
                req.page_token,
            )
        return [run_to_proto(r) for r in rows], token


class ReportScheduleServicer(schedules_pb2_grpc.ReportScheduleServiceServicer):
    def __init__(self, rt):
        self.rt = rt
        self.uc = Schedules(rt)
        runs_of(rt)  # the firing's objects, shared with the timer handlers

    def CreateReportSchedule(self, request, context):
        return self.uc.create(request.report_schedule, request.request_id, current_principal())

    def GetReportSchedule(self, request, context):
        return self.uc.get(request.name, current_principal())

    def ListReportSchedules(self, request, context):
        found, token = self.uc.list(request, current_principal())
        return pb.ListReportSchedulesResponse(report_schedules=found, next_page_token=token)

    def UpdateReportSchedule(self, request, context):
        return self.uc.update(request.report_schedule, request.update_mask, current_principal())

    def DeleteReportSchedule(self, request, context):
        from google.protobuf import empty_pb2

        self.uc.delete(request, current_principal())
        return empty_pb2.Empty()

    def RunReportSchedule(self, request, context):
        return self.uc.run_now(request.name, current_principal())

    def GetReportScheduleRun(self, request, context):
        return self.uc.get_run(request.name, current_principal())

    def ListReportScheduleRuns(self, request, context):
        found, token = self.uc.list_runs(request, current_principal())
        return pb.ListReportScheduleRunsResponse(runs=found, next_page_token=token)


def registration(rt) -> Registration:
    return Registration.of(ReportScheduleServicer(rt))
