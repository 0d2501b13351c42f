"""Report 4, the support desk, on hand-computed numbers: five tickets over two Tehran days (one
opened at 00:15 Tehran, still the previous UTC day), two agents, known first-response and
resolution times, one complaint, one SLA breach, three CSAT surveys; events delivered out of
order and replayed."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest

from crm.reporting.v1 import reporting_service_pb2 as rs
from crm.reporting.v1 import reporting_service_pb2_grpc as rsg
from crm.support.v1 import ticket_pb2
from crm.type.v1 import date_pb2
from crm_chassis.errors import read_rpc_error
from tests.support.harness import channel, md

UTC = dt.UTC
D1 = dt.datetime(2026, 11, 21, 6, 0, tzinfo=UTC)  # Saturday; Tehran 1405-08-30
D2 = dt.datetime(2026, 11, 22, 6, 0, tzinfo=UTC)  # Sunday; Tehran 1405-09-01
A, B = "agents/a", "agents/b"
EMAIL, WEB, PHONE = (ticket_pb2.Channel.Value(f"CHANNEL_{c}") for c in ("EMAIL", "WEB", "PHONE"))
H = dt.timedelta(hours=1)


@pytest.fixture(scope="module")
def stub(svc, feed, ev):
    t1 = ev.tickets(
        1, agent=A, channel=EMAIL, created=D1, first_response=600, resolved=3600, closed=D1 + 2 * H, exchanges=2
    )
    t2 = ev.tickets(
        2, agent=A, channel=EMAIL, created=D1 + H, first_response=1200, resolved=7200, closed=D2,
        exchanges=4, complaint=True, res_met=False,
    )  # fmt: skip
    t3 = ev.tickets(3, agent=B, channel=WEB, created=D2, first_response=300, exchanges=1)
    t4 = ev.tickets(
        4,
        agent=B,
        channel=WEB,
        created=D2 + H,
        first_response=900,
        resolved=1800,
        closed=D2 + 3 * H,
        exchanges=3,
        policy=False,
    )
    # 20:45 UTC on the 21st is 00:15 on the 22nd in Tehran: a request of the second day
    t5 = ev.tickets(5, agent=B, channel=PHONE, created=dt.datetime(2026, 11, 21, 20, 45, tzinfo=UTC))
    feed.deliver(*t1, *t3, *t4, *t5)
    # t2 out of order: closed (v4) first, then the older versions, which must change nothing
    feed.deliver(t2[3], t2[1], t2[0], t2[2])
    # replays: the same delivery again (inbox) and older versions from the stream (version guard)
    assert feed.deliver(t1[2]) == [False]
    feed.deliver(ev.again(t1[0]), ev.again(t1[1]), ev.again(t2[2]))
    surveys = [ev.csat(1, 1, A, 5, D1 + 3 * H), ev.csat(2, 2, A, 3, D2 + H), ev.csat(3, 4, B, 2, D2 + 4 * H)]
    feed.deliver(*surveys, ev.again(surveys[0]))
    late = ev.breach(2, "resolution", A, D1 + 3 * H)
    feed.deliver(late, ev.again(late))
    with channel(svc) as ch:
        yield rsg.ReportingServiceStub(ch)


def report(stub, **kw) -> rs.GetSupportReportResponse:
    return stub.GetSupportReport(rs.GetSupportReportRequest(**kw), metadata=md("analyst"))


def test_totals_are_the_hand_computed_figures(stub):
    t = report(stub).total
    assert (t.requests, t.closed, t.complaints) == (5, 3, 1)
    assert t.complaint_rate == pytest.approx(0.2)
    assert t.avg_first_response_seconds == pytest.approx((600 + 1200 + 300 + 900) / 4)
    assert t.avg_resolution_seconds == pytest.approx((3600 + 7200 + 1800) / 3)
    assert t.avg_exchanges == pytest.approx(10 / 5)
    # targets: t1 2 met, t2 1 of 2 (resolution late), t3 first response met; t4 has no policy,
    # t5 is unanswered
    assert (t.sla_targets, t.sla_attainment) == (5, pytest.approx(4 / 5))
    assert t.sla_breaches == 1
    assert (t.csat_count, t.csat_average) == (3, pytest.approx(10 / 3))


def test_requests_per_tehran_day_in_both_calendars(stub):
    g = report(stub, period="day")
    assert [(r.period_key, r.requests, r.closed) for r in g.rows] == [("2026-11-21", 2, 1), ("2026-11-22", 3, 2)]
    j = report(stub, period="day", calendar="jalali", language_code="fa")
    assert [(r.period_key, r.period_label, r.requests) for r in j.rows] == [
        ("1405-08-30", "۱۴۰۵/۰۸/۳۰", 2),
        ("1405-09-01", "۱۴۰۵/۰۹/۰۱", 3),
    ]


def test_jalali_month_splits_where_the_gregorian_month_does_not(stub):
    j = report(stub, period="month", calendar="jalali")
    assert [(r.period_key, r.period_label, r.requests) for r in j.rows] == [
        ("1405-08", "Aban 1405", 2),
        ("1405-09", "Azar 1405", 3),
    ]
    g = report(stub, period="month")
    assert [(r.period_key, r.period_label, r.requests) for r in g.rows] == [("2026-11", "November 2026", 5)]
    fa = report(stub, period="month", calendar="jalali", language_code="fa")
    assert [r.period_label for r in fa.rows] == ["آبان ۱۴۰۵", "آذر ۱۴۰۵"]
    q = report(stub, period="quarter", calendar="jalali")
    assert [(r.period_key, r.period_label, r.requests) for r in q.rows] == [("1405-Q3", "Autumn 1405", 5)]


def test_weekday_from_saturday_and_day_of_month(stub):
    w = report(stub, period="weekday")
    assert [(r.period_key, r.period_label, r.requests) for r in w.rows] == [("0", "Saturday", 2), ("1", "Sunday", 3)]
    weeks = report(stub, period="week")  # Saturday to Friday: one week
    assert [(r.period_key, r.requests) for r in weeks.rows] == [("2026-11-21", 5)]
    dom = report(stub, period="day_of_month", calendar="jalali")
    assert [(r.period_key, r.requests) for r in dom.rows] == [("01", 3), ("30", 2)]


def test_closed_per_agent_beside_their_satisfaction(stub):
    rows = {r.agent: r for r in report(stub, dimensions=["agent"]).rows}
    assert (rows[A].closed, rows[A].csat_count, rows[A].csat_average) == (2, 2, pytest.approx(4.0))
    assert (rows[B].closed, rows[B].csat_count, rows[B].csat_average) == (1, 1, pytest.approx(2.0))
    assert (rows[A].requests, rows[B].requests) == (2, 3)
    per_channel = {r.channel: r.requests for r in report(stub, dimensions=["channel"]).rows if r.requests}
    assert per_channel == {"email": 2, "web": 2, "phone": 1}


def test_date_range_and_a_period_without_data(stub):
    day2 = date_pb2.Date(year=2026, month=11, day=22)
    only = report(stub, start_date=day2, end_date=day2)
    assert (only.total.requests, only.total.closed) == (3, 2)
    empty = report(stub, start_date=date_pb2.Date(year=2027, month=1, day=1), period="month")
    assert list(empty.rows) == [] and empty.total.requests == 0


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"period": "fortnight"}, "period"),
        ({"calendar": "lunar"}, "calendar"),
        ({"dimensions": ["agent", "mood"]}, "dimensions[1]"),
        ({"start_date": date_pb2.Date(year=2026, month=2, day=30)}, "start_date"),
        (
            {
                "start_date": date_pb2.Date(year=2026, month=3, day=2),
                "end_date": date_pb2.Date(year=2026, month=3, day=1),
            },
            "end_date",
        ),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(stub, kw, field):
    with pytest.raises(grpc.RpcError) as info:
        report(stub, **kw)
    err = read_rpc_error(info.value)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.field_violations[0].field == field


def test_export_csv_and_xlsx_and_a_bad_format(stub):
    import io

    import openpyxl

    req = dict(period="month", calendar="jalali", dimensions=["agent"])
    chunks = list(stub.ExportSupportReport(rs.ExportSupportReportRequest(**req, format="csv"), metadata=md()))
    assert chunks[0].content_type.startswith("text/csv") and chunks[0].filename.endswith(".csv")
    text = b"".join(c.data for c in chunks).decode("utf-8-sig")
    lines = text.strip().splitlines()
    assert lines[0].startswith("Period,Agent,Requests,Closed")
    assert lines[1].startswith("Aban 1405,agents/a,2,1") and chunks[0].row_count == 3
    x = list(stub.ExportSupportReport(rs.ExportSupportReportRequest(**req, format="xlsx"), metadata=md()))
    ws = openpyxl.load_workbook(io.BytesIO(b"".join(c.data for c in x))).active
    values = [[c.value for c in row] for row in ws.iter_rows()]
    assert ["Azar 1405", "agents/b", 3] in [v[:3] for v in values]
    with pytest.raises(grpc.RpcError) as info:
        list(stub.ExportSupportReport(rs.ExportSupportReportRequest(**req, format="docx"), metadata=md()))
    assert read_rpc_error(info.value).field_violations[0].field == "format"
    bad = rs.ExportSupportReportRequest(period="x", format="csv")
    with pytest.raises(grpc.RpcError) as info:
        list(stub.ExportSupportReport(bad, metadata=md()))
    assert read_rpc_error(info.value).field_violations[0].field == "period"


def test_lag_per_producer(stub):
    status = stub.GetProjectionStatus(rs.GetProjectionStatusRequest(), metadata=md())
    support = {p.domain: p for p in status.producers}["support"]
    assert support.applied_events >= 20
    assert support.last_event_time.ToDatetime(tzinfo=UTC) == D2 + 4 * H  # the newest event time applied
