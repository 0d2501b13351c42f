"""Scheduled reports (schedules.py, schedule_runs.py) through real gRPC, PostgreSQL and SMTP
(aiosmtpd on loopback): a schedule fires on its chassis timer (driven here with run_once), the
mail carries the report's XLSX, the timer re-arms at the next cron slot in Asia/Tehran; an
SMTP outage retries and then sends once; a send interrupted by a crash is not repeated; a
restart keeps the schedule; bad input is INVALID_ARGUMENT naming the field; a stale etag is
ABORTED; another user neither sees nor changes my schedule; the routes over the gateway."""

from __future__ import annotations

import datetime as dt
import io
import threading
import zoneinfo

import grpc
import openpyxl
import pytest
import sqlalchemy as sa
from croniter import croniter
from google.protobuf import field_mask_pb2

from crm.customer.v1 import customer_events_pb2, customer_pb2
from crm.reporting.v1 import schedules_pb2 as pb
from crm.reporting.v1 import schedules_pb2_grpc
from crm_chassis.errors import read_rpc_error
from reporting_svc.__main__ import SPEC
from reporting_svc.schedule_runs import INTERRUPTED, RUN_NOW, SCHEDULE
from reporting_svc.schedule_tables import report_schedule_runs
from tests.support.harness import channel, gateway_client, md, start_service, token, wait_for
from tests.support.smtp_capture import SmtpCapture

TEHRAN = zoneinfo.ZoneInfo("Asia/Tehran")
DAILY = "30 8 * * *"  # 08:30 in Tehran: 05:00 UTC (Iran keeps no daylight saving time)
MANAGER = "maryam@example.com"
OTHER = "reza@example.com"
SENT = pb.REPORT_RUN_STATE_SENT
RETRYING = pb.REPORT_RUN_STATE_RETRYING
FAILED = pb.REPORT_RUN_STATE_FAILED


class Smtp:
    """The SMTP server the service sends to, which a test may stop and start on the same port."""

    def __init__(self):
        self.server = SmtpCapture().start()
        self.port = self.server.port
        self.seen: list = []

    def stop(self):
        self.seen += self.server.messages()
        self.server.stop()
        self.server = None

    def start(self):
        self.server = SmtpCapture(port=self.port).start()

    def messages(self):
        return self.seen + (self.server.messages() if self.server else [])


@pytest.fixture(scope="module")
def smtp():
    s = Smtp()
    yield s
    if s.server:
        s.server.stop()


def _start(databases_url, broker, smtp):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SMTP_PORT", str(smtp.port))
        mp.setenv("SMTP_FROM", "reports@crm.test")
        mp.setenv("MAIL_DOMAIN", "crm.test")
        service = start_service(SPEC, databases_url, broker.url, consumers=False)
    w = service.ctx.shared["runtime"].timers
    w.stop()
    w._stopping.clear()  # stopped, yet run_once fires what is due, in the test's thread
    return service, w


@pytest.fixture(scope="module")
def svc(databases, broker, smtp):
    service, _ = _start(databases.fresh("rep_schedules"), broker, smtp)
    yield service
    service.stop(0)


@pytest.fixture(scope="module")
def worker(svc):
    return svc.ctx.shared["runtime"].timers


def customer(feed, n: int, source: str):
    c = customer_pb2.Customer(name=f"customers/s{n}", acquisition_source=source, etag='"1"')
    c.create_time.FromDatetime(dt.datetime(2026, 11, 20, 8, 0, tzinfo=dt.UTC))
    return feed.event("customer", "customer.created.v1", customer_events_pb2.CustomerCreated(customer=c), c.name)


@pytest.fixture(scope="module")
def stub(svc, feed):
    feed.deliver(*(customer(feed, n, "website") for n in range(3)), customer(feed, 9, "referral"))
    with channel(svc) as ch:
        yield schedules_pb2_grpc.ReportScheduleServiceStub(ch)


