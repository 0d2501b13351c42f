"""Outbox relay and idempotent consumer against a real RabbitMQ (a private vhost) and real
PostgreSQL: broker outage, duplicate delivery, poison and malformed messages."""

from __future__ import annotations

import threading
import time

import pika
import pytest
import sqlalchemy as sa

from crm_chassis.db import create_engine
from crm_chassis.messaging.consumer import EventConsumer, Subscription
from crm_chassis.messaging.envelope import Event, new_event
from crm_chassis.messaging.outbox import OutboxRelay, enqueue
from crm_chassis.messaging.publisher import PublishError
from crm_chassis.messaging.tables import messaging_metadata, outbox
from crm_chassis.messaging.topology import dead_letter_queue, declare_producer, exchange_for, queue_name
from tests.support.harness import wait_for
from tests.support.tcp_proxy import TcpProxy

DOMAIN = "chassistest"
KEY = "thing.happened.v1"


class Payload:
    """Stands in for a protobuf message in new_event()."""

    class DESCRIPTOR:
        full_name = "test.Thing"

    def __init__(self, data: bytes):
        self.data = data

    def SerializeToString(self) -> bytes:
        return self.data


def make_event(data: bytes = b"ok") -> Event:
    return new_event(
        domain=DOMAIN, source_service="test-svc", routing_key=KEY, subject="things/1", message=Payload(data)
    )


@pytest.fixture
def engine(databases):
    eng = create_engine(databases.fresh("messaging"), pool_size=4)
    messaging_metadata.create_all(eng)
    with eng.begin() as conn:
        conn.execute(sa.text("CREATE TABLE received (event_id text NOT NULL, data bytea)"))
    yield eng
    eng.dispose()


def received(engine) -> tuple[int, int]:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*), count(DISTINCT event_id) FROM received")).one()


def record(conn: sa.Connection, event: Event) -> None:
    conn.execute(sa.text("INSERT INTO received VALUES (:i, :d)"), {"i": event.id, "d": event.data})


def start_consumer(engine, url: str, name: str, handler=record, limit: int = 3) -> EventConsumer:
    consumer = EventConsumer(
        engine, url, name, [Subscription(DOMAIN, {KEY: handler})], prefetch=10, delivery_limit=limit
    )
    consumer.start()
    assert consumer.ready.wait(10), "consumer did not connect"
    return consumer


def publish_raw(url: str, event: Event | None, body: bytes = b"", props=None) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    declare_producer(ch, DOMAIN)
    ch.confirm_delivery()
    if event is not None:
        ch.basic_publish(exchange_for(DOMAIN), KEY, event.data, event.amqp_properties())
    else:
        ch.basic_publish(exchange_for(DOMAIN), KEY, body, props or pika.BasicProperties())
    conn.close()


def test_broker_outage_delays_events_but_loses_and_duplicates_none(engine, broker):
    proxy = TcpProxy(broker.address).start()
    consumer = start_consumer(engine, broker.url, "outage-test")
    relay = OutboxRelay(
        engine,
        broker.with_port(proxy.port),
        lambda ch: declare_producer(ch, DOMAIN),
        batch_size=7,
        poll_seconds=0.1,
        max_backoff=0.3,
    )
    relay.start()
    try:
        for _ in range(20):
            with engine.begin() as conn:
                enqueue(conn, make_event())
        wait_for(lambda: received(engine)[0] == 20, what="first 20 events")

        proxy.stop()  # the broker goes away
        for _ in range(30):  # the business keeps writing: every commit succeeds
            with engine.begin() as conn:
                enqueue(conn, make_event())
        time.sleep(1.0)
        assert received(engine)[0] == 20
        with engine.connect() as conn:
            waiting = conn.execute(sa.select(sa.func.count()).where(outbox.c.published_at.is_(None))).scalar_one()
        assert waiting == 30
        assert not relay.broker_up

        proxy.start()  # the broker is back
        wait_for(lambda: received(engine)[0] >= 50, what="all 50 events after the outage")
        time.sleep(0.5)  # give a stray duplicate the chance to show up
        assert received(engine) == (50, 50)
        with engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).where(outbox.c.published_at.is_(None))).scalar_one() == 0
    finally:
        relay.stop(2)
        consumer.stop(2)
        proxy.stop()


