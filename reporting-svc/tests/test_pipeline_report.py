"""Report 3 over a real broker (a vhost of this module's own) and the live consumer: sales-svc's
opportunity events (versions out of order, IRT, lost and won ones, one without an expected close
date) and forecast snapshots (one delivered twice, one replayed under a new id, one taken after
its period ended, one of another calendar) give hand-computed pipeline and forecast figures, by
Jalali and Gregorian quarter; a rebuild gives the same answers (report 4's zone of tolerance and
report 1's campaign cost too); an empty range answers empty;
bad input names the field; the forecast report over the gateway's HTTP route."""

from __future__ import annotations

import datetime as dt
import zoneinfo
from decimal import Decimal

import grpc
import pytest
import sqlalchemy as sa

from crm.reporting.v1 import pipeline_report_pb2 as pr
from crm.reporting.v1 import reporting_service_pb2 as rs
from crm.reporting.v1 import reporting_service_pb2_grpc as rsg
from crm.sales.v1 import sales_events_pb2 as sev
from crm.type.v1 import date_pb2, money_pb2
from crm_chassis.errors import read_rpc_error
from crm_chassis.messaging.envelope import new_event
from crm_chassis.money import to_decimal
from reporting_svc.__main__ import SPEC
from tests.support.harness import channel, gateway_client, md, start_service, token, wait_for

from .conftest import Feed, ts
from .test_campaign_report import campaign
from .test_expectation_report import expectation
from .test_rebuild import publish

TEHRAN = zoneinfo.ZoneInfo("Asia/Tehran")
S1, S2 = "pipelines/p/stages/s1", "pipelines/p/stages/s2"
NAMES = {S1: "Qualify", S2: "Proposal"}


def day(iso: str) -> date_pb2.Date:
    d = dt.date.fromisoformat(iso)
    return date_pb2.Date(year=d.year, month=d.month, day=d.day)


def at(iso: str, hh: int = 12) -> dt.datetime:
    return dt.datetime.combine(dt.date.fromisoformat(iso), dt.time(hh), TEHRAN)


def opp(n, version, state, owner, units, *, prob=0, category="pipeline", stage=S1, team="teams/t1", close=None,
        closed=None, currency="IRR"):  # fmt: skip
    msg = sev.OpportunityEvent(
        opportunity=f"opportunities/p{n}", state=state, owner=owner, team=team, stage=stage,
        stage_name=NAMES[stage], probability=prob, forecast_category=category, version=version,
        amount=money_pb2.Money(currency_code=currency, units=units), source="website",
    )  # fmt: skip
    if close:
        msg.expected_close_date.CopyFrom(day(close))
    if closed:
        msg.close_time.CopyFrom(ts(at(closed)))
    key = {"open": "opportunity.updated.v1", "won": "opportunity.won.v1", "lost": "opportunity.lost.v1"}[state]
    return Feed.event("sales", key, msg, msg.opportunity, at(closed or "2026-10-01"))


def irr(units: int) -> money_pb2.Money:
    return money_pb2.Money(currency_code="IRR", units=units)


def snapshot(n, owner, period, start, end, created, *, calendar="jalali", unit="quarter", adjusted=None, **amounts):
    msg = sev.ForecastSnapshotEvent(
        forecast_snapshot=f"forecastSnapshots/f{n}", period=period, calendar=calendar, unit=unit,
        period_start_date=day(start), period_end_date=day(end), owner=owner, currency_code="IRR",
        kind="weekly" if adjusted is None else "submitted", submitter="system" if adjusted is None else "boss",
        create_time=ts(at(created)), **{k: irr(v) for k, v in amounts.items()},
    )  # fmt: skip
    if adjusted is not None:
        msg.adjusted_commit.CopyFrom(irr(adjusted))
    return new_event(
        domain="sales", source_service="sales-svc", routing_key="forecast_snapshot.created.v1",
        subject=msg.forecast_snapshot, message=msg,
    )  # fmt: skip


