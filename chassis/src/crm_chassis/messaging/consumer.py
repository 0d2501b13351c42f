"""Idempotent event consumer.

Each delivery is handled in one database transaction that also records the event id in the
inbox table; a redelivered event finds its id there and changes nothing. Ack comes only after
commit. What happens to a delivery that cannot be handled depends on why:

- it can never be handled (envelope without its CloudEvents attributes, a body that does not
  decode as the message its subscription `Requires`, a required field missing): it is
  dead-lettered at once, to <queue>.dlq, with the reason in the `x-crm-dead-letter-reason`
  header and one ERROR log line;
- the handler raised: it is nacked and requeued; the quorum queue's delivery limit then
  dead-letters it, so one poison message never blocks the ones behind it;
- the database is unavailable (down, restarting, refusing connections): nothing is settled.
  The consumer holds the delivery and the ones behind it unacknowledged (at most `prefetch`)
  and retries them in order with back-off until the database answers; a held delivery has not
  been returned to the queue, so it does not count towards the delivery limit.

Batches (`batch_size` > 1, CONSUMER_BATCH): the deliveries that arrive together (up to
batch_size, waiting at most `batch_wait` seconds for more) are handled in ONE transaction: one
INSERT of their ids into the inbox (the redelivered ones drop out), then each run of
consecutive events of one subscription and routing key goes to the subscription's batch
handler for that key if it has one (`Subscription.batch`), else to its handler event by event,
in arrival order. A subscription with `batch_all` takes its whole run of consecutive events,
whatever their routing keys, in arrival order, in one call instead. They are acked after the
commit, with one basic.ack (multiple=True) for the batch's last delivery tag. If the batch fails, its deliveries are
handled again one at a time as above, so a poison event is requeued alone and the others go
through.
"""

from __future__ import annotations

import collections
import copy
import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import pika
import sqlalchemy as sa
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from pika.exceptions import AMQPError, NackError, UnroutableError
from sqlalchemy.dialects.postgresql import insert as pg_insert

from .. import metrics
from ..db import is_database_unavailable, untraced
from ..telemetry import extract_context
from .envelope import Event, MalformedEvent, from_amqp
from .publisher import url_parameters
from .tables import inbox
from .topology import dead_letter_exchange, declare_consumer_queue

log = logging.getLogger("crm.consumer")

Handler = Callable[[sa.Connection, Event], None]
BatchHandler = Callable[[sa.Connection, list[Event]], None]

DEAD_LETTER_REASON = "x-crm-dead-letter-reason"  # header on an event the consumer dead-lettered itself
DEAD_LETTER_QUEUE = "x-crm-dead-letter-queue"  # the queue it came from


@dataclass(frozen=True)
class Requires:
    """What a handler needs of an event, checked by the consumer before the handler runs: the
    body decodes as `message` (a protobuf class) and every dotted path in `fields` is set (a
    message field present, a scalar not its zero value, a repeated field not empty). The
    event's dataschema, when it names one, must be the message's full name."""

    message: type
    fields: tuple[str, ...] = ()

    def __post_init__(self):
        for path in self.fields:  # a typo fails at start-up, not on the first event
            descriptor = self.message.DESCRIPTOR
            *parents, last = path.split(".")
            for name in parents:
                fd = descriptor.fields_by_name.get(name)
                if fd is None or fd.type != FieldDescriptor.TYPE_MESSAGE or fd.is_repeated:
                    raise ValueError(f"{self.message.DESCRIPTOR.full_name}: {path}: {name} is not a message field")
                descriptor = fd.message_type
            if last not in descriptor.fields_by_name:
                raise ValueError(f"{self.message.DESCRIPTOR.full_name} has no field {path}")

    def problem(self, event: Event) -> str | None:
        """Why the event cannot be handled, or None."""
        full_name = self.message.DESCRIPTOR.full_name
        if event.dataschema and event.dataschema != full_name:
            return f"dataschema {event.dataschema!r} is not {full_name}"
        msg = self.message()
        try:
            msg.ParseFromString(event.data)
        except DecodeError as exc:
            return f"body does not decode as {full_name}: {exc}"
        missing = [path for path in self.fields if not _is_set(msg, path)]
        if missing:
            return f"{full_name} lacks required field(s): {', '.join(missing)}"
        return None


def _is_set(msg, path: str) -> bool:
    for name in path.split("."):
        fd = msg.DESCRIPTOR.fields_by_name[name]
        if fd.is_repeated:
            return len(getattr(msg, name)) > 0
        if fd.has_presence:
            if not msg.HasField(name):
                return False
        elif getattr(msg, name) == fd.default_value:
            return False
        msg = getattr(msg, name)
    return True