def test_the_same_event_delivered_twice_is_processed_once(engine, broker):
    consumer = start_consumer(engine, broker.url, "dup-test")
    try:
        event = make_event(b"twice")
        publish_raw(broker.url, event)
        publish_raw(broker.url, event)
        wait_for(lambda: consumer.processed + consumer.duplicates == 2, what="both deliveries")
        assert received(engine) == (1, 1)
        assert consumer.duplicates == 1
    finally:
        consumer.stop(2)


def test_a_failing_handler_is_retried_a_bounded_number_of_times_then_dead_lettered(engine, broker):
    attempts = {"poison": 0}
    lock = threading.Lock()

    def handler(conn, event: Event):
        if event.data == b"poison":
            with lock:
                attempts["poison"] += 1
            raise RuntimeError("cannot handle this one")
        record(conn, event)

    consumer = start_consumer(engine, broker.url, "poison-test", handler=handler, limit=3)
    try:
        poison = make_event(b"poison")
        publish_raw(broker.url, poison)
        for _ in range(5):
            publish_raw(broker.url, make_event(b"fine"))
        wait_for(lambda: received(engine)[0] == 5, what="the messages behind the poison one")
        dlq = dead_letter_queue(queue_name("poison-test", DOMAIN))
        conn = pika.BlockingConnection(pika.URLParameters(broker.url))
        ch = conn.channel()
        got = [None]

        def dead_lettered():
            method, props, _body = ch.basic_get(dlq, auto_ack=True)
            if method is not None:
                got[0] = props
            return got[0] is not None

        wait_for(dead_lettered, what="the poison message in the dead-letter queue")
        conn.close()
        assert got[0].headers["cloudEvents_id"] == poison.id
        assert 2 <= attempts["poison"] <= 4  # retried, but bounded by the delivery limit (3)
        with engine.connect() as c:  # a failed attempt leaves no trace: its transaction rolled back
            assert c.execute(sa.text("SELECT count(*) FROM inbox WHERE event_id = :i"), {"i": poison.id}).scalar() == 0
    finally:
        consumer.stop(2)


def test_a_malformed_message_is_dead_lettered_at_once(engine, broker):
    calls = []
    consumer = start_consumer(engine, broker.url, "malformed-test", handler=lambda c, e: calls.append(e))
    try:
        publish_raw(broker.url, None, body=b"\x00garbage", props=pika.BasicProperties(headers={"x": "y"}))
        dlq = dead_letter_queue(queue_name("malformed-test", DOMAIN))
        conn = pika.BlockingConnection(pika.URLParameters(broker.url))
        ch = conn.channel()
        wait_for(lambda: ch.basic_get(dlq, auto_ack=True)[0] is not None, what="malformed message in the DLQ")
        conn.close()
        assert calls == []
    finally:
        consumer.stop(2)


def test_old_published_outbox_rows_and_old_inbox_ids_are_cleaned_up(engine, broker):
    relay = OutboxRelay(engine, broker.url, lambda ch: declare_producer(ch, DOMAIN), retention_hours=1)
    consumer = EventConsumer(engine, broker.url, "cleanup-test", [], inbox_retention_hours=1)
    with engine.begin() as conn:
        for _ in range(3):
            enqueue(conn, make_event())
        conn.execute(
            sa.text(
                "UPDATE outbox SET published_at = now() - interval '2 hours' WHERE id IN "
                "(SELECT id FROM outbox ORDER BY id LIMIT 2)"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO inbox (consumer, event_id, event_type, processed_at) VALUES "
                "('cleanup-test', 'old', 't', now() - interval '2 hours'), ('cleanup-test', 'new', 't', now()),"
                "('someone-else', 'old', 't', now() - interval '2 hours')"
            )
        )
    assert relay.cleanup() == 2
    assert consumer.cleanup_inbox() == 1
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM outbox WHERE published_at IS NULL")).scalar() == 1
        assert {tuple(r) for r in conn.execute(sa.text("SELECT consumer, event_id FROM inbox"))} == {
            ("cleanup-test", "new"),
            ("someone-else", "old"),
        }


