"""RabbitMQ topology, declared in code by whoever needs it (declarations are idempotent).

- one durable topic exchange per producer: crm.<domain>.events
- one durable quorum queue per (consumer, producer): <consumer-svc>.<domain>-events, with a
  delivery limit and dead-lettering to <consumer-svc>.dlx -> <queue>.dlq
- one stream, crm.events.log, bound to every producer exchange, that keeps the event log so
  projections can be rebuilt from offset zero
"""

from __future__ import annotations

EVENT_LOG_STREAM = "crm.events.log"


def exchange_for(domain: str) -> str:
    return f"crm.{domain}.events"


def queue_name(consumer_service: str, domain: str) -> str:
    return f"{consumer_service}.{domain}-events"


def dead_letter_exchange(consumer_service: str) -> str:
    return f"{consumer_service}.dlx"


def dead_letter_queue(queue: str) -> str:
    return f"{queue}.dlq"


def declare_producer(channel, domain: str) -> str:
    exchange = exchange_for(domain)
    channel.exchange_declare(exchange=exchange, exchange_type="topic", durable=True)
    channel.queue_declare(queue=EVENT_LOG_STREAM, durable=True, arguments={"x-queue-type": "stream"})
    channel.queue_bind(queue=EVENT_LOG_STREAM, exchange=exchange, routing_key="#")
    return exchange


def declare_consumer_queue(
    channel, consumer_service: str, domain: str, routing_keys: list[str], delivery_limit: int
) -> str:
    declare_producer(channel, domain)
    queue = queue_name(consumer_service, domain)
    dlx = dead_letter_exchange(consumer_service)
    dlq = dead_letter_queue(queue)
    channel.exchange_declare(exchange=dlx, exchange_type="direct", durable=True)
    channel.queue_declare(queue=dlq, durable=True, arguments={"x-queue-type": "quorum"})
    channel.queue_bind(queue=dlq, exchange=dlx, routing_key=queue)
    channel.queue_declare(
        queue=queue,
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": delivery_limit,
            "x-dead-letter-exchange": dlx,
            "x-dead-letter-routing-key": queue,
        },
    )
    for key in routing_keys:
        channel.queue_bind(queue=queue, exchange=exchange_for(domain), routing_key=key)
    return queue
