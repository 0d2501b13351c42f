"""Report 5's loyalty part on hand-computed figures: two programmes' ledger movements over two
Tehran days (one at 21:00 UTC, already the next Tehran day), redelivered and replayed; members'
tier changes out of order; the outstanding points at the end of a range."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest

from crm.campaign.v1 import campaign_events_pb2 as cev
from crm.reporting.v1 import reporting_service_pb2 as rs
from crm.reporting.v1 import reporting_service_pb2_grpc as rsg
from crm.type.v1 import date_pb2
from crm_chassis.errors import read_rpc_error
from tests.support.harness import channel, md

from .conftest import Feed, ts

D1 = dt.datetime(2026, 11, 21, 8, 0, tzinfo=dt.UTC)  # Tehran 2026-11-21
LATE = dt.datetime(2026, 11, 21, 21, 0, tzinfo=dt.UTC)  # Tehran 2026-11-22 00:30
D2 = dt.datetime(2026, 11, 22, 8, 0, tzinfo=dt.UTC)
P, Q = "programs/gold", "programs/club"


def points(n: int, programme: str, kind: str, pts: int, at: dt.datetime):
    msg = cev.PointsEvent(
        entry=f"{programme}/members/c{n}/movements/{n}-{kind}-{pts}", account=f"{programme}/members/c{n}",
        customer=f"customers/c{n}", programme=programme, kind=kind, points=pts, event_time=ts(at),
    )  # fmt: skip
    return Feed.event("campaign", f"points.{kind}.v1", msg, msg.entry, at)


def tier(n: int, programme: str, before: str, after: str, at: dt.datetime):
    msg = cev.TierEvent(
        account=f"{programme}/members/c{n}", customer=f"customers/c{n}", programme=programme,
        previous_tier=before, tier=after, direction="upgrade", event_time=ts(at),
    )  # fmt: skip
    return Feed.event("campaign", "tier.changed.v1", msg, msg.account, at)


@pytest.fixture(scope="module")
def stub(svc, feed):
    earned = points(1, P, "earned", 500, D1)
    feed.deliver(earned, points(2, P, "earned", 300, D1), points(1, P, "redeemed", -200, LATE))
    assert feed.deliver(earned) == [False]  # redelivered
    feed.deliver_batch(
        Feed.again(earned),  # replayed: the same ledger entry, counted once
        points(3, Q, "earned", 1000, D2),
        points(3, Q, "expired", -100, D2),
        points(2, P, "adjusted", 50, D2),
        tier(1, P, "silver", "gold", D2),
        tier(1, P, "", "silver", D1),  # older, after the newer: changes nothing
        tier(2, P, "", "silver", D1),
        tier(3, Q, "", "basic", D1),
    )
    with channel(svc) as ch:
        yield rsg.ReportingServiceStub(ch)


def report(stub, **kw) -> rs.GetLoyaltyReportResponse:
    return stub.GetLoyaltyReport(rs.GetLoyaltyReportRequest(**kw), metadata=md("analyst"))


def test_points_per_tehran_day_and_programme(stub):
    rows = [
        (r.period_key, r.programme, r.earned, r.redeemed, r.expired, r.adjusted, r.net)
        for r in report(stub, period="day").rows
    ]
    assert rows == [
        ("2026-11-21", P, 800, 0, 0, 0, 800),
        ("2026-11-22", Q, 1000, 0, -100, 0, 900),
        ("2026-11-22", P, 0, -200, 0, 50, -150),  # the redemption at 21:00 UTC is on the Tehran 22nd
    ]


def test_outstanding_points_at_the_end_of_the_range_and_tiers(stub):
    whole = report(stub)
    assert {b.programme: b.outstanding_points for b in whole.outstanding} == {P: 650, Q: 900}
    first_day = report(stub, end_date=date_pb2.Date(year=2026, month=11, day=21), period="month")
    assert {b.programme: b.outstanding_points for b in first_day.outstanding} == {P: 800}
    assert [(r.period_key, r.net) for r in first_day.rows] == [("2026-11", 800)]
    assert [(t.programme, t.tier, t.accounts) for t in whole.tiers] == [
        (Q, "basic", 1),
        (P, "gold", 1),
        (P, "silver", 1),
    ]
    only = report(stub, programmes=[Q])
    assert [r.programme for r in only.rows] == [Q] and [t.tier for t in only.tiers] == ["basic"]


def test_a_range_without_data_is_empty_and_bad_period_names_the_field(stub):
    empty = report(stub, start_date=date_pb2.Date(year=2027, month=1, day=1))
    assert list(empty.rows) == []
    with pytest.raises(grpc.RpcError) as err:
        report(stub, period="fortnight")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in read_rpc_error(err.value).field_violations] == ["period"]