Q3 = ("1405-Q3", "2026-09-23", "2026-12-22")  # 1405/07/01 .. 1405/09/30
Q4 = ("1405-Q4", "2026-12-22", "2027-03-21")


def events():
    snap_b = snapshot(
        2, "ana", *Q3, "2026-11-25", adjusted=6_000_000, open_amount=4_000_000, weighted_amount=1_500_000,
        pipeline_amount=1_000_000, best_case_amount=1_000_000, commit_amount=2_000_000, closed_amount=5_000_000,
        won_amount=5_000_000,
    )  # fmt: skip
    evs = [
        # o1: version 2 before version 1 (the older one changes nothing)
        opp(1, 2, "open", "ana", 1_000_000, prob=20, close="2026-10-15"),
        opp(1, 1, "open", "ana", 500_000, prob=10, close="2026-10-15"),
        opp(2, 1, "open", "ana", 2_000_000, prob=50, category="commit", stage=S2, close="2026-12-10"),
        opp(
            3, 1, "open", "ben", 3_000_000, prob=60, category="best_case", stage=S2, close="2027-01-05", currency="IRT"
        ),
        opp(4, 1, "open", "ben", 400_000, prob=25, team=""),  # no expected close date
        opp(9, 1, "open", "ana", 100_000, prob=10, close="2026-12-23"),  # 1405/10/02: Jalali Q4, Gregorian Q4
        # o5 won, its open version after it
        opp(5, 2, "won", "ana", 5_000_000, prob=100, category="closed", stage=S2, closed="2026-11-20"),
        opp(5, 1, "open", "ana", 5_000_000, prob=70, category="commit", stage=S2, close="2026-11-01"),
        opp(6, 1, "won", "ben", 1_500_000, category="closed", closed="2026-10-01"),
        opp(7, 1, "lost", "ana", 9_000_000, closed="2026-10-20"),
        opp(8, 1, "won", "ana", 700_000, category="closed", closed="2026-12-25"),
        snapshot(
            1,
            "ana",
            *Q3,
            "2026-10-01",
            open_amount=8_000_000,
            weighted_amount=4_000_000,
            pipeline_amount=1_000_000,
            commit_amount=7_000_000,
        ),  # fmt: skip
        snap_b,
        Feed.again(snap_b),  # replayed from the stream under a new id
        snapshot(3, "ana", *Q3, "2026-12-23", closed_amount=5_000_000, won_amount=5_000_000),  # after Q3 ended
        snapshot(4, "ana", *Q4, "2026-12-01", open_amount=1_000_000, commit_amount=1_000_000),
        snapshot(
            5,
            "ana",
            "2026-11",
            "2026-11-01",
            "2026-12-01",
            "2026-11-02",
            calendar="gregorian",
            unit="month",
            commit_amount=42,
        ),  # fmt: skip
        # for the rebuild's comparison: report 4's zone of tolerance, report 1's cost per acquisition
        expectation(1, "agents/a", at("2026-11-20"), reliability=(5, 8, 7)),
        campaign(1, 1, "launched", "leads", money_pb2.Money(units=5), irr(900)),
        campaign_lead(1, "website", "k1"),
        campaign_lead(2, "referral", "k1"),
    ]
    return evs, snap_b


def campaign_lead(n: int, source: str, campaign_id: str):
    msg = sev.LeadEvent(
        lead=f"leads/c{n}", status="new", source=source, campaign_id=campaign_id, version=1,
        create_time=ts(at("2026-11-20")),
    )  # fmt: skip
    return Feed.event("sales", "lead.created.v1", msg, msg.lead, at("2026-11-20"))


