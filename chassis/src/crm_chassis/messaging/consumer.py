"""Idempotent event consumer.

Each delivery is handled in one database transaction that also records the event id in the
inbox table; a redelivered event finds its id there and changes nothing. Ack comes only after
commit. A handler that raises is nacked and requeued; the quorum queue's delivery limit then
dead-letters it to <queue>.dlq, so one poison message never blocks the ones behind it. A
message that can never be parsed is dead-lettered at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import pika
import sqlalchemy as sa
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from pika.exceptions import AMQPError
from sqlalchemy.dialects.postgresql import insert as pg_insert

from ..telemetry import extract_context
from .envelope import Event, MalformedEvent, from_amqp
from .tables import inbox
from .topology import declare_consumer_queue

log = logging.getLogger("crm.consumer")

Handler = Callable[[sa.Connection, Event], None]


@dataclass
class Subscription:
    domain: str  # producer domain: "customer" -> exchange crm.customer.events
    handlers: dict[str, Handler] = field(default_factory=dict)  # routing key -> handler


class EventConsumer:
    name = "event-consumer"

    def __init__(
        self,
        engine: sa.Engine,
        amqp_url: str,
        consumer_service: str,
        subscriptions: list[Subscription],
        prefetch: int = 100,
        delivery_limit: int = 5,
        max_backoff: float = 5.0,
        inbox_retention_hours: float = 168.0,
    ):
        self.engine = engine
        self.inbox_retention_hours = inbox_retention_hours
        self.params = pika.URLParameters(amqp_url)
        self.params.heartbeat = 30
        self.params.connection_attempts = 1
        self.consumer_service = consumer_service
        self.subscriptions = subscriptions
        self.prefetch = prefetch
        self.delivery_limit = delivery_limit
        self.max_backoff = max_backoff
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: pika.BlockingConnection | None = None
        self._channel = None
        self.ready = threading.Event()  # set once queues are declared and consuming
        self.processed = 0
        self.duplicates = 0
        self.failures = 0
        self._tracer = trace.get_tracer("crm.consumer")

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        conn, channel = self._conn, self._channel
        if conn is not None and channel is not None:
            try:
                conn.add_callback_threadsafe(channel.stop_consuming)
            except Exception:
                pass
        if self._thread:
            self._thread.join(timeout)

    def declare(self, channel) -> list[str]:
        queues = []
        for sub in self.subscriptions:
            queues.append(
                declare_consumer_queue(
                    channel, self.consumer_service, sub.domain, list(sub.handlers), self.delivery_limit
                )
            )
        return queues

    def _run(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                self._conn = pika.BlockingConnection(self.params)
                self._channel = self._conn.channel()
                self._channel.basic_qos(prefetch_count=self.prefetch)
                for sub, queue in zip(self.subscriptions, self.declare(self._channel), strict=True):
                    self._channel.basic_consume(
                        queue=queue,
                        on_message_callback=lambda ch, m, p, b, sub=sub, q=queue: self._on_message(ch, m, p, b, sub, q),
                    )
                log.info("consuming", extra={"consumer": self.consumer_service})
                self._schedule_cleanup(1.0)
                backoff = 0.2
                self.ready.set()
                if self._stop.is_set():
                    break
                self._channel.start_consuming()
            except (AMQPError, OSError) as exc:
                self.ready.clear()
                log.warning("broker unavailable; consumer will reconnect", extra={"error": repr(exc)})
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)
            finally:
                conn, self._conn, self._channel = self._conn, None, None
                if conn is not None and conn.is_open:
                    try:
                        conn.close()
                    except Exception:
                        pass

    def _schedule_cleanup(self, delay: float) -> None:
        conn = self._conn
        if conn is not None:
            conn.call_later(delay, self._cleanup_tick)

    def _cleanup_tick(self) -> None:
        try:
            self.cleanup_inbox()
        except sa.exc.SQLAlchemyError as exc:
            log.warning("inbox cleanup failed", extra={"error": str(exc)})
        self._schedule_cleanup(600.0)

    def cleanup_inbox(self, batch: int = 10_000) -> int:
        """Forget event ids processed long ago: a redelivery comes within minutes, a replay
        from the stream is still caught by the handlers' own version checks."""
        with self.engine.begin() as conn:
            return conn.execute(
                sa.text(
                    "DELETE FROM inbox WHERE (consumer, event_id) IN (SELECT consumer, event_id FROM inbox "
                    "WHERE consumer = :c AND processed_at < now() - make_interval(secs => :secs) LIMIT :n)"
                ),
                {"c": self.consumer_service, "secs": self.inbox_retention_hours * 3600, "n": batch},
            ).rowcount

    # -- one message -------------------------------------------------------------------------
    def _on_message(self, channel, method, properties, body, sub: Subscription, queue: str) -> None:
        try:
            event = from_amqp(method, properties, body)
        except MalformedEvent as exc:
            log.error("malformed event dead-lettered", extra={"queue": queue, "error": str(exc)})
            channel.basic_nack(method.delivery_tag, requeue=False)
            return
        handler = sub.handlers.get(event.routing_key)
        attempt = int((properties.headers or {}).get("x-delivery-count", 0)) + 1
        with self._tracer.start_as_current_span(
            f"{queue} process",
            context=extract_context(event.trace_headers),
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.operation.type": "process",
                "messaging.destination.name": queue,
                "messaging.message.id": event.id,
                "messaging.rabbitmq.destination.routing_key": event.routing_key,
            },
        ):
            try:
                self.handle(event, handler)
            except Exception:
                self.failures += 1
                log.exception(
                    "event handler failed; message requeued until the delivery limit",
                    extra={"event_id": event.id, "event_type": event.type, "attempt": attempt, "queue": queue},
                )
                channel.basic_nack(method.delivery_tag, requeue=True)
                return
        channel.basic_ack(method.delivery_tag)

    def handle(self, event: Event, handler: Handler | None) -> bool:
        """Process one event exactly once; return False if it had been processed already."""
        with self.engine.begin() as conn:
            fresh = conn.execute(
                pg_insert(inbox)
                .values(consumer=self.consumer_service, event_id=event.id, event_type=event.type)
                .on_conflict_do_nothing()
                .returning(inbox.c.event_id)
            ).first()
            if fresh is None:
                self.duplicates += 1
                return False
            if handler is not None:
                handler(conn, event)
        self.processed += 1
        return True