@dataclass
class Subscription:
    domain: str  # producer domain: "customer" -> exchange crm.customer.events
    handlers: dict[str, Handler] = field(default_factory=dict)  # routing key -> handler
    requires: dict[str, Requires] = field(default_factory=dict)  # routing key -> what its handler needs
    # routing key -> a handler of many events of that key at once (the consumer's batches)
    batch: dict[str, BatchHandler] = field(default_factory=dict)
    # a handler of a run of events of any of its routing keys at once, in arrival order; when
    # set, the consumer gives it the subscription's whole run instead of splitting it by key
    batch_all: BatchHandler | None = None


def _run_key(item: tuple[Subscription, Event]) -> tuple:
    sub, event = item
    return (id(sub),) if sub.batch_all is not None else (id(sub), event.routing_key)


@dataclass
class _Delivery:
    channel: object
    method: object
    properties: pika.BasicProperties
    body: bytes
    sub: Subscription
    queue: str


# A batch's event ids into the inbox in one statement that compiles once, whatever the batch's
# size (a multi-row VALUES is compiled afresh for each size); the ones already there drop out.
_INBOX_MANY = sa.text(
    """
INSERT INTO inbox (consumer, event_id, event_type)
SELECT :c, u.event_id, u.event_type FROM unnest(CAST(:ids AS text[]), CAST(:types AS text[])) AS u(event_id, event_type)
ON CONFLICT DO NOTHING
RETURNING event_id
"""
)