def create(stub, who=MANAGER, roles="sales_manager", **fields):
    values = dict(display_name="Daily sources", report="customers-by-source", cron=DAILY, language_code="en")
    values.update(fields)
    s = pb.ReportSchedule(**{k: v for k, v in values.items() if k != "parameters"})
    if "parameters" in values:
        s.parameters.update(values["parameters"])
    return stub.CreateReportSchedule(pb.CreateReportScheduleRequest(report_schedule=s), metadata=md(roles, who))


def violation(call) -> list[str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    return [v.field for v in read_rpc_error(info.value).field_violations]


def previous_slot(cron: str = DAILY) -> dt.datetime:
    return croniter(cron, dt.datetime.now(TEHRAN)).get_prev(dt.datetime).astimezone(dt.UTC)


def due_now(svc, schedule_name: str, slot: dt.datetime | None = None) -> dt.datetime:
    """Drive the schedule's timer: its slot moved to a past cron time (`slot`, default the
    newest past one), due now."""
    slot = slot or previous_slot()
    with svc.ctx.engine.begin() as conn:
        n = conn.execute(
            sa.text("UPDATE timers SET due_at = :slot, next_attempt_at = :slot WHERE kind = :kind AND key = :key"),
            {"slot": slot, "kind": SCHEDULE, "key": schedule_name.split("/")[1]},
        ).rowcount
    assert n == 1, "the schedule has no timer"
    return slot


def retry_now(svc, schedule_name: str) -> None:
    """The retry of a failed attempt made due now (its back-off skipped), the slot kept."""
    with svc.ctx.engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE timers SET next_attempt_at = now() WHERE kind = :kind AND key = :key"),
            {"kind": SCHEDULE, "key": schedule_name.split("/")[1]},
        )


def runs(stub, name, who=MANAGER):
    return stub.ListReportScheduleRuns(
        pb.ListReportScheduleRunsRequest(parent=name), metadata=md("sales_manager", who)
    ).runs


def get(stub, name, who=MANAGER, roles="sales_manager"):
    return stub.GetReportSchedule(pb.GetReportScheduleRequest(name=name), metadata=md(roles, who))


def attachment(mail):
    files = [p for p in mail.iter_attachments()]
    assert len(files) == 1
    return files[0]


def sheet_rows(data: bytes) -> list[list]:
    ws = openpyxl.load_workbook(io.BytesIO(data)).active
    return [[c.value for c in row] for row in ws.iter_rows()]


def assert_next_slot(s: pb.ReportSchedule) -> None:
    """next_run_time is the next 08:30 in Tehran after now."""
    nxt = s.next_run_time.ToDatetime(tzinfo=dt.UTC)
    now = dt.datetime.now(dt.UTC)
    assert now < nxt <= now + dt.timedelta(days=1)
    local = nxt.astimezone(TEHRAN)
    assert (local.hour, local.minute, local.second) == (8, 30, 0)
    assert (nxt.hour, nxt.minute) == (5, 0)  # Tehran is UTC+03:30 all year


def test_create_fire_mail_the_xlsx_and_rearm(svc, stub, worker, smtp):
    s = create(stub, recipients=["Boss@Example.com", "team@example.com"], format="xlsx")
    assert s.name.startswith("reportSchedules/") and s.owner == MANAGER and s.time_zone == "Asia/Tehran"
    assert list(s.recipients) == ["boss@example.com", "team@example.com"] and s.etag == '"1"'
    assert_next_slot(s)
    before = len(smtp.messages())
    slot = due_now(svc, s.name)
    assert worker.run_once() == 1
    mails = smtp.messages()[before:]
    assert len(mails) == 1
    mail = mails[0]
    assert mail["To"] == "boss@example.com, team@example.com" and mail["From"] == "reports@crm.test"
    assert "Daily sources" in mail["Subject"] and mail["Message-ID"].endswith("@crm.test>")
    assert "is attached" in mail.get_body(("plain",)).get_content()
    f = attachment(mail)
    assert f.get_filename().startswith("customers-by-source-") and f.get_filename().endswith(".xlsx")
    rows = sheet_rows(f.get_content())
    assert ["website", 3] in rows and ["referral", 1] in rows
    (run,) = runs(stub, s.name)
    assert run.state == SENT and run.trigger == pb.ReportScheduleRun.TRIGGER_SCHEDULE and run.attempts == 1
    assert run.slot_time.ToDatetime(tzinfo=dt.UTC) == slot and run.HasField("sent_time") and run.row_count == 2
    again = get(stub, s.name)
    assert again.last_run_state == SENT and again.last_run_time.ToDatetime(tzinfo=dt.UTC) == slot
    assert_next_slot(again)  # re-armed at the next 08:30 Tehran
    assert worker.run_once() == 0 and len(smtp.messages()) == before + 1  # nothing fires twice


