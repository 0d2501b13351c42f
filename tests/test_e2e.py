"""End to end: gateway -> customer-svc -> PostgreSQL + outbox -> RabbitMQ -> reporting-svc
projection -> back out through the gateway, all real, on loopback."""

from __future__ import annotations

import time
import uuid

import grpc
import pika
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from campaign_svc.__main__ import SPEC as CAMPAIGN
from crm_chassis.messaging.outbox import row_to_event
from crm_chassis.messaging.topology import exchange_for
from sales_svc.__main__ import SPEC as SALES
from support_svc.__main__ import SPEC as SUPPORT
from tests.support.harness import start_service, wait_for


def count_for(suite, source: str) -> int:
    resp = suite.http.get("/v1/reports/customers-by-source", headers=suite.headers("analyst"))
    assert resp.status_code == 200
    return sum(int(r["customerCount"]) for r in resp.get_json().get("sources", []) if r["acquisitionSource"] == source)


def create(suite, source: str) -> dict:
    resp = suite.http.post(
        "/v1/customers",
        json={
            "type": "CUSTOMER_TYPE_ORGANIZATION",
            "organizationName": f"Org {uuid.uuid4().hex[:6]}",
            "acquisitionSource": source,
        },
        headers=suite.headers("sales_rep"),
    )
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return resp.get_json()


def test_a_customer_created_through_the_gateway_is_counted_by_the_report(suite):
    source = suite.source("fair")
    started = time.monotonic()
    for _ in range(3):
        create(suite, source)
    wait_for(lambda: count_for(suite, source) == 3, timeout=5, what="the report to count 3 customers")
    assert time.monotonic() - started < 5


def test_the_same_event_delivered_again_is_not_counted_twice(suite):
    source = suite.source("dup")
    made = create(suite, source)
    wait_for(lambda: count_for(suite, source) == 1, what="first count")
    # Republish the very event the relay sent (as after a crash between confirm and commit).
    with suite.customer.ctx.engine.connect() as conn:
        row = conn.execute(sa.text("SELECT * FROM outbox WHERE subject = :s"), {"s": made["name"]}).one()
    event = row_to_event(row)
    consumer = suite.reporting.consumer
    seen = consumer.duplicates
    conn = pika.BlockingConnection(pika.URLParameters(suite.customer.settings.amqp_url))
    ch = conn.channel()
    ch.confirm_delivery()
    for _ in range(2):
        ch.basic_publish(exchange_for("customer"), event.routing_key, event.data, event.amqp_properties())
    conn.close()
    wait_for(lambda: consumer.duplicates >= seen + 2, what="the duplicates to be consumed")
    assert count_for(suite, source) == 1


def test_one_trace_spans_gateway_service_relay_and_consumer(suite, spans):
    from opentelemetry import trace

    source = suite.source("trace")
    spans.clear()
    made = create(suite, source)
    assert not trace.get_current_span().get_span_context().is_valid  # no context leaks out of a request
    wait_for(lambda: count_for(suite, source) == 1, what="the event to reach the projection")

    def trace_of_post():
        for s in spans.get_finished_spans():
            if s.kind.name == "SERVER" and s.name == "POST /v1/customers":
                return s.context.trace_id
        return None

    trace_id = wait_for(trace_of_post, what="the gateway's POST span")

    def in_trace():
        return [s for s in spans.get_finished_spans() if s.context.trace_id == trace_id]

    wait_for(lambda: any(s.kind.name == "CONSUMER" for s in in_trace()), what="the consumer span")
    # The relay's span ends once the broker confirmed the publish, which can be after the
    # consumer has already handled the message.
    wait_for(lambda: any(s.kind.name == "PRODUCER" for s in in_trace()), what="the relay's publish span")
    by_kind = {}
    for s in in_trace():
        by_kind.setdefault(s.kind.name, []).append(s.name)
    assert any(n.endswith("CreateCustomer") for n in by_kind["CLIENT"]), by_kind  # gateway -> customer-svc
    assert any(n.endswith("CreateCustomer") for n in by_kind["SERVER"]), by_kind  # customer-svc
    assert "crm.customer.events publish" in by_kind["PRODUCER"]  # outbox relay
    assert any(n.startswith("reporting-svc.customer-events") for n in by_kind["CONSUMER"])  # reporting consumer
    assert any(s.attributes.get("db.system") == "postgresql" for s in in_trace())  # SQLAlchemy spans
    assert not any(n.startswith("GET ") for n in by_kind["SERVER"]), by_kind  # later requests are other traces
    assert made["name"]


@pytest.fixture(scope="module")
def skeletons(databases, broker):
    started = [start_service(spec, databases.fresh(spec.name), broker.url) for spec in (SALES, SUPPORT, CAMPAIGN)]
    yield started
    for s in started:
        s.stop(0)


def test_health_and_reflection_answer_on_all_five_services(suite, skeletons):
    expected = {
        suite.customer: "crm.customer.v1.CustomerService",
        suite.reporting: "crm.reporting.v1.ReportingService",
        **{s: None for s in skeletons},
    }
    for service, own in expected.items():
        with grpc.insecure_channel(f"127.0.0.1:{service.port}") as ch:
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
            assert health.status == health_pb2.HealthCheckResponse.SERVING, service.settings.service_name
            refl = reflection_pb2_grpc.ServerReflectionStub(ch)
            answer = next(
                iter(
                    refl.ServerReflectionInfo(
                        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=2
                    )
                )
            )
            names = {s.name for s in answer.list_services_response.service}
            assert "grpc.health.v1.Health" in names and "grpc.reflection.v1alpha.ServerReflection" in names
            if own:
                assert own in names
                health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=own), timeout=2)
                assert health.status == health_pb2.HealthCheckResponse.SERVING
    for s in skeletons:  # each skeleton has its own database, migrated, with its outbox
        with s.ctx.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM outbox")).scalar() == 0


def test_a_merge_reaches_the_report_through_the_events(suite):
    kept, gone = suite.source("kept"), suite.source("gone")
    a = create(suite, kept)
    b = create(suite, gone)
    wait_for(lambda: count_for(suite, kept) == 1 and count_for(suite, gone) == 1, what="both counted")
    resp = suite.http.post(
        "/v1/customers:merge",
        json={"survivor": a["name"], "merged": [b["name"]]},
        headers=suite.headers("sales_manager"),
    )
    assert resp.status_code == 200, resp.get_data(as_text=True)
    merge = resp.get_json()["merge"]
    wait_for(
        lambda: count_for(suite, gone) == 0 and count_for(suite, kept) == 1, what="the merged customer to stop counting"
    )
    undo = suite.http.post(f"/v1/{merge}:undo", headers=suite.headers("sales_manager"))
    assert undo.status_code == 200, undo.get_data(as_text=True)
    wait_for(lambda: count_for(suite, gone) == 1, what="the unmerged customer to count again")
