"""The customer-value routes over HTTP through the gateway (its app in-process, real gRPC to the
service): the Pareto report with query parameters, a customer's value by its
resource path, a CSV download, a bad segment as 400 naming the field."""

from __future__ import annotations

import datetime as dt

import pytest
from google.protobuf import timestamp_pb2

from crm.sales.v1 import sales_events_pb2 as sales
from crm.type.v1 import money_pb2
from tests.support.harness import gateway_client, token


def paid(feed, n: int, customer: str, day: dt.date, net: int):
    at = dt.datetime(day.year, day.month, day.day, 8, tzinfo=dt.UTC)
    t = timestamp_pb2.Timestamp()
    t.FromDatetime(at)
    msg = sales.InvoiceEvent(
        invoice=f"invoices/h{n}", customer=f"customers/{customer}", kind="invoice", state="paid", event_time=t,
        total=money_pb2.Money(currency_code="IRR", units=net),
    )  # fmt: skip
    return feed.event("sales", "invoice.paid.v1", msg, msg.invoice, at)


@pytest.fixture(scope="module")
def http(svc, feed):
    base = dt.date(2026, 6, 1)
    events = [paid(feed, i * 10 + k, f"k{i}", base + dt.timedelta(days=20 * k + i), 100 * (i + 1)) for i in range(5)
              for k in range(1 + i % 3)]  # fmt: skip
    feed.deliver(*events)
    client, clients = gateway_client(reporting=f"127.0.0.1:{svc.port}")
    yield client
    clients.close()


def auth(**more):
    return {"Authorization": f"Bearer {token('analyst')}", **more}


def test_pareto_over_http(http):
    r = http.get("/v1/reports/value/pareto?currency_code=IRR", headers=auth())
    assert r.status_code == 200, r.data
    body = r.get_json()
    # k0 100, k1 2 x 200, k2 3 x 300, k3 400, k4 2 x 500: total 2800; top 1 (k4 1000 or k2 900)
    assert body["customers"] == "5" and body["totalRevenue"]["units"] == "2800" and body["topCustomers"] == "1"
    assert body["topRevenueShare"] == pytest.approx(1000 / 2800)


def test_pareto_over_a_period_given_as_dates_in_the_query(http):
    # the first invoices only (each customer's k = 0 one, on 1..5 June): 100 + 200 + ... + 500 = 1500
    r = http.get("/v1/reports/value/pareto?currency_code=IRR&start_date=2026-06-01&end_date=2026-06-10", headers=auth())
    assert r.status_code == 200, r.data
    assert r.get_json()["totalRevenue"]["units"] == "1500"
    bad = http.get("/v1/reports/value/pareto?start_date=1%20June", headers=auth())
    assert bad.status_code == 400 and "start_date" in bad.get_data(as_text=True)


def test_customer_value_by_resource_path(http):
    r = http.get("/v1/customers/k2/value?horizon_days=90&language_code=fa", headers=auth())
    assert r.status_code == 200, r.data
    body = r.get_json()
    assert body["name"] == "customers/k2/value" and body["purchases"] == 3 and body["historicClv"]["units"] == "900"
    assert body["horizonDays"] == 90 and body["rfm"]["frequency"] == 3


def test_export_csv_download(http):
    r = http.get("/v1/reports/value:export?report=rfm&format=csv", headers=auth(Accept="text/csv"))
    assert r.status_code == 200 and r.mimetype == "text/csv", r.data
    assert r.data.decode("utf-8-sig").splitlines()[0] == "Segment,Customers,Revenue"


def test_bad_segment_is_400_naming_the_field(http):
    r = http.get("/v1/reports/value/rfmSegments/vip/customers", headers=auth())
    assert r.status_code == 400 and "segment" in r.get_data(as_text=True)