def test_smtp_outage_retries_then_sends_exactly_once(svc, stub, worker, smtp):
    s = create(stub, display_name="Outage", recipients=["boss@example.com"])
    before = len(smtp.messages())
    smtp.stop()
    try:
        slot = due_now(svc, s.name)
        assert worker.run_once() == 1
        (run,) = runs(stub, s.name)
        assert run.state == RETRYING and "unreachable" in run.error and run.attempts == 1
        retry_now(svc, s.name)
        assert worker.run_once() == 1  # still down: a second attempt of the same slot
        (run,) = runs(stub, s.name)
        assert run.state == RETRYING and run.attempts == 2
    finally:
        smtp.start()
    retry_now(svc, s.name)
    assert worker.run_once() == 1
    (run,) = runs(stub, s.name)  # the same run: one per slot
    assert run.state == SENT and run.error == "" and run.slot_time.ToDatetime(tzinfo=dt.UTC) == slot
    mails = [m for m in smtp.messages()[before:] if "Outage" in m["Subject"]]
    assert len(mails) == 1
    assert_next_slot(get(stub, s.name))
    assert worker.run_once() == 0 and len([m for m in smtp.messages() if "Outage" in m["Subject"]]) == 1


def test_a_send_interrupted_by_a_crash_is_not_sent_again(svc, stub, worker, smtp):
    """A run left `sending` (the process died in the SMTP exchange): not sent a second time."""
    s = create(stub, display_name="Crashed", recipients=["boss@example.com"])
    slot = previous_slot()
    with svc.ctx.engine.begin() as conn:
        conn.execute(
            report_schedule_runs.insert().values(
                schedule_id=s.name.split("/")[1], trigger="schedule", slot_time=slot, state="sending", attempts=1
            )
        )
    due_now(svc, s.name, slot)
    worker.run_once()
    (run,) = runs(stub, s.name)
    assert run.state == FAILED and run.error == INTERRUPTED
    assert not [m for m in smtp.messages() if "Crashed" in m["Subject"]]
    assert_next_slot(get(stub, s.name))


def test_run_now_in_persian(svc, stub, worker, smtp):
    s = create(stub, display_name="منابع روزانه", language_code="fa", recipients=["boss@example.com"])
    run = stub.RunReportSchedule(pb.RunReportScheduleRequest(name=s.name), metadata=md("sales_manager", MANAGER))
    assert run.state == pb.REPORT_RUN_STATE_PENDING and run.trigger == pb.ReportScheduleRun.TRIGGER_MANUAL
    assert worker.run_once() == 1
    done = stub.GetReportScheduleRun(
        pb.GetReportScheduleRunRequest(name=run.name), metadata=md("sales_manager", MANAGER)
    )
    assert done.state == SENT
    (mail,) = [m for m in smtp.messages() if "منابع روزانه" in m["Subject"]]
    assert mail["Subject"].startswith("گزارش زمان‌بندی‌شده") and "پیوست" in mail.get_body(("plain",)).get_content()
    rows = sheet_rows(attachment(mail).get_content())
    assert rows[0][:2] == ["منبع جذب", "مشتریان"] or ["منبع جذب", "مشتریان"] in rows
    assert_next_slot(get(stub, s.name))  # the schedule's own time did not move