@pytest.fixture(scope="module")
def live(databases, own_broker):
    service = start_service(SPEC, databases.fresh("rep_pipeline"), own_broker.url)
    assert service.consumer.ready.wait(10)
    evs, again = events()
    publish(own_broker.url, [*evs, again])  # snapshot 2 delivered twice (the inbox drops the second)

    def applied():
        with service.ctx.engine.connect() as conn:
            return conn.execute(sa.text("SELECT coalesce(sum(applied_events), 0) FROM projection_sources")).scalar()

    # campaign.launched.v1 is not counted in the lag rows: the loyalty projection keeps campaign-svc's
    # row and does not read it (the campaigns projection does)
    wait_for(lambda: applied() == len(evs) - 1, 20, "the live consumer to apply every event")
    with service.ctx.engine.connect() as conn:
        wait_for(lambda: conn.execute(sa.text("SELECT count(*) FROM campaign_facts")).scalar(), 10, "the campaign")
    yield service
    service.stop(0)


@pytest.fixture(scope="module")
def stub(live):
    with channel(live) as ch:
        yield rsg.ReportingServiceStub(ch)


def amount(m: money_pb2.Money) -> Decimal:
    assert m.currency_code == "IRR"
    return to_decimal(m)


def pipe(stub, **kw) -> pr.GetPipelineReportResponse:
    return stub.GetPipelineReport(pr.GetPipelineReportRequest(**kw), metadata=md("analyst"))


def rows(resp):
    return [
        (r.period_key, r.stage, r.owner, r.team, r.forecast_category, r.opportunities, amount(r.amount),
         amount(r.weighted_amount))
        for r in resp.rows
    ]  # fmt: skip


def test_pipeline_now_by_jalali_quarter_and_owner(stub):
    resp = pipe(stub, period="quarter", calendar="jalali", dimensions=["owner"], language_code="fa")
    assert rows(resp) == [
        ("", "", "ben", "", "", 1, 400_000, 100_000),  # no expected close date
        ("1405-Q3", "", "ana", "", "", 2, 3_000_000, 1_200_000),  # o1 (20%) + o2 (50%); o5 won
        ("1405-Q4", "", "ana", "", "", 1, 100_000, 10_000),
        ("1405-Q4", "", "ben", "", "", 1, 30_000_000, 18_000_000),  # 3,000,000 IRT at 60%
    ]
    assert [r.period_label for r in resp.rows] == ["بدون تاریخ", "پاییز ۱۴۰۵", "زمستان ۱۴۰۵", "زمستان ۱۴۰۵"]
    (total,) = resp.totals
    assert (total.opportunities, amount(total.amount), amount(total.weighted_amount)) == (5, 33_500_000, 19_310_000)


def test_pipeline_by_gregorian_quarter_stage_team_and_category(stub):
    greg = pipe(stub, period="quarter", dimensions=["team"])
    assert rows(greg) == [
        ("", "", "", "", "", 1, 400_000, 100_000),
        ("2026-Q4", "", "", "teams/t1", "", 3, 3_100_000, 1_210_000),  # o9 is Gregorian Q4 too
        ("2027-Q1", "", "", "teams/t1", "", 1, 30_000_000, 18_000_000),
    ]
    by_stage = pipe(stub, dimensions=["stage", "forecast_category"])
    assert [(r.stage, r.stage_name, r.forecast_category, r.opportunities, amount(r.amount)) for r in by_stage.rows] == [
        (S1, "Qualify", "pipeline", 3, 1_500_000),
        (S2, "Proposal", "best_case", 1, 30_000_000),
        (S2, "Proposal", "commit", 1, 2_000_000),
    ]
    ranged = pipe(stub, start_date=day("2026-10-01"), end_date=day("2026-12-31"))
    assert [(t.opportunities, amount(t.amount)) for t in ranged.totals] == [(3, 3_100_000)]


def forecast(stub, **kw) -> pr.GetForecastReportResponse:
    return stub.GetForecastReport(pr.GetForecastReportRequest(**kw), metadata=md("analyst"))