def test_relay_keeps_order_and_gives_each_run_of_one_trace_one_publish_span(engine, broker, spans):
    """Rows written in one trace (an import chunk) share one PRODUCER span and carry its context;
    rows of another trace in between get their own span, and the wire order is the outbox order."""
    from opentelemetry import trace

    from crm_chassis.telemetry import extract_context

    tracer = trace.get_tracer("test")
    plan = ["a", "a", "a", "b", "a", "a"]  # a third run of trace a after trace b's one event
    contexts = {}
    for name in ("a", "b"):
        with tracer.start_as_current_span(f"writer {name}") as span:
            contexts[name] = trace.set_span_in_context(span)
    with engine.begin() as conn:
        for i, name in enumerate(plan):
            with trace.use_span(trace.get_current_span(contexts[name])):
                enqueue(conn, make_event(f"{i}:{name}".encode()))

    got: list[tuple[bytes, dict]] = []

    def keep(conn, event: Event) -> None:
        got.append((event.data, event.trace_headers))

    consumer = start_consumer(engine, broker.url, "order-test", handler=keep)
    spans.clear()
    relay = OutboxRelay(engine, broker.url, lambda ch: declare_producer(ch, DOMAIN), batch_size=100)
    try:
        assert relay.relay_once() == len(plan)
        wait_for(lambda: len(got) == len(plan), what="all events")
    finally:
        relay.stop(2)
        consumer.stop(2)
    assert [d for d, _ in got] == [f"{i}:{n}".encode() for i, n in enumerate(plan)]
    publish = [s for s in spans.get_finished_spans() if s.kind.name == "PRODUCER"]
    assert [(s.parent.span_id, s.attributes.get("messaging.batch.message_count")) for s in publish] == [
        (trace.get_current_span(contexts["a"]).get_span_context().span_id, 3),
        (trace.get_current_span(contexts["b"]).get_span_context().span_id, None),
        (trace.get_current_span(contexts["a"]).get_span_context().span_id, 2),
    ]
    carried = [trace.get_current_span(extract_context(h)).get_span_context().span_id for _, h in got]
    runs = [publish[0]] * 3 + [publish[1]] + [publish[2]] * 2
    assert carried == [s.context.span_id for s in runs]


def unpublished(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).where(outbox.c.published_at.is_(None))).scalar_one()


def test_a_backlog_is_relayed_with_batches_in_flight_in_order_and_once(engine, broker):
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE outbox"))
        for i in range(230):
            enqueue(conn, make_event(str(i).encode()))
    conn = pika.BlockingConnection(pika.URLParameters(broker.url))
    ch = conn.channel()
    declare_producer(ch, DOMAIN)
    queue = ch.queue_declare("", exclusive=True).method.queue  # sees every event, in broker order
    ch.queue_bind(queue, exchange_for(DOMAIN), KEY)
    relay = OutboxRelay(engine, broker.url, lambda c: declare_producer(c, DOMAIN), batch_size=50)
    try:
        assert relay.drain(timeout=60) == 230
        assert unpublished(engine) == 0
        bodies = []
        while (msg := ch.basic_get(queue, auto_ack=True))[0] is not None:
            bodies.append(int(msg[2]))
        assert bodies == list(range(230))  # the outbox order held across batches in flight, each once
    finally:
        relay.publisher.close()
        conn.close()


def test_a_failed_confirm_rolls_back_every_batch_in_flight(engine, broker):
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE outbox"))
        for _ in range(200):
            enqueue(conn, make_event())
    relay = OutboxRelay(engine, broker.url, lambda ch: declare_producer(ch, DOMAIN), batch_size=50)
    real_wait, calls = relay.publisher.wait_confirmed, []

    def failing_second(upto):  # the broker refuses the second batch while the third is in flight
        calls.append(upto)
        if len(calls) == 2:
            raise PublishError("broker refused 1 messages")
        return real_wait(upto)

    relay.publisher.wait_confirmed = failing_second
    try:
        with pytest.raises(PublishError):
            relay.drain(timeout=60)
        assert unpublished(engine) == 150  # only the first, confirmed batch is marked
        relay.publisher.wait_confirmed = real_wait
        assert relay.drain(timeout=60) == 150
        assert unpublished(engine) == 0
    finally:
        relay.publisher.close()


