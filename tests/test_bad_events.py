"""reporting-svc's subscriptions declare what their handlers need: an empty or undecodable
customer event is dead-lettered at once with the reason, and never counted."""

from __future__ import annotations

import pika
import pytest
import sqlalchemy as sa

from crm.customer.v1 import customer_events_pb2
from crm_chassis.messaging.consumer import DEAD_LETTER_REASON
from crm_chassis.messaging.envelope import new_event
from crm_chassis.messaging.topology import dead_letter_queue, exchange_for, queue_name
from tests.support.harness import wait_for


@pytest.mark.parametrize(
    "body, reason",
    [(b"", "lacks required field(s): customer.name, customer.create_time"), (b"\x0a\xff", "does not decode")],
    ids=["empty", "undecodable"],
)
def test_a_customer_event_without_a_customer_is_dead_lettered_and_not_counted(suite, body, reason):
    event = new_event(
        domain="customer",
        source_service="customer-svc",
        routing_key="customer.created.v1",
        subject="customers/",
        message=customer_events_pb2.CustomerCreated(),
    )
    url = suite.customer.settings.amqp_url
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish(exchange_for("customer"), event.routing_key, body, event.amqp_properties())
        dlq = dead_letter_queue(queue_name("reporting-svc", "customer"))
        found = []

        def in_dlq():
            method, props, _ = ch.basic_get(dlq, auto_ack=False)
            if method is None:
                return False
            if props.headers.get("cloudEvents_id") == event.id:
                ch.basic_ack(method.delivery_tag)
                found.append(props)
                return True
            ch.basic_nack(method.delivery_tag, requeue=True)
            return False

        wait_for(in_dlq, what="the event in reporting-svc's dead-letter queue")
    finally:
        conn.close()
    assert reason in found[0].headers[DEAD_LETTER_REASON]
    assert found[0].headers.get("x-delivery-count", 0) == 0  # not retried first
    with suite.reporting.ctx.engine.connect() as c:
        assert c.execute(sa.text("SELECT count(*) FROM customer_source_facts WHERE customer_id = ''")).scalar() == 0
        assert c.execute(sa.text("SELECT count(*) FROM inbox WHERE event_id = :i"), {"i": event.id}).scalar() == 0