def test_forecast_against_actual_per_jalali_quarter_and_owner(stub):
    resp = forecast(stub, period="quarter", calendar="jalali")
    got = {(r.period_key, r.owner): r for r in resp.rows}
    assert list(got) == [("1405-Q3", "ana"), ("1405-Q3", "ben"), ("1405-Q4", "ana")]
    ana = got["1405-Q3", "ana"]
    assert (amount(ana.actual_won), ana.won_opportunities, ana.period_label) == (5_000_000, 1, "Autumn 1405")
    # snapshot 2 once (delivered twice, replayed once), snapshot 3 listed but after the period
    assert [s.snapshot for s in ana.snapshots] == [
        "forecastSnapshots/f1",
        "forecastSnapshots/f2",
        "forecastSnapshots/f3",
    ]
    first, second, late = ana.snapshots
    assert [amount(x) for x in (first.commit, first.best_case, first.pipeline, first.weighted)] == [
        7_000_000, 7_000_000, 8_000_000, 4_000_000,
    ]  # fmt: skip
    assert first.accuracy == pytest.approx(5 / 7) and first.kind == "weekly"
    # the adjusted commit; best case = won 5M + commit 2M + best case 1M; pipeline = won + open
    assert [amount(x) for x in (second.commit, second.best_case, second.pipeline, second.weighted)] == [
        6_000_000, 8_000_000, 9_000_000, 6_500_000,
    ]  # fmt: skip
    assert second.kind == "submitted" and second.create_time.ToDatetime(tzinfo=dt.UTC) == at("2026-11-25")
    assert ana.latest == second and ana.accuracy == pytest.approx(5 / 6)
    assert amount(late.commit) == 5_000_000 and late.accuracy == 1.0
    ben = got["1405-Q3", "ben"]
    assert (amount(ben.actual_won), ben.snapshots, ben.HasField("latest"), ben.accuracy) == (1_500_000, [], False, 0)
    q4 = got["1405-Q4", "ana"]
    assert (amount(q4.actual_won), amount(q4.latest.commit), q4.accuracy) == (700_000, 1_000_000, 0.7)
    only = forecast(stub, calendar="jalali", owners=["ben"], start_date=day("2026-12-01"), end_date=day("2026-12-01"))
    assert [(r.period_key, r.owner) for r in only.rows] == [("1405-Q3", "ben")]


def test_gregorian_quarters_and_months_use_their_own_snapshots(stub):
    greg = forecast(stub, period="quarter", calendar="gregorian")
    assert [(r.period_key, r.owner, amount(r.actual_won), len(r.snapshots)) for r in greg.rows] == [
        ("2026-Q4", "ana", 5_700_000, 0),  # jalali snapshots are not Gregorian quarters' forecasts
        ("2026-Q4", "ben", 1_500_000, 0),
    ]
    month = forecast(stub, period="month", calendar="gregorian", owners=["ana"])
    nov = {r.period_key: r for r in month.rows}["2026-11"]
    assert (amount(nov.actual_won), amount(nov.latest.commit), nov.latest.snapshot) == (
        5_000_000, 42, "forecastSnapshots/f5",
    )  # fmt: skip


def test_an_empty_range_is_empty(stub):
    empty = forecast(stub, start_date=day("2030-01-01"), end_date=day("2030-12-31"))
    assert list(empty.rows) == []
    nothing = pipe(stub, start_date=day("2030-01-01"))
    assert list(nothing.rows) == [] and list(nothing.totals) == []


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda s: forecast(s, period="week"), "period"),
        (lambda s: forecast(s, calendar="julian"), "calendar"),
        (lambda s: pipe(s, dimensions=["owner", "colour"]), "dimensions[1]"),
        (lambda s: pipe(s, start_date=day("2026-12-01"), end_date=day("2026-11-01")), "end_date"),
    ],
)
def test_bad_input_names_the_field(stub, call, field):
    with pytest.raises(grpc.RpcError) as info:
        call(stub)
    view = read_rpc_error(info.value)
    assert view.code == grpc.StatusCode.INVALID_ARGUMENT and [v.field for v in view.field_violations] == [field]


