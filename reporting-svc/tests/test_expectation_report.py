"""Report 4's zone of tolerance on hand-computed numbers: three expectation surveys (two agents,
two Tehran days in two Jalali months, a dimension without its perceived level), redelivered and
replayed, beside a CSAT survey; per dimension the adequate, desired and perceived means, MSA,
MSS and the position against the zone; by Jalali month and agent; the export; a bad part."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest

from crm.reporting.v1 import reporting_service_pb2 as rs
from crm.reporting.v1 import reporting_service_pb2_grpc as rsg
from crm.support.v1 import support_events_pb2 as sev
from crm.type.v1 import date_pb2
from crm_chassis.errors import read_rpc_error
from tests.support.harness import channel, md

from .conftest import Feed, ts

D1 = dt.datetime(2026, 11, 21, 6, 0, tzinfo=dt.UTC)  # Tehran 1405-08-30
D2 = dt.datetime(2026, 11, 22, 6, 0, tzinfo=dt.UTC)  # Tehran 1405-09-01
A, B = "agents/a", "agents/b"


def expectation(n: int, agent: str, at: dt.datetime, **levels: tuple[int, int, int]):
    """levels: dimension=(adequate, desired, perceived)."""
    msg = sev.SurveyEvent(
        survey=f"surveys/e{n}", ticket=f"tickets/t{n}", agent=agent, team="teams/desk", kind="expectation",
        answer_time=ts(at),
        dimensions=[
            sev.DimensionScore(dimension=d, adequate=a, desired=w, predicted=5, perceived=p)
            for d, (a, w, p) in levels.items()
        ],
    )  # fmt: skip
    return Feed.event("support", "survey.answered.v1", msg, msg.survey, at)


@pytest.fixture(scope="module")
def stub(svc, feed, ev):
    e1 = expectation(1, A, D1, reliability=(5, 8, 7), responsiveness=(6, 8, 4))
    e2 = expectation(2, B, D2, reliability=(3, 7, 9), responsiveness=(4, 6, 5), empathy=(2, 5, 0))  # no perceived
    e3 = expectation(3, A, D2, empathy=(3, 6, 5))
    feed.deliver(e1, e2, e3, ev.csat(9, 9, A, 4, D1))
    assert feed.deliver(e1) == [False]  # redelivered: the inbox
    feed.deliver(Feed.again(e2))  # replayed under a new id: the version guard
    with channel(svc) as ch:
        yield rsg.ReportingServiceStub(ch)


def zone(rows):
    return [
        (r.period_key, r.agent, r.dimension, r.answers, r.adequate_mean, r.desired_mean, r.perceived_mean,
         r.adequacy, r.superiority, r.zone_position)
        for r in rows
    ]  # fmt: skip


def test_zone_of_tolerance_per_dimension(stub):
    resp = stub.GetSupportReport(rs.GetSupportReportRequest(), metadata=md("analyst"))
    assert zone(resp.expectations) == [
        ("", "", "empathy", 1, 3.0, 6.0, 5.0, 2.0, -1.0, "within"),  # survey 2's empathy has no perceived level
        ("", "", "reliability", 2, 4.0, 7.5, 8.0, 4.0, 0.5, "above"),
        ("", "", "responsiveness", 2, 5.0, 7.0, 4.5, -0.5, -2.5, "below"),
    ]
    assert (resp.total.csat_count, resp.total.csat_average) == (1, 4.0)  # CSAT as before


def test_by_jalali_month_and_agent(stub):
    req = rs.GetSupportReportRequest(period="month", calendar="jalali", dimensions=["agent", "channel"])
    resp = stub.GetSupportReport(req, metadata=md("analyst"))
    assert zone(resp.expectations) == [
        ("1405-08", A, "reliability", 1, 5.0, 8.0, 7.0, 2.0, -1.0, "within"),
        ("1405-08", A, "responsiveness", 1, 6.0, 8.0, 4.0, -2.0, -4.0, "below"),
        ("1405-09", A, "empathy", 1, 3.0, 6.0, 5.0, 2.0, -1.0, "within"),
        ("1405-09", B, "reliability", 1, 3.0, 7.0, 9.0, 6.0, 2.0, "above"),
        ("1405-09", B, "responsiveness", 1, 4.0, 6.0, 5.0, 1.0, -1.0, "within"),
    ]
    assert [r.period_label for r in resp.expectations][:1] == ["Aban 1405"]
    later = rs.GetSupportReportRequest(start_date=date_pb2.Date(year=2026, month=11, day=23))
    assert list(stub.GetSupportReport(later, metadata=md()).expectations) == []


def test_export_and_a_bad_part(stub):
    req = rs.ExportSupportReportRequest(format="csv", part="expectations", dimensions=["agent"], language_code="fa")
    text = b"".join(c.data for c in stub.ExportSupportReport(req, metadata=md())).decode("utf-8-sig")
    lines = text.splitlines()
    assert lines[0] == (
        "دوره,کارشناس,بُعد,پاسخ‌ها,کافی (میانگین),مطلوب (میانگین),دریافت‌شده (میانگین),کفایت (MSA),برتری (MSS),"
        "نسبت به محدوده تحمل"
    )
    assert lines[1:] == [
        "همه,agents/a,empathy,1,3.0,6.0,5.0,2.0,-1.0,within",
        "همه,agents/a,reliability,1,5.0,8.0,7.0,2.0,-1.0,within",
        "همه,agents/a,responsiveness,1,6.0,8.0,4.0,-2.0,-4.0,below",
        "همه,agents/b,reliability,1,3.0,7.0,9.0,6.0,2.0,above",
        "همه,agents/b,responsiveness,1,4.0,6.0,5.0,1.0,-1.0,within",
    ]
    with pytest.raises(grpc.RpcError) as info:
        list(stub.ExportSupportReport(rs.ExportSupportReportRequest(format="csv", part="zones"), metadata=md()))
    assert [v.field for v in read_rpc_error(info.value).field_violations] == ["part"]


def test_the_export_charts_the_zone_of_tolerance(stub):
    """part=expectations pictures the zone (adequate, perceived, desired per dimension and agent),
    not the desk's requests (which that part's answer does not hold)."""
    import xml.etree.ElementTree as ET

    req = rs.ExportSupportReportRequest(format="svg", part="expectations", dimensions=["agent"])
    svg = b"".join(c.data for c in stub.ExportSupportReport(req, metadata=md()))
    texts = {el.text or "" for el in ET.fromstring(svg).iter("{http://www.w3.org/2000/svg}text")}
    assert {"Zone of tolerance", "Adequate (mean)", "Perceived (mean)", "Desired (mean)"} <= texts, texts
    assert {"agents/a / responsiveness", "agents/b / reliability"} <= texts, texts
    assert "Support requests" not in texts