def test_lookback_days_make_each_run_cover_the_days_before_it(svc, stub, worker, smtp):
    """Customers of the fixture were created on 2026-11-20; a run on the 25th (08:30 Tehran)
    with 7 days covers the 18th to the 24th, with 3 days the 22nd to the 24th."""
    slot = dt.datetime(2026, 11, 25, 5, 0, tzinfo=dt.UTC)
    week = create(stub, display_name="Last week", lookback_days=7, recipients=["boss@example.com"])
    days3 = create(stub, display_name="Last 3 days", lookback_days=3, recipients=["boss@example.com"])
    for s in (week, days3):
        due_now(svc, s.name, slot)
    assert worker.run_once() == 2
    (w,) = [m for m in smtp.messages() if "Last week" in m["Subject"]]
    assert "Period: 2026-11-18 to 2026-11-24" in w.get_body(("plain",)).get_content()
    assert ["website", 3] in sheet_rows(attachment(w).get_content())
    (d,) = [m for m in smtp.messages() if "Last 3 days" in m["Subject"]]
    assert not [r for r in sheet_rows(attachment(d).get_content()) if r and r[0] == "website"]
    assert violation(lambda: create(stub, lookback_days=-1)) == ["report_schedule.lookback_days"]
    assert violation(lambda: create(stub, lookback_days=7, parameters={"start_time": "2026-01-01T00:00:00Z"})) == [
        "report_schedule.lookback_days"
    ]


def test_a_report_that_fails_names_the_error(svc, stub, worker, smtp):
    s = create(stub, display_name="No rights", recipients=["boss@example.com"])
    with svc.ctx.engine.begin() as conn:  # the owner has lost reports.read since they saved it
        conn.execute(
            sa.text("UPDATE report_schedules SET owner_roles = '{accountant}' WHERE id = :id"),
            {"id": s.name.split("/")[1]},
        )
    due_now(svc, s.name)
    worker.run_once()
    (run,) = runs(stub, s.name)
    assert run.state == FAILED and "reports.read" in run.error and run.attempts == 1
    assert get(stub, s.name).last_run_state == FAILED
    assert_next_slot(get(stub, s.name))  # no retry of this slot; the next one runs as usual


def test_bad_input_names_the_field(stub):
    assert violation(lambda: create(stub, cron="every day")) == ["report_schedule.cron"]
    assert violation(lambda: create(stub, cron="0 8 * * * *")) == ["report_schedule.cron"]
    assert violation(lambda: create(stub, report="weather")) == ["report_schedule.report"]
    assert violation(lambda: create(stub, parameters={"colour": "red"})) == ["report_schedule.parameters.colour"]
    assert violation(lambda: create(stub, parameters={"format": "csv"})) == ["report_schedule.parameters.format"]
    assert violation(lambda: create(stub, parameters={"start_time": "yesterday"})) == [
        "report_schedule.parameters.start_time"
    ]
    assert violation(lambda: create(stub, report="acquisition", parameters={"period": "fortnight"})) == [
        "report_schedule.parameters.period"
    ]
    assert violation(lambda: create(stub, report="value", parameters={"report": "horoscope"})) == [
        "report_schedule.parameters.report"
    ]
    assert violation(lambda: create(stub, format="docx")) == ["report_schedule.format"]
    assert violation(lambda: create(stub, time_zone="Mars/Olympus")) == ["report_schedule.time_zone"]
    assert violation(lambda: create(stub, recipients=["a@example.com", "not-an-address"])) == [
        "report_schedule.recipients[1]"
    ]
    assert violation(lambda: create(stub, who="maryam", recipients=[])) == ["report_schedule.recipients"]
    assert violation(lambda: create(stub, language_code="de")) == ["report_schedule.language_code"]
    # well-formed parameters are kept in the request's JSON form; the owner's address by default
    ok = create(stub, report="acquisition", parameters={"period": "month", "calendar": "jalali"}, format="csv")
    assert dict(ok.parameters) == {"period": "month", "calendar": "jalali"} and list(ok.recipients) == [MANAGER]


