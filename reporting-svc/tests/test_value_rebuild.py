"""Customer value through the real broker: invoice events published to sales' exchange build
invoice_value_facts and customer_value_daily live; RebuildProjections replays the event log into
fresh tables and the value reports answer the same (the live rollup is damaged first, so only a
real swap passes)."""

from __future__ import annotations

import datetime as dt

import pika
import pytest
import sqlalchemy as sa
from google.protobuf import timestamp_pb2

from crm.reporting.v1 import reporting_service_pb2 as rs
from crm.reporting.v1 import reporting_service_pb2_grpc as rsg
from crm.reporting.v1 import value_pb2 as pb
from crm.reporting.v1 import value_pb2_grpc as pbg
from crm.sales.v1 import sales_events_pb2 as sales
from crm.type.v1 import date_pb2, money_pb2
from crm_chassis.messaging.envelope import new_event
from crm_chassis.messaging.topology import declare_producer
from reporting_svc.__main__ import SPEC
from tests.support.harness import channel, md, start_service, wait_for

UTC = dt.UTC


@pytest.fixture(scope="module")
def live(databases, own_broker):
    service = start_service(SPEC, databases.fresh("rep_value_rebuild"), own_broker.url)
    assert service.consumer.ready.wait(10)
    yield service
    service.stop(0)


def invoice(n: int, customer: str, day: int, net: int, state="paid", kind="invoice", hour=8):
    at = dt.datetime(2026, 11, day, hour, tzinfo=UTC)
    t = timestamp_pb2.Timestamp()
    t.FromDatetime(at)
    msg = sales.InvoiceEvent(
        invoice=f"invoices/i{n}", customer=f"customers/{customer}", kind=kind, state=state, event_time=t,
        total=money_pb2.Money(currency_code="IRR", units=net), tax_total=money_pb2.Money(currency_code="IRR"),
    )  # fmt: skip
    key = "invoice.credited.v1" if kind == "credit_note" else f"invoice.{state}.v1"
    return new_event(domain="sales", source_service="sales-svc", routing_key=key, subject=msg.invoice, message=msg)


def publish(url: str, events) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        declare_producer(ch, "sales")
        for e in events:
            ch.basic_publish(e.exchange, e.routing_key, e.data, e.amqp_properties())
    finally:
        conn.close()


def applied(live) -> int:
    with live.ctx.engine.connect() as conn:
        return conn.execute(sa.text("SELECT coalesce(sum(applied_events), 0) FROM projection_sources")).scalar()


def test_rebuild_gives_the_same_value_answers(live, own_broker):
    events = [
        invoice(1, "a", 2, 500, state="issued"),
        invoice(1, "a", 3, 500),  # paid
        invoice(1, "a", 2, 500, state="issued", hour=6),  # older, after: ignored
        invoice(2, "a", 10, 300),
        invoice(3, "b", 4, 200),
        invoice(4, "b", 12, 50, kind="credit_note", state="issued"),
        invoice(5, "c", 5, 100),
        invoice(6, "d", 6, 100, state="overdue"),
    ]
    publish(own_broker.url, events)
    wait_for(lambda: applied(live) == len(events), 15, "the live consumer to apply every event")
    end = date_pb2.Date(year=2026, month=11, day=30)
    with channel(live) as ch:
        value, reporting = pbg.ValueServiceStub(ch), rsg.ReportingServiceStub(ch)

        def answers():
            return (
                value.GetParetoReport(pb.GetParetoReportRequest(), metadata=md()),
                value.GetRfmReport(pb.GetRfmReportRequest(end_date=end), metadata=md()),
            )

        before = answers()
        assert (before[0].customers, before[0].total_revenue.units) == (3, 1050)  # a 800, b 150, c 100
        assert before[1].customers == 3
        with live.ctx.engine.begin() as conn:
            conn.execute(sa.text("UPDATE customer_value_daily SET revenue = revenue * 3"))
        assert answers() != before
        job = reporting.RebuildProjections(rs.RebuildProjectionsRequest(request_id="v1"), metadata=md())

        def finished():
            j = reporting.GetProjectionRebuild(rs.GetProjectionRebuildRequest(name=job.name), metadata=md())
            return j if j.state in ("succeeded", "failed", "cancelled") else None

        done = wait_for(finished, 20, "the rebuild")
        assert (done.state, done.error) == ("succeeded", "")
        assert answers() == before