class EventConsumer:
    name = "event-consumer"
    FIRST_RETRY = 0.2  # seconds before the first retry of a held delivery; doubles up to max_backoff

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
        batch_size: int = 1,
        batch_wait: float = 0.0,
    ):
        self.engine = engine
        self.inbox_retention_hours = inbox_retention_hours
        self.params = url_parameters(amqp_url)
        self.consumer_service = consumer_service
        self.subscriptions = subscriptions
        self.prefetch = prefetch
        self.delivery_limit = delivery_limit
        self.max_backoff = max_backoff
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: pika.BlockingConnection | None = None
        self._channel = None
        self._dl_channel = None  # confirm mode: dead-letters with a reason are published here
        self._held: collections.deque[_Delivery] = collections.deque()  # unsettled while the database is down
        self.batch_size = max(1, min(batch_size, prefetch))
        self.batch_wait = batch_wait
        self._pending: list[_Delivery] = []  # the batch being gathered
        self._flush_armed = False
        self.batches = 0  # batches committed as one transaction
        self._retry_delay = self.FIRST_RETRY
        self.ready = threading.Event()  # set once queues are declared and consuming
        self.processed = 0
        self.duplicates = 0
        self.failures = 0  # handler errors (requeued towards the delivery limit)
        self.dead_lettered = 0  # dead-lettered at once by the consumer (malformed)
        self.database_waits = 0  # attempts that found the database unavailable
        self.queue_depths: dict[str, int] = {}  # messages ready per queue, every QUEUE_CHECK_SECONDS
        self._queues: list[str] = []
        self._tracer = trace.get_tracer("crm.consumer")
        metrics.track_consumer(self)

    @property
    def held(self) -> int:
        """Deliveries held unacknowledged while the database is down."""
        return len(self._held)

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
                self._held.clear()  # deliveries of a previous connection went back to the queue
                self._pending.clear()
                self._flush_armed = False
                self._retry_delay = self.FIRST_RETRY
                self._channel = self._conn.channel()
                self._dl_channel = self._conn.channel()
                self._dl_channel.confirm_delivery()
                self._channel.basic_qos(prefetch_count=self.prefetch)
                self._queues = self.declare(self._channel)
                for sub, queue in zip(self.subscriptions, self._queues, strict=True):
                    self._channel.basic_consume(
                        queue=queue,
                        on_message_callback=lambda ch, m, p, b, sub=sub, q=queue: self._on_message(ch, m, p, b, sub, q),
                    )
                log.info("consuming", extra={"consumer": self.consumer_service})
                self._schedule_cleanup(1.0)
                if metrics.exporting():  # the queue depths are for the metrics only
                    self._check_queues()
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
            except Exception:  # a bug must not end the consumer thread: start again on a new channel
                self.ready.clear()
                log.exception("consumer error; it will reconnect")
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)
            finally:
                conn, self._conn, self._channel, self._dl_channel = self._conn, None, None, None
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
            with untraced():  # housekeeping, not part of any event's trace
                self.cleanup_inbox()
        except sa.exc.SQLAlchemyError as exc:
            log.warning("inbox cleanup failed", extra={"error": str(exc)})
        self._schedule_cleanup(600.0)

    def _check_queues(self) -> None:
        """How many messages wait in each queue (a passive declare on a channel of its own, from
        the connection's I/O loop), for the metrics; again in QUEUE_CHECK_SECONDS."""
        conn = self._conn
        if conn is None or not conn.is_open:
            return
        try:
            ch = conn.channel()
            try:
                for q in self._queues:
                    self.queue_depths[q] = ch.queue_declare(queue=q, passive=True).method.message_count
            finally:
                if ch.is_open:
                    ch.close()
        except AMQPError as exc:  # a queue deleted under us: the next check tries again
            log.debug("queue depth not read", extra={"error": repr(exc)})
        conn.call_later(metrics.QUEUE_CHECK_SECONDS, self._check_queues)

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
        delivery = _Delivery(channel, method, properties, body, sub, queue)
        if self._held:  # keep the order: behind the ones waiting for the database
            self._held.append(delivery)
        elif self.batch_size > 1:
            self._pending.append(delivery)
            if len(self._pending) >= self.batch_size:
                self._flush()
            elif not self._flush_armed:  # the rest of what arrived together, then the batch
                self._flush_armed = True
                self._conn.call_later(self.batch_wait, self._flush)
        elif not self._process(delivery):
            self._hold([delivery])

    def _hold(self, deliveries: list[_Delivery]) -> None:
        first = not self._held
        self._held.extend(deliveries)
        if first:
            log.warning(
                "database unavailable; events are held unacknowledged and retried with back-off",
                extra={"queue": deliveries[0].queue, "consumer": self.consumer_service},
            )
            self._retry_later()

    def _flush(self) -> None:
        self._flush_armed = False
        batch, self._pending = self._pending, []
        if not batch:
            return
        if self._held:
            self._held.extend(batch)
            return
        unsettled = self._process_batch(batch)
        if unsettled:
            self._hold(unsettled)

    def _process_batch(self, batch: list[_Delivery]) -> list[_Delivery]:
        """Handle a batch in one transaction and settle it; returns the deliveries left
        unsettled (the database was unavailable), in order."""
        ready: list[tuple[_Delivery, Event]] = []
        for d in batch:
            event = self._accepted(d)
            if event is not None:
                ready.append((d, event))
        if len(ready) <= 1:
            return [d for d, _ in ready if not self._process(d)]
        links = []
        for _, e in ready:
            if not e.trace_headers:  # no producer's context to link to (and nothing to parse)
                continue
            ctx = trace.get_current_span(extract_context(e.trace_headers)).get_span_context()
            if ctx.is_valid:
                links.append(trace.Link(ctx))
        with self._tracer.start_as_current_span(
            f"{ready[0][0].queue} process batch",
            kind=SpanKind.CONSUMER,
            links=links,
            attributes={"messaging.system": "rabbitmq", "messaging.operation.type": "process",
                        "messaging.batch.message_count": len(ready)},
        ) as span:  # fmt: skip
            try:
                fresh = self.handle_batch([(d.sub, e) for d, e in ready])
            except Exception as exc:
                span.record_exception(exc)
                if is_database_unavailable(exc):
                    self.database_waits += 1
                    return [d for d, _ in ready]
                log.warning(
                    "a batch of events failed; handling them one at a time",
                    extra={"events": len(ready), "error": f"{type(exc).__name__}: {exc}"[:300]},
                )
                for i, (d, _) in enumerate(ready):
                    if not self._process(d):
                        return [x for x, _ in ready[i:]]
                return []
        self._ack_all(batch, ready)
        self.batches += 1
        self.processed += fresh
        self.duplicates += len(ready) - fresh
        return []

    def _ack_all(self, batch: list[_Delivery], ready: list[tuple[_Delivery, Event]]) -> None:
        """Ack a committed batch: ONE basic.ack with multiple=True for the last delivery tag
        (pika's BlockingChannel flushes its socket and polls on every basic_ack: one ack per
        delivery was the consumer's biggest cost). That is exact only when every delivery
        before it on the channel is settled: the batch's own (the dead-lettered ones already
        are) and nothing older held back, and all on one channel; else one ack each."""
        channel = batch[0].channel
        if not self._held and all(d.channel is channel for d in batch):
            channel.basic_ack(max(d.method.delivery_tag for d in batch), multiple=True)
            return
        for d, _ in ready:
            d.channel.basic_ack(d.method.delivery_tag)

    def handle_batch(self, items: list[tuple[Subscription, Event]]) -> int:
        """Process events in one transaction, each exactly once; returns how many were new."""
        with self.engine.begin() as conn:
            fresh_ids = set(
                conn.execute(
                    _INBOX_MANY,
                    {"c": self.consumer_service, "ids": [e.id for _, e in items], "types": [e.type for _, e in items]},
                ).scalars()
            )
            seen: set[str] = set()
            todo = []
            for sub, e in items:
                if e.id in fresh_ids and e.id not in seen:  # the same event twice in one batch: once
                    seen.add(e.id)
                    todo.append((sub, e))
            # runs of consecutive events of one subscription (and routing key, unless the
            # subscription takes them all at once), in arrival order
            for _, run in itertools.groupby(todo, key=_run_key):
                run = list(run)
                self._handle_run(conn, run[0][0], [e for _, e in run])
        return len(seen)

    @staticmethod
    def _handle_run(conn: sa.Connection, sub: Subscription, events: list[Event]) -> None:
        if sub.batch_all is not None:
            sub.batch_all(conn, events)
            return
        key = events[0].routing_key
        batch = sub.batch.get(key)
        if batch is not None:
            batch(conn, events)
            return
        handler = sub.handlers.get(key)
        if handler is not None:
            for e in events:
                handler(conn, e)

    def _retry_later(self) -> None:
        self._conn.call_later(self._retry_delay, self._retry_held)
        self._retry_delay = min(self._retry_delay * 2, self.max_backoff)

    def _retry_held(self) -> None:
        done = 0
        while self._held and not self._stop.is_set():
            if not self._process(self._held[0]):
                self._retry_later()
                return
            self._held.popleft()
            done += 1
        self._retry_delay = self.FIRST_RETRY
        if done:
            log.info("database available again; held events processed", extra={"events": done})

    def _accepted(self, d: _Delivery) -> Event | None:
        """The delivery's event if it can be handled; None once dead-lettered (a malformed
        envelope, or a body without what its subscription requires)."""
        try:
            event = from_amqp(d.method, d.properties, d.body)
        except MalformedEvent as exc:
            self._dead_letter(d, f"malformed envelope: {exc}")
            return None
        requirement = d.sub.requires.get(event.routing_key)
        problem = requirement.problem(event) if requirement is not None else None
        if problem:
            self._dead_letter(d, problem, event)
            return None
        return event

    def _process(self, d: _Delivery) -> bool:
        """Handle one delivery and settle it (ack, requeue or dead-letter). Returns False, leaving
        it unsettled, when the database was unavailable."""
        event = self._accepted(d)
        if event is None:
            return True
        handler = d.sub.handlers.get(event.routing_key)
        attempt = int((d.properties.headers or {}).get("x-delivery-count", 0)) + 1
        with self._tracer.start_as_current_span(
            f"{d.queue} process",
            context=extract_context(event.trace_headers),
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.operation.type": "process",
                "messaging.destination.name": d.queue,
                "messaging.message.id": event.id,
                "messaging.rabbitmq.destination.routing_key": event.routing_key,
            },
        ) as span:
            try:
                self.handle(event, handler)
            except Exception as exc:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                if is_database_unavailable(exc):
                    self.database_waits += 1
                    return False
                if isinstance(exc, (DecodeError, MalformedEvent)):  # a handler's own parse or check
                    self._dead_letter(d, f"{type(exc).__name__}: {exc}", event)
                    return True
                self.failures += 1
                log.exception(
                    "event handler failed; message requeued until the delivery limit",
                    extra={"event_id": event.id, "event_type": event.type, "attempt": attempt, "queue": d.queue},
                )
                d.channel.basic_nack(d.method.delivery_tag, requeue=True)
                return True
        d.channel.basic_ack(d.method.delivery_tag)
        return True

    def _dead_letter(self, d: _Delivery, reason: str, event: Event | None = None) -> None:
        """Send the delivery to <queue>.dlq now, with the reason in a header, then ack it (nack
        without requeue, the broker's own dead-lettering, if the copy cannot be published)."""
        self.dead_lettered += 1
        log.error(
            "event dead-lettered: %s",
            reason,
            extra={
                "queue": d.queue,
                "reason": reason,
                "event_id": event.id if event else (d.properties.headers or {}).get("cloudEvents_id"),
                "routing_key": d.method.routing_key,
            },
        )
        props = copy.copy(d.properties)
        props.headers = {**(d.properties.headers or {}), DEAD_LETTER_REASON: reason[:1000], DEAD_LETTER_QUEUE: d.queue}
        try:
            self._dl_channel.basic_publish(
                dead_letter_exchange(self.consumer_service), d.queue, d.body, props, mandatory=True
            )
        except (NackError, UnroutableError):
            d.channel.basic_nack(d.method.delivery_tag, requeue=False)
            return
        d.channel.basic_ack(d.method.delivery_tag)

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