def test_bad_names_masks_and_tokens_are_named(stub):
    who = md("sales_manager", MANAGER)
    assert violation(
        lambda: stub.GetReportSchedule(pb.GetReportScheduleRequest(name="reportSchedules/x"), metadata=who)
    ) == ["name"]
    assert violation(
        lambda: stub.GetReportScheduleRun(pb.GetReportScheduleRunRequest(name="reportSchedules/x/runs/y"), metadata=who)
    ) == ["name"]
    assert violation(
        lambda: stub.ListReportScheduleRuns(pb.ListReportScheduleRunsRequest(parent="customers/1"), metadata=who)
    ) == ["parent"]
    assert violation(
        lambda: stub.ListReportSchedules(pb.ListReportSchedulesRequest(page_token="forged"), metadata=who)
    ) == ["page_token"]
    s = create(stub, display_name="Masked")
    for mask, field in ((["report"], "update_mask"), ([], "update_mask"), (["colour"], "update_mask")):
        assert violation(
            lambda mask=mask: stub.UpdateReportSchedule(
                pb.UpdateReportScheduleRequest(
                    report_schedule=pb.ReportSchedule(name=s.name, report="support"),
                    update_mask=field_mask_pb2.FieldMask(paths=mask),
                ),
                metadata=who,
            )
        ) == [field]
    missing = "reportSchedules/00000000-0000-4000-8000-000000000000"
    with pytest.raises(grpc.RpcError) as info:
        stub.RunReportSchedule(pb.RunReportScheduleRequest(name=missing), metadata=who)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_update_with_a_stale_etag_is_aborted_and_changes_rearm(svc, stub):
    s = create(stub, display_name="Weekly", cron="0 8 * * sat")
    mask = field_mask_pb2.FieldMask(paths=["display_name"])
    changed = stub.UpdateReportSchedule(
        pb.UpdateReportScheduleRequest(
            report_schedule=pb.ReportSchedule(name=s.name, etag=s.etag, display_name="Weekly sources"), update_mask=mask
        ),
        metadata=md("sales_manager", MANAGER),
    )
    assert changed.display_name == "Weekly sources" and changed.etag != s.etag
    with pytest.raises(grpc.RpcError) as info:
        stub.UpdateReportSchedule(
            pb.UpdateReportScheduleRequest(
                report_schedule=pb.ReportSchedule(name=s.name, etag=s.etag, display_name="x"), update_mask=mask
            ),
            metadata=md("sales_manager", MANAGER),
        )
    assert info.value.code() == grpc.StatusCode.ABORTED
    assert violation(
        lambda: stub.UpdateReportSchedule(
            pb.UpdateReportScheduleRequest(
                report_schedule=pb.ReportSchedule(name=s.name, cron="61 * * * *"),
                update_mask=field_mask_pb2.FieldMask(paths=["cron"]),
            ),
            metadata=md("sales_manager", MANAGER),
        )
    ) == ["report_schedule.cron"]
    daily = stub.UpdateReportSchedule(
        pb.UpdateReportScheduleRequest(
            report_schedule=pb.ReportSchedule(name=s.name, cron=DAILY),
            update_mask=field_mask_pb2.FieldMask(paths=["cron"]),
        ),
        metadata=md("sales_manager", MANAGER),
    )
    assert_next_slot(daily)  # re-armed on the new expression
    paused = stub.UpdateReportSchedule(
        pb.UpdateReportScheduleRequest(
            report_schedule=pb.ReportSchedule(name=s.name, paused=True),
            update_mask=field_mask_pb2.FieldMask(paths=["paused"]),
        ),
        metadata=md("sales_manager", MANAGER),
    )
    assert paused.paused and not paused.HasField("next_run_time")
    with svc.ctx.engine.connect() as conn:
        assert not conn.execute(
            sa.text("SELECT count(*) FROM timers WHERE kind = :k AND key = :key"),
            {"k": SCHEDULE, "key": s.name.split("/")[1]},
        ).scalar()
    resumed = stub.UpdateReportSchedule(
        pb.UpdateReportScheduleRequest(
            report_schedule=pb.ReportSchedule(name=s.name, paused=False),
            update_mask=field_mask_pb2.FieldMask(paths=["paused"]),
        ),
        metadata=md("sales_manager", MANAGER),
    )
    assert_next_slot(resumed)
    stub.DeleteReportSchedule(
        pb.DeleteReportScheduleRequest(name=s.name, etag=resumed.etag), metadata=md("sales_manager", MANAGER)
    )
    with pytest.raises(grpc.RpcError) as info:
        get(stub, s.name)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with svc.ctx.engine.connect() as conn:  # its timer went with it
        assert not conn.execute(
            sa.text("SELECT count(*) FROM timers WHERE key = :key"), {"key": s.name.split("/")[1]}
        ).scalar()