def test_a_batch_sent_on_a_replaced_connection_is_never_taken_as_confirmed(broker):
    # Delivery tags count per connection: after a reconnect, the new connection's tags 1..n
    # must not confirm a batch that went out (and may have been lost) on the old one.
    from crm_chassis.messaging.publisher import ConfirmingPublisher

    publisher = ConfirmingPublisher(broker.url, lambda ch: declare_producer(ch, DOMAIN))
    e = make_event()
    message = (exchange_for(DOMAIN), KEY, e.data, e.amqp_properties())
    try:
        first = publisher.publish([message] * 5)
        publisher.close()  # the connection breaks before the first batch's confirms are read
        second = publisher.publish([message] * 5)  # reconnects: tags start at 1 again
        publisher.wait_confirmed(second)
        with pytest.raises(PublishError):
            publisher.wait_confirmed(first)
    finally:
        publisher.close()


def test_a_failed_publish_leaves_every_row_unpublished_and_claimable(engine, broker):
    # A batch whose publish fails rolls back with the batch in flight before it: nothing is
    # marked sent, nothing stays locked for another relay, and a retry sends all of them. (A
    # transaction left open by a failed publish kept its rows locked for the rest of a real
    # broker outage; test_broker_outage_... caught that in 4 of 16 runs before the fix.)
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE outbox"))
        for _ in range(120):
            enqueue(conn, make_event())
    relay = OutboxRelay(engine, broker.url, lambda ch: declare_producer(ch, DOMAIN), batch_size=50)
    real_publish, calls = relay.publisher.publish, []

    def failing_second(messages):
        calls.append(len(messages))
        if len(calls) == 2:
            raise PublishError("broker connection lost")
        return real_publish(messages)

    relay.publisher.publish = failing_second
    try:
        with pytest.raises(PublishError) as failed:
            relay.drain(timeout=60)
        with engine.begin() as conn:  # what another relay could claim now: every unpublished row
            claimable = conn.execute(
                sa.text(
                    "SELECT count(*) FROM (SELECT id FROM outbox WHERE published_at IS NULL FOR UPDATE SKIP LOCKED) c"
                )
            ).scalar_one()
        assert claimable == unpublished(engine) == 120, failed
        relay.publisher.publish = real_publish
        assert relay.drain(timeout=60) == 120
        assert unpublished(engine) == 0
    finally:
        relay.publisher.close()


def _queued_then_consumed(
    engine, broker, name: str, events: list[Event], prefetch: int = 100, **consumer_kw
) -> EventConsumer:
    """The events wait in the consumer's queue before it starts, so they arrive together."""
    consumer = EventConsumer(engine, broker.url, name, prefetch=prefetch, delivery_limit=3, **consumer_kw)
    conn = pika.BlockingConnection(pika.URLParameters(broker.url))
    ch = conn.channel()
    declare_producer(ch, DOMAIN)
    consumer.declare(ch)
    ch.confirm_delivery()
    for e in events:
        ch.basic_publish(exchange_for(DOMAIN), KEY, e.data, e.amqp_properties())
    conn.close()
    consumer.start()
    assert consumer.ready.wait(10), "consumer did not connect"
    return consumer


def test_events_that_arrive_together_are_handled_in_one_transaction_by_the_batch_handler(engine, broker):
    runs: list[int] = []

    def batch(conn, events):
        runs.append(len(events))
        for e in events:
            record(conn, e)

    events = [make_event(f"b{i}".encode()) for i in range(40)]
    events.insert(10, events[3])  # the same event twice in the queue: once
    sub = Subscription(DOMAIN, {KEY: record}, batch={KEY: batch})
    consumer = _queued_then_consumed(engine, broker, "batch-test", events, subscriptions=[sub], batch_size=50)
    try:
        wait_for(lambda: consumer.processed + consumer.duplicates == 41, what="every delivery")
        assert received(engine) == (40, 40)
        assert consumer.batches >= 1 and sum(runs) == 40 and max(runs) > 1  # not one transaction each
        assert len(runs) < 40
        assert consumer.duplicates == 1
    finally:
        consumer.stop(2)


