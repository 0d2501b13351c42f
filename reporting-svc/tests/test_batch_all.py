"""The live path's batches across routing keys (Subscription.batch_all -> Facts.apply_many):
one service gets a support desk's and a sales team's events one by one, another the same
events shuffled into consumer batches that mix every routing key (replays and older versions
among them); their reports are the same."""

from __future__ import annotations

import datetime as dt
import random

import pytest

from crm.reporting.v1 import reporting_service_pb2 as rs
from crm.reporting.v1 import reporting_service_pb2_grpc as rsg
from crm.support.v1 import support_events_pb2 as sev
from crm.support.v1 import ticket_pb2
from reporting_svc.__main__ import SPEC
from tests.support.harness import channel, md, start_service

from .conftest import Feed

UTC = dt.UTC
D1 = dt.datetime(2026, 11, 21, 6, 0, tzinfo=UTC)
H = dt.timedelta(hours=1)
EMAIL, WEB = (ticket_pb2.Channel.Value(f"CHANNEL_{c}") for c in ("EMAIL", "WEB"))


def call(n: int, agent: str, at: dt.datetime, version: int) -> object:
    msg = sev.CallEvent(call=f"calls/k{n}", agent=agent, outcome="answered", version=version)
    msg.start_time.FromDatetime(at)
    return Feed.event("support", "call.logged.v1", msg, msg.call, at)


def events(ev) -> list:
    out = []
    for n in range(1, 13):
        out += ev.tickets(
            n, agent=f"agents/a{n % 3}", channel=EMAIL if n % 2 else WEB, created=D1 + n * H,
            first_response=300 * n, resolved=900 * n if n % 4 else None,
            closed=D1 + (n + 30) * H if n % 3 == 0 else None, exchanges=n % 5, complaint=n % 5 == 0,
        )  # fmt: skip
        out.append(ev.csat(n, n, f"agents/a{n % 3}", 1 + n % 5, D1 + (n + 2) * H))
        if n % 4 == 0:
            out.append(ev.breach(n, "resolution", f"agents/a{n % 3}", D1 + (n + 3) * H))
        out += [call(n, f"agents/a{n % 3}", D1 + n * H, 1), call(n, f"agents/b{n % 2}", D1 + n * H, 2)]
        out += [ev.lead(n, f"src{n % 3}", "new", D1, 1), ev.lead(n, f"src{n % 3}", "converted", D1, 2, at=D1 + 9 * H)]
        out += [ev.opportunity(n, f"src{n % 3}", "won", "IRR", 1000 * n, D1 + 5 * H, 2)]
        if n % 2:
            out.append(ev.opportunity(n, f"src{n % 3}", "open", "IRR", 1000 * n, None, 3))  # reopened
    return out


@pytest.fixture(scope="module")
def pair(databases, broker, ev):
    one = start_service(SPEC, databases.fresh("rep_batchall_one"), broker.url, consumers=False)
    many = start_service(SPEC, databases.fresh("rep_batchall_many"), broker.url, consumers=False)
    try:
        todo = events(ev)
        Feed(one).deliver(*todo)
        shuffled = todo + [ev.again(e) for e in todo[::5]]  # replays, of old versions too
        random.Random(7).shuffle(shuffled)
        feed = Feed(many)
        assert feed.subs["support"].batch_all is not None and feed.subs["sales"].batch_all is not None
        for i in range(0, len(shuffled), 40):
            feed.deliver_batch(*shuffled[i : i + 40])
        with channel(one) as a, channel(many) as b:
            yield rsg.ReportingServiceStub(a), rsg.ReportingServiceStub(b)
    finally:
        one.stop(0)
        many.stop(0)


def test_mixed_batches_give_the_same_support_report_as_one_by_one(pair):
    req = rs.GetSupportReportRequest(period="day", dimensions=["agent", "channel"])
    a, b = (s.GetSupportReport(req, metadata=md("analyst")) for s in pair)
    assert a.total.requests == 12 and a.total.calls == 12  # the figures are there at all
    # each call's second version (CallEvent.version 2) names agents/b*: it wins in both
    assert {r.agent for r in b.rows if r.calls} == {"agents/b0", "agents/b1"}
    assert a == b


def test_mixed_batches_give_the_same_acquisition_report_as_one_by_one(pair):
    req = rs.GetAcquisitionReportRequest(period="day")
    a, b = (s.GetAcquisitionReport(req, metadata=md("analyst")) for s in pair)
    assert sum(r.leads for r in a.rows) == 12 and sum(r.won_opportunities for r in a.rows) == 6
    assert a == b