def test_a_delete_waits_for_a_firing_in_progress_and_never_blocks_it(svc, stub):
    """A firing holds its timer's row and writes its run on a connection of its own: a delete
    must wait at the timer before it touches the runs, or the two would wait for each other
    (across two connections, where PostgreSQL sees no deadlock)."""
    s = create(stub, display_name="Busy")
    run = stub.RunReportSchedule(pb.RunReportScheduleRequest(name=s.name), metadata=md("sales_manager", MANAGER))
    run_id = run.name.rsplit("/", 1)[1]
    engine = svc.ctx.engine
    firing = engine.connect()
    held = firing.begin()
    firing.execute(
        sa.text("SELECT id FROM timers WHERE kind = :k AND key = :key FOR UPDATE"), {"k": RUN_NOW, "key": run_id}
    )
    failed: list = []

    def delete():
        try:
            stub.DeleteReportSchedule(
                pb.DeleteReportScheduleRequest(name=s.name), metadata=md("sales_manager", MANAGER)
            )
        except grpc.RpcError as exc:
            failed.append(exc)

    t = threading.Thread(target=delete)
    t.start()
    try:

        def waiting() -> int:
            with engine.connect() as conn:
                return conn.execute(
                    sa.text(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    )
                ).scalar()

        wait_for(
            waiting,
            what="the delete waiting for the firing",
        )
        with engine.begin() as own:  # the firing records its run as schedule_runs does: not blocked
            own.execute(sa.text("SET LOCAL lock_timeout = '10s'"))
            own.execute(report_schedule_runs.update().where(report_schedule_runs.c.id == run_id).values(state="sent"))
    finally:
        held.commit()
        firing.close()
        t.join(60)
    assert not t.is_alive() and not failed
    with pytest.raises(grpc.RpcError) as info:
        get(stub, s.name)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with engine.connect() as conn:  # its runs and its "run now" timer went with it
        assert not conn.execute(sa.select(sa.func.count()).where(report_schedule_runs.c.id == run_id)).scalar()
        assert not conn.execute(sa.text("SELECT count(*) FROM timers WHERE key = :key"), {"key": run_id}).scalar()