def test_a_poison_event_in_a_batch_fails_alone_and_the_rest_commit(engine, broker):
    def handler(conn, event: Event):
        if event.data == b"poison":
            raise RuntimeError("cannot handle this one")
        record(conn, event)

    poison = make_event(b"poison")
    events = [make_event(b"fine-1"), make_event(b"fine-2"), poison, *[make_event(b"fine") for _ in range(5)]]
    sub = Subscription(DOMAIN, {KEY: handler})
    consumer = _queued_then_consumed(engine, broker, "batch-poison", events, subscriptions=[sub], batch_size=50)
    try:
        wait_for(lambda: received(engine)[0] == 7, what="the events around the poison one")
        dlq = dead_letter_queue(queue_name("batch-poison", DOMAIN))
        conn = pika.BlockingConnection(pika.URLParameters(broker.url))
        ch = conn.channel()
        got = [None]

        def dead_lettered():
            method, props, _body = ch.basic_get(dlq, auto_ack=True)
            if method is not None:
                got[0] = props
            return got[0] is not None

        wait_for(dead_lettered, what="the poison message in the dead-letter queue")
        conn.close()
        assert got[0].headers["cloudEvents_id"] == poison.id
        assert received(engine) == (7, 7)  # each of the others once
    finally:
        consumer.stop(2)


def test_a_batch_all_handler_takes_a_run_of_mixed_keys_in_arrival_order_in_one_call(engine, broker):
    other = "thing.changed.v1"
    calls: list[list[tuple[str, bytes]]] = []

    def batch_all(conn, events):
        calls.append([(e.routing_key, e.data) for e in events])
        for e in events:
            record(conn, e)

    def per_key(conn, events):  # must not be used while batch_all is set
        raise AssertionError("split by key")

    events = []
    for i in range(30):
        key = KEY if i % 3 else other  # keys interleaved: runs of one key are at most 2 long
        events.append(
            new_event(domain=DOMAIN, source_service="test-svc", routing_key=key, subject="things/1",
                      message=Payload(f"m{i}".encode()))
        )  # fmt: skip
    sub = Subscription(DOMAIN, {KEY: record, other: record}, batch={KEY: per_key, other: per_key}, batch_all=batch_all)
    consumer = EventConsumer(engine, broker.url, "batch-all", [sub], prefetch=100, delivery_limit=3, batch_size=50)
    conn = pika.BlockingConnection(pika.URLParameters(broker.url))
    ch = conn.channel()
    declare_producer(ch, DOMAIN)
    consumer.declare(ch)
    ch.confirm_delivery()
    for e in events:
        ch.basic_publish(exchange_for(DOMAIN), e.routing_key, e.data, e.amqp_properties())
    conn.close()
    consumer.start()
    assert consumer.ready.wait(10), "consumer did not connect"
    try:
        wait_for(lambda: consumer.processed == 30, what="every delivery")
        assert received(engine) == (30, 30)
        assert [x for call in calls for x in call] == [(e.routing_key, e.data) for e in events]  # arrival order
        assert max(len(c) for c in calls) > 2  # a run across keys in one call
        assert any(len({k for k, _ in c}) == 2 for c in calls)
        assert len(calls) < 30
    finally:
        consumer.stop(2)


def test_a_committed_batch_is_acked_whole_and_nothing_comes_back_after_a_restart(engine, broker):
    """One multiple-ack settles a batch (dead-lettered deliveries inside it included): after the
    consumer stops, its queue is empty and no delivery is redelivered to the next consumer."""
    events = [make_event(f"m{i}".encode()) for i in range(60)]
    name = "batch-ack"
    consumer = EventConsumer(engine, broker.url, name, [Subscription(DOMAIN, {KEY: record})], prefetch=100,
                             delivery_limit=3, batch_size=25)  # fmt: skip
    conn = pika.BlockingConnection(pika.URLParameters(broker.url))
    ch = conn.channel()
    declare_producer(ch, DOMAIN)
    consumer.declare(ch)
    ch.confirm_delivery()
    for i, e in enumerate(events):
        ch.basic_publish(exchange_for(DOMAIN), KEY, e.data, e.amqp_properties())
        if i == 30:  # a malformed one in the middle of a batch
            ch.basic_publish(exchange_for(DOMAIN), KEY, b"junk", pika.BasicProperties(headers={}))
    conn.close()
    consumer.start()
    assert consumer.ready.wait(10), "consumer did not connect"
    try:
        wait_for(lambda: consumer.processed == 60 and consumer.dead_lettered == 1, what="every delivery")
        assert consumer.batches >= 2  # acked batch by batch
    finally:
        consumer.stop(5)
    conn = pika.BlockingConnection(pika.URLParameters(broker.url))
    ch = conn.channel()
    queue = queue_name(name, DOMAIN)
    assert ch.queue_declare(queue=queue, passive=True).method.message_count == 0  # nothing unacked went back
    assert ch.queue_declare(queue=dead_letter_queue(queue), passive=True).method.message_count == 1
    conn.close()
    again = EventConsumer(
        engine, broker.url, name, [Subscription(DOMAIN, {KEY: record})], delivery_limit=3, batch_size=25
    )
    again.start()
    try:
        assert again.ready.wait(10)
        time.sleep(0.5)
        assert (again.processed, again.duplicates) == (0, 0)
    finally:
        again.stop(2)
    assert received(engine) == (60, 60)