def test_exports(stub):
    req = pr.ExportForecastReportRequest(calendar="jalali", format="csv", owners=["ana"])
    lines = b"".join(c.data for c in stub.ExportForecastReport(req, metadata=md())).decode("utf-8-sig").splitlines()
    assert lines[0].startswith("Period,Owner,Currency,Actual won,Won,Commit,Best case,Pipeline,Weighted,Accuracy")
    assert lines[1].startswith("Autumn 1405,ana,IRR,5000000,1,6000000,8000000,9000000,6500000,0.8333,3,")
    xlsx = pr.ExportPipelineReportRequest(period="month", calendar="jalali", dimensions=["stage"], format="xlsx")
    head = next(iter(stub.ExportPipelineReport(xlsx, metadata=md())))
    assert head.filename.endswith(".xlsx") and head.row_count == 5


def test_forecast_over_http(live):
    client, clients = gateway_client(reporting=f"127.0.0.1:{live.port}")
    try:
        r = client.get(
            "/v1/reports/forecast?period=quarter&calendar=jalali&owners=ben",
            headers={"Authorization": f"Bearer {token('analyst')}"},
        )
        download = client.get(
            "/v1/reports/pipeline:export?format=csv&dimensions=owner",
            headers={"Authorization": f"Bearer {token('analyst')}"},
        )
        body = download.data  # the streamed download, read while the gateway's channels are open
    finally:
        clients.close()
    assert r.status_code == 200, r.data
    (row,) = r.get_json()["rows"]
    assert (row["periodKey"], row["owner"], row["actualWon"]["units"], row["wonOpportunities"]) == (
        "1405-Q3", "ben", "1500000", "1",
    )  # fmt: skip
    assert download.status_code == 200 and download.mimetype == "text/csv", body
    assert body.decode("utf-8-sig").splitlines()[1:] == [
        "All,ana,IRR,3,3100000,1210000",
        "All,ben,IRR,2,30400000,18100000",
    ]


def test_a_rebuild_gives_the_same_answers(live, stub):
    def answers():
        return (
            pipe(stub, period="quarter", calendar="jalali", dimensions=["owner", "stage"]),
            forecast(stub, period="quarter", calendar="jalali"),
            forecast(stub, period="month", calendar="gregorian"),
            stub.GetSupportReport(rs.GetSupportReportRequest(dimensions=["agent"]), metadata=md()),
            stub.GetAcquisitionReport(rs.GetAcquisitionReportRequest(period="month"), metadata=md()),
        )

    before = answers()
    assert [(z.dimension, z.zone_position) for z in before[3].expectations] == [("reliability", "within")]
    costs = [(r.period_key, r.source, r.campaign_cost.units) for r in before[4].rows if r.campaign_cost.units]
    assert costs == [("2026-11", "referral", 450), ("2026-11", "website", 450)]
    with live.ctx.engine.begin() as conn:  # damage the live tables: only the swap repairs them
        conn.execute(sa.text("UPDATE sales_pipeline_daily SET open_amount = open_amount + 1"))
        conn.execute(sa.text("DELETE FROM forecast_snapshot_facts"))
        conn.execute(sa.text("UPDATE expectation_daily SET perceived_sum = 1"))
        conn.execute(sa.text("DELETE FROM campaign_leads_daily"))
    assert answers() != before
    job = stub.RebuildProjections(rs.RebuildProjectionsRequest(request_id="pipeline"), metadata=md())

    def finished():
        j = stub.GetProjectionRebuild(rs.GetProjectionRebuildRequest(name=job.name), metadata=md())
        return j if j.state in ("succeeded", "failed", "cancelled") else None

    done = wait_for(finished, 30, "the rebuild")
    assert (done.state, done.error) == ("succeeded", "")
    assert answers() == before