def test_another_user_neither_sees_nor_changes_my_schedule(stub):
    mine = create(stub, display_name="Mine")
    with pytest.raises(grpc.RpcError) as info:
        get(stub, mine.name, who=OTHER)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    theirs = stub.ListReportSchedules(pb.ListReportSchedulesRequest(), metadata=md("support_manager", OTHER))
    assert mine.name not in [x.name for x in theirs.report_schedules]
    for call in (
        lambda: stub.UpdateReportSchedule(
            pb.UpdateReportScheduleRequest(
                report_schedule=pb.ReportSchedule(name=mine.name, display_name="taken"),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
            ),
            metadata=md("support_manager", OTHER),
        ),
        lambda: stub.DeleteReportSchedule(
            pb.DeleteReportScheduleRequest(name=mine.name), metadata=md("support_manager", OTHER)
        ),
        lambda: stub.RunReportSchedule(
            pb.RunReportScheduleRequest(name=mine.name), metadata=md("support_manager", OTHER)
        ),
        lambda: stub.ListReportScheduleRuns(
            pb.ListReportScheduleRunsRequest(parent=mine.name), metadata=md("support_manager", OTHER)
        ),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert get(stub, mine.name).display_name == "Mine"
    assert get(stub, mine.name, who="root", roles="admin").owner == MANAGER  # an admin sees every one
    with pytest.raises(grpc.RpcError) as info:  # an analyst may read reports, not schedule them
        stub.ListReportSchedules(pb.ListReportSchedulesRequest(), metadata=md("analyst", OTHER))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_list_pages_and_filters(stub):
    for i in range(3):
        create(stub, who="pager@example.com", display_name=f"Page {i}", paused=i == 1)
    who = md("sales_manager", "pager@example.com")
    first = stub.ListReportSchedules(pb.ListReportSchedulesRequest(page_size=2), metadata=who)
    assert [s.display_name for s in first.report_schedules] == ["Page 2", "Page 1"] and first.next_page_token
    rest = stub.ListReportSchedules(
        pb.ListReportSchedulesRequest(page_size=2, page_token=first.next_page_token), metadata=who
    )
    assert [s.display_name for s in rest.report_schedules] == ["Page 0"] and not rest.next_page_token
    paused = stub.ListReportSchedules(pb.ListReportSchedulesRequest(filter="paused = true"), metadata=who)
    assert [s.display_name for s in paused.report_schedules] == ["Page 1"]
    assert violation(
        lambda: stub.ListReportSchedules(pb.ListReportSchedulesRequest(filter="colour = 1"), metadata=who)
    ) == ["filter"]


def test_a_restart_keeps_the_schedule(databases, broker, smtp):
    url = databases.fresh("rep_sched_restart")
    first, _ = _start(url, broker, smtp)
    try:
        with channel(first) as ch:
            s = create(
                schedules_pb2_grpc.ReportScheduleServiceStub(ch), display_name="Survivor", recipients=["b@example.com"]
            )
    finally:
        first.stop(0)
    second, worker = _start(url, broker, smtp)
    try:
        with channel(second) as ch:
            stub = schedules_pb2_grpc.ReportScheduleServiceStub(ch)
            again = get(stub, s.name)
            assert again.display_name == "Survivor" and again.etag == s.etag
            assert_next_slot(again)
            due_now(second, s.name)
            assert worker.run_once() == 1
            assert runs(stub, s.name)[0].state == SENT
        assert len([m for m in smtp.messages() if "Survivor" in m["Subject"]]) == 1
    finally:
        second.stop(0)


def test_over_http_through_the_gateway(svc, stub, worker, smtp):
    http, clients = gateway_client(reporting=f"127.0.0.1:{svc.port}")
    try:
        auth = {"Authorization": f"Bearer {token('sales_manager', MANAGER)}"}
        body = {
            "displayName": "Over HTTP",
            "report": "customers-by-source",
            "cron": "0 9 * * sat",
            "format": "xlsx",
            "recipients": ["boss@example.com"],
            "languageCode": "en",
        }
        r = http.post("/v1/reportSchedules", json=body, headers=auth)
        assert r.status_code == 201, r.data
        s = r.get_json()
        assert s["name"].startswith("reportSchedules/") and s["timeZone"] == "Asia/Tehran" and s["nextRunTime"]
        assert http.get(f"/v1/{s['name']}", headers=auth).get_json()["displayName"] == "Over HTTP"
        run = http.post(f"/v1/{s['name']}:run", json={}, headers=auth)
        assert run.status_code == 200, run.data
        assert worker.run_once() == 1
        listed = http.get(f"/v1/{s['name']}/runs", headers=auth).get_json()["runs"]
        assert [x["state"] for x in listed] == ["REPORT_RUN_STATE_SENT"]
        bad = http.post("/v1/reportSchedules", json={**body, "cron": "soon"}, headers=auth)
        assert bad.status_code == 400 and "cron" in [e["field"] for e in bad.get_json()["errors"]]  # the body's field
        gone = http.delete(f"/v1/{s['name']}", headers=auth)
        assert gone.status_code == 200, gone.data
    finally:
        clients.close()