def test_consumer_threads_share_the_queue_and_handle_every_event_once(engine, broker, tmp_path):
    """CONSUMER_THREADS=2: the service runs two competing consumers of its queue (each its own
    connection), both take part, and every event is handled exactly once, the same event
    delivered twice included."""
    from crm_chassis.config import DEFAULT_JWT_SECRET, load_settings
    from crm_chassis.service import Service, ServiceSpec

    url = engine.url.render_as_string(hide_password=False)
    env = {"DATABASE_URL": url, "AMQP_URL": broker.url, "JWT_SECRET": DEFAULT_JWT_SECRET, "CONSUMER_THREADS": "2"}
    settings = load_settings("threads-test", 1, env=env)
    assert settings.consumer_threads == 2
    spec = ServiceSpec(
        name="threads-test",
        default_port=1,
        migrations=tmp_path,
        subscriptions=lambda ctx: [Subscription(DOMAIN, {KEY: record})],
    )
    svc = Service(spec, settings, run_migrations=False, relay=False, grpc=False, background=False)
    assert len(svc.consumers) == 2 and svc.consumer is svc.consumers[0]
    svc.start()
    try:
        assert all(c.ready.wait(10) for c in svc.consumers)
        conn = pika.BlockingConnection(pika.URLParameters(broker.url))
        ch = conn.channel()
        ch.confirm_delivery()
        events = [make_event(str(i).encode()) for i in range(600)]
        for e in [*events, events[7]]:
            ch.basic_publish(exchange_for(DOMAIN), KEY, e.data, e.amqp_properties())
        conn.close()
        wait_for(lambda: received(engine)[0] >= 600, what="600 events", timeout=60)
        time.sleep(0.5)  # a stray duplicate would show up now
        assert received(engine) == (600, 600)
        assert all(c.processed > 0 for c in svc.consumers), [c.processed for c in svc.consumers]
        assert sum(c.processed for c in svc.consumers) == 600
    finally:
        svc.stop(2)


_READER = None


def metric_reader():
    """The process's SDK meter provider with an in-memory reader (set once: OpenTelemetry
    allows one global provider)."""
    global _READER
    if _READER is None:
        from opentelemetry import metrics as otel_metrics
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        _READER = InMemoryMetricReader()
        otel_metrics.set_meter_provider(MeterProvider(metric_readers=[_READER]))
    return _READER


def read_metrics(reader) -> dict:
    """{metric name: {attributes as a sorted tuple: value}}"""
    out: dict = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                for p in m.data.data_points:
                    out.setdefault(m.name, {})[tuple(sorted(p.attributes.items()))] = p.value
    return out


