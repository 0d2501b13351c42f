"""The reporting routes over HTTP through the gateway (its app in-process, real gRPC to the
service): a report with repeated and nested query parameters, a download, a bad period."""

from __future__ import annotations

import datetime as dt

import pytest

from crm.support.v1 import ticket_pb2
from tests.support.harness import gateway_client, token

D = dt.datetime(2026, 11, 21, 6, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def http(svc, feed, ev):
    web = ticket_pb2.Channel.Value("CHANNEL_WEB")
    feed.deliver(
        *ev.tickets(1, agent="agents/a", channel=web, created=D, first_response=120, closed=D + dt.timedelta(days=1))
    )
    client, clients = gateway_client(reporting=f"127.0.0.1:{svc.port}")
    yield client
    clients.close()


def auth(**more):
    return {"Authorization": f"Bearer {token('analyst')}", **more}


def test_support_report_by_jalali_day_and_agent(http):
    r = http.get("/v1/reports/support?period=day&calendar=jalali&dimensions=agent&language_code=fa", headers=auth())
    assert r.status_code == 200, r.data
    rows = r.get_json()["rows"]
    assert [(x["periodKey"], x["agent"], x.get("requests", "0"), x.get("closed", "0")) for x in rows] == [
        ("1405-08-30", "agents/a", "1", "0"),
        ("1405-09-01", "agents/a", "0", "1"),
    ]


def test_export_download(http):
    r = http.get("/v1/reports/support:export?period=month&format=csv", headers=auth(Accept="text/csv"))
    assert r.status_code == 200 and r.mimetype == "text/csv", r.data
    assert r.data.decode("utf-8-sig").splitlines()[1].startswith("November 2026,1,1")


def test_bad_period_is_400_naming_the_field(http):
    r = http.get("/v1/reports/support?period=fortnight", headers=auth())
    assert r.status_code == 400
    assert "period" in r.get_data(as_text=True)