def test_the_messaging_metrics_count_outcomes_queue_depth_and_the_outbox_backlog(engine, broker):
    """crm.consumer.events by outcome, crm.consumer.queue.messages (the backlog a consumer
    found at its start: its prefetch taken, the rest still ready), crm.outbox.pending and its
    age, crm.outbox.published, as a meter provider's reader observes them."""
    import gc

    from crm_chassis import metrics as crm_metrics  # noqa: F401 - the instruments

    reader = metric_reader()
    gc.collect()  # the stopped consumers of earlier tests leave the totals now, not midway
    before = read_metrics(reader).get("crm.consumer.events", {})
    events = [make_event(f"m{i}".encode()) for i in range(30)]
    consumer = _queued_then_consumed(engine, broker, "metrics-test", [*events, events[0]], prefetch=5, subscriptions=[
        Subscription(DOMAIN, {KEY: record})])  # fmt: skip
    try:
        publish_raw(broker.url, None, body=b"no envelope")
        wait_for(lambda: consumer.processed == 30 and consumer.duplicates == 1 and consumer.dead_lettered == 1)
        queue = queue_name("metrics-test", DOMAIN)
        got = read_metrics(reader)
        delta = {k: v - before.get(k, 0) for k, v in got["crm.consumer.events"].items()}
        assert delta[(("outcome", "processed"),)] == 30
        assert delta[(("outcome", "duplicate"),)] == 1
        assert delta[(("outcome", "dead_lettered"),)] == 1
        # at its start the consumer had taken at most its prefetch (5) of the 31 waiting: the rest
        # were still ready when it read the depth
        assert 26 <= got["crm.consumer.queue.messages"][(("queue", queue),)] <= 31
        assert got["crm.consumer.held"][()] == 0
    finally:
        consumer.stop(2)

    relay = OutboxRelay(engine, broker.url, lambda ch: declare_producer(ch, DOMAIN), batch_size=50)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE outbox SET published_at = now() WHERE published_at IS NULL"))
            for _ in range(3):
                enqueue(conn, make_event())
            conn.execute(sa.text("UPDATE outbox SET occurred_at = now() - interval '90 seconds'"))
        got = read_metrics(reader)
        assert got["crm.outbox.pending"][()] == 3
        assert 89 <= got["crm.outbox.pending.age"][()] < 200
        published = got.get("crm.outbox.published", {}).get((), 0)
        assert relay.relay_once() == 3
        got = read_metrics(reader)
        assert got["crm.outbox.pending"][()] == 0 and got["crm.outbox.pending.age"][()] == 0
        assert got["crm.outbox.published"][()] == published + 3
    finally:
        relay.stop(2)


def test_consumer_domains_limit_a_process_to_one_producers_queues(engine, broker, tmp_path):
    """CONSUMER_DOMAINS=<domain>: the process consumes that producer's queue only (one process
    per producer, each with its own core and no lock shared with the others' batches); the other
    producer's events wait in their queue for the process that takes them. A domain the service
    does not consume stops the start, naming it."""
    from crm_chassis.config import DEFAULT_JWT_SECRET, ConfigError, load_settings
    from crm_chassis.service import Service, ServiceSpec

    other = f"{DOMAIN}b"
    url = engine.url.render_as_string(hide_password=False)

    def service(domains: str):
        env = {
            "DATABASE_URL": url,
            "AMQP_URL": broker.url,
            "JWT_SECRET": DEFAULT_JWT_SECRET,
            "CONSUMER_DOMAINS": domains,
        }
        spec = ServiceSpec(
            name="domains-test",
            default_port=1,
            migrations=tmp_path,
            subscriptions=lambda ctx: [Subscription(DOMAIN, {KEY: record}), Subscription(other, {KEY: record})],
        )
        return Service(
            spec,
            load_settings("domains-test", 1, env=env),
            run_migrations=False,
            relay=False,
            grpc=False,
            background=False,
        )

    with pytest.raises(ConfigError, match="CONSUMER_DOMAINS names nope"):
        service("nope")
    svc = service(other)
    assert [s.domain for s in svc.consumer.subscriptions] == [other]
    svc.start()
    try:
        assert svc.consumer.ready.wait(10)
        conn = pika.BlockingConnection(pika.URLParameters(broker.url))
        ch = conn.channel()
        declare_producer(ch, DOMAIN)
        declare_producer(ch, other)
        EventConsumer(engine, broker.url, "domains-test", [Subscription(DOMAIN, {KEY: record})]).declare(ch)
        ch.confirm_delivery()
        mine = [make_event(b"b") for _ in range(3)]
        for e in mine:
            ch.basic_publish(exchange_for(other), KEY, e.data, e.amqp_properties())
        theirs = make_event(b"a")
        ch.basic_publish(exchange_for(DOMAIN), KEY, theirs.data, theirs.amqp_properties())
        wait_for(lambda: received(engine)[0] >= 3, what="the other domain's 3 events")
        time.sleep(0.5)
        assert received(engine) == (3, 3)
        waiting = ch.queue_declare(queue=queue_name("domains-test", DOMAIN), passive=True).method.message_count
        assert waiting == 1  # left for the process that consumes that producer
        conn.close()
    finally:
        svc.stop(2)
