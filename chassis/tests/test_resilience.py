"""Failure handling in the chassis, against real PostgreSQL and RabbitMQ: NUL characters in
requests, malformed and undecodable events, a database outage under the consumer, database
errors classified as unavailable, idle broker connections, and the relay's traces."""

from __future__ import annotations

import logging
import socket
import threading
import time

import pika
import pytest
import sqlalchemy as sa
from google.protobuf import struct_pb2

from crm.customer.v1 import customer_events_pb2, customer_pb2, customer_service_pb2
from crm_chassis.db import DatabaseProbe, create_engine, is_database_unavailable
from crm_chassis.interceptors import request_violations
from crm_chassis.messaging.consumer import DEAD_LETTER_REASON, EventConsumer, Requires, Subscription
from crm_chassis.messaging.envelope import Event, new_event
from crm_chassis.messaging.outbox import OutboxRelay, enqueue
from crm_chassis.messaging.tables import messaging_metadata
from crm_chassis.messaging.topology import dead_letter_queue, declare_producer, exchange_for, queue_name
from tests.support.db_proxy import proxied_database
from tests.support.harness import wait_for

DOMAIN = "resilience"
KEY = "customer.created.v1"


def with_query(url: str, query: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{query}"


# -- NUL characters -------------------------------------------------------------------------


def test_nul_characters_are_found_in_nested_repeated_and_map_fields_by_path():
    clean = customer_service_pb2.CreateCustomerRequest(
        customer=customer_pb2.Customer(given_name="علی", family_name="رضایی"), request_id="r-1"
    )
    assert request_violations(clean) == []
    bad = customer_service_pb2.CreateCustomerRequest(
        customer=customer_pb2.Customer(given_name="a\x00b", family_name="ok"), request_id="r\x00"
    )
    assert sorted(v.field for v in request_violations(bad)) == ["customer.given_name", "request_id"]
    # Maps, repeated fields and recursive messages (Struct -> Value -> ListValue -> Value).
    s = struct_pb2.Struct()
    s.update({"fine": "x", "nested": {"deep": ["ok", "no\x00"]}, "k\x00": 1})
    assert sorted(v.field for v in request_violations(s)) == [
        "fields",  # a key with a NUL names the map
        'fields["nested"].struct_value.fields["deep"].list_value.values[1].string_value',
    ]
    # Bytes may hold anything.
    assert request_violations(customer_service_pb2.ImportCustomersRequest(content=b"\x00\x00")) == []


def test_timestamps_and_durations_out_of_range_are_named_by_path():
    """A Timestamp protobuf cannot turn into a datetime (before 0001 or after 9999, nanos out of
    range) or a bad Duration is named like a NUL, wherever it sits; it used to be an INTERNAL
    from ToDatetime() inside the handler."""
    ok = struct_pb2.Struct()  # holds neither: nothing to report
    assert request_violations(ok) == []
    job = jobs_pb2_like()
    assert request_violations(job) == []
    job.create_time.seconds = 253_402_300_800  # 10000-01-01
    job.ttl.seconds = 1
    job.ttl.nanos = -1  # mixed signs
    job.history.add().seconds = -62_135_596_801  # before 0001-01-01
    job.history.add().nanos = 1_000_000_000
    job.history.add().seconds = 1_700_000_000  # fine
    assert [v.field for v in request_violations(job)] == ["create_time", "ttl", "history[0]", "history[1]"]
    assert "9999-12-31" in request_violations(job)[0].description


def jobs_pb2_like():
    """A message with a Timestamp, a Duration and a repeated Timestamp, built at run time (no
    contract of ours has all three)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, duration_pb2, message_factory, timestamp_pb2

    pool = descriptor_pool.DescriptorPool()
    for dep in (timestamp_pb2, duration_pb2):
        fdp = descriptor_pb2.FileDescriptorProto()
        dep.DESCRIPTOR.CopyToProto(fdp)
        pool.Add(fdp)
    f = descriptor_pb2.FileDescriptorProto(
        name="probe.proto",
        package="probe",
        dependency=["google/protobuf/timestamp.proto", "google/protobuf/duration.proto"],
    )
    m = f.message_type.add(name="Probe")
    T = descriptor_pb2.FieldDescriptorProto
    m.field.add(name="create_time", number=1, type=T.TYPE_MESSAGE, type_name=".google.protobuf.Timestamp")
    m.field.add(name="ttl", number=2, type=T.TYPE_MESSAGE, type_name=".google.protobuf.Duration")
    m.field.add(
        name="history", number=3, type=T.TYPE_MESSAGE, type_name=".google.protobuf.Timestamp", label=T.LABEL_REPEATED
    )
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("probe.Probe"))()


# -- database errors ------------------------------------------------------------------------


def test_a_database_that_cannot_be_reached_is_unavailable_and_a_bad_statement_is_not(databases):
    proxy, url = proxied_database(databases.fresh("classify"))
    engine = create_engine(url, pool_size=1)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
            with pytest.raises(sa.exc.DBAPIError) as bad:
                conn.execute(sa.text("SELECT 1/0"))
        assert not is_database_unavailable(bad.value)
        proxy.stop()
        with pytest.raises(sa.exc.DBAPIError) as lost, engine.connect() as conn:  # the pooled one was reset
            conn.execute(sa.text("SELECT 1"))
        assert is_database_unavailable(lost.value)
        with pytest.raises(sa.exc.DBAPIError) as refused, engine.connect() as conn:  # a new one cannot open
            conn.execute(sa.text("SELECT 1"))
        assert is_database_unavailable(refused.value)
        plain = sa.create_engine(url)  # without the chassis's disconnect rule, as any engine
        try:
            with pytest.raises(sa.exc.DBAPIError) as raw, plain.connect():
                pass
            assert not raw.value.connection_invalidated  # what used to answer INTERNAL
            assert is_database_unavailable(raw.value)
        finally:
            plain.dispose()
    finally:
        proxy.stop()
        engine.dispose()


def test_the_database_probe_follows_an_outage_and_the_recovery(databases):
    proxy, url = proxied_database(databases.fresh("probe"))
    engine = create_engine(url, pool_size=1)
    changes: list[bool] = []
    probe = DatabaseProbe(engine, interval=0.2, on_change=changes.append)
    probe.start()
    try:
        assert probe.up is True and changes == [True]
        proxy.stop()
        wait_for(lambda: probe.up is False, what="the probe to see the outage")
        proxy.start()
        wait_for(lambda: probe.up is True, what="the probe to see the database back")
        assert changes == [True, False, True]
    finally:
        probe.stop()
        proxy.stop()
        engine.dispose()


def test_a_database_that_accepts_connections_but_never_answers_is_down(databases):
    """A black hole (a server host that vanished) must not hang the probe: it says down."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(8)  # the kernel accepts; nobody ever answers
    port = hole.getsockname()[1]
    engine = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{port}/nothing", pool_size=1)
    probe = DatabaseProbe(engine, timeout=1.0)
    try:
        assert probe.check() is False and probe.up is False
    finally:
        probe.stop()
        engine.dispose()
        hole.close()


# -- the consumer ---------------------------------------------------------------------------


@pytest.fixture
def engine(databases):
    eng = create_engine(databases.fresh("resilience"), pool_size=4)
    messaging_metadata.create_all(eng)
    with eng.begin() as conn:
        conn.execute(sa.text("CREATE TABLE received (event_id text NOT NULL, customer text)"))
    yield eng
    eng.dispose()


def received(engine) -> list[tuple[str, str]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text("SELECT event_id, customer FROM received"))]


def record(conn: sa.Connection, event: Event) -> None:
    msg = event.parse(customer_events_pb2.CustomerCreated)
    conn.execute(sa.text("INSERT INTO received VALUES (:i, :c)"), {"i": event.id, "c": msg.customer.name})


REQUIRES = {KEY: Requires(customer_events_pb2.CustomerCreated, ("customer.name", "customer.create_time"))}


def created(name: str = "customers/1") -> Event:
    c = customer_pb2.Customer(name=name)
    c.create_time.GetCurrentTime()
    return new_event(
        domain=DOMAIN,
        source_service="test-svc",
        routing_key=KEY,
        subject=name,
        message=customer_events_pb2.CustomerCreated(customer=c),
    )


def start_consumer(
    engine, url: str, name: str, handler=record, requires=None, limit: int = 3, batch: int = 1
) -> EventConsumer:
    consumer = EventConsumer(
        engine,
        url,
        name,
        [Subscription(DOMAIN, {KEY: handler}, requires=REQUIRES if requires is None else requires)],
        prefetch=10,
        delivery_limit=limit,
        max_backoff=0.5,
        batch_size=batch,
    )
    consumer.start()
    assert consumer.ready.wait(10), "consumer did not connect"
    return consumer


def publish(url: str, event: Event, body: bytes | None = None) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    declare_producer(ch, DOMAIN)
    ch.confirm_delivery()
    ch.basic_publish(exchange_for(DOMAIN), KEY, event.data if body is None else body, event.amqp_properties())
    conn.close()


def dead_lettered(url: str, consumer_name: str) -> list[pika.BasicProperties]:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    out = []
    while True:
        method, props, _ = ch.basic_get(dead_letter_queue(queue_name(consumer_name, DOMAIN)), auto_ack=True)
        if method is None:
            break
        out.append(props)
    conn.close()
    return out


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"", "lacks required field(s): customer.name, customer.create_time"),  # an empty body
        (b"\xff\xff\xff", "does not decode as crm.customer.v1.CustomerCreated"),
    ],
    ids=["empty", "undecodable"],
)
def test_an_event_without_what_its_handler_needs_is_dead_lettered_at_once_with_the_reason(engine, broker, body, reason):
    calls = []
    name = f"needs-{len(body)}"
    consumer = start_consumer(engine, broker.url, name, handler=lambda c, e: calls.append(e))
    try:
        bad = created()
        publish(broker.url, bad, body=body)
        publish(broker.url, created("customers/2"))  # a good one behind it still flows
        got = wait_for(lambda: dead_lettered(broker.url, name), what="the event in the dead-letter queue")
        wait_for(lambda: len(calls) == 1, what="the good event")
        assert [e.subject for e in calls] == ["customers/2"]
        assert len(got) == 1 and got[0].headers["cloudEvents_id"] == bad.id
        assert reason in got[0].headers[DEAD_LETTER_REASON]
        assert got[0].headers.get("x-delivery-count", 0) == 0  # its first delivery: not retried
        assert consumer.failures == 0 and consumer.dead_lettered == 1
    finally:
        consumer.stop(2)


def test_a_handler_that_cannot_decode_its_event_dead_letters_it_at_once(engine, broker):
    """Without a declared requirement, a DecodeError from the handler's own parse is not retried."""
    attempts = []

    def handler(conn, event):
        attempts.append(event.id)
        record(conn, event)

    consumer = start_consumer(engine, broker.url, "decode-in-handler", handler=handler, requires={})
    try:
        bad = created()
        publish(broker.url, bad, body=b"\xff\xff\xff")
        got = wait_for(lambda: dead_lettered(broker.url, "decode-in-handler"), what="the event in the DLQ")
        assert attempts == [bad.id]
        assert "DecodeError" in got[0].headers[DEAD_LETTER_REASON]
    finally:
        consumer.stop(2)


def test_a_requirement_naming_a_field_the_message_lacks_fails_at_start():
    with pytest.raises(ValueError, match="customer.nmae"):
        Requires(customer_events_pb2.CustomerCreated, ("customer.nmae",))


@pytest.mark.parametrize("batch", [1, 5], ids=["one-at-a-time", "batches"])
def test_a_database_outage_holds_events_with_backoff_and_never_uses_up_the_delivery_limit(
    databases, broker, caplog, batch
):
    """The database goes away while a valid event arrives: the consumer keeps the delivery,
    retries with back-off and projects it once the database is back; nothing reaches the DLQ.
    In batches (CONSUMER_BATCH > 1) the worker thread holds its batch, and the deliveries that
    arrive behind it wait, unacknowledged, in order."""
    proxy, url = proxied_database(databases.fresh(f"dbdown{batch}"))
    engine = create_engine(url, pool_size=2)
    messaging_metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE received (event_id text NOT NULL, customer text)"))
    amqp = with_query(broker.url, "heartbeat=2")  # the outage outlasts several heartbeats
    consumer = start_consumer(engine, amqp, "dbdown-test", limit=3, batch=batch)
    try:
        warm = created("customers/warm")
        publish(broker.url, warm)
        wait_for(lambda: received(engine) == [(warm.id, "customers/warm")], what="the first event")
        connection = consumer._conn
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="crm"):
            proxy.stop()  # PostgreSQL goes away
            events = [created(f"customers/{i}") for i in range(3)]
            for e in events:
                publish(broker.url, e)
            # More attempts than the delivery limit allows redeliveries: the old consumer had
            # dead-lettered the event by now.
            wait_for(lambda: consumer.database_waits >= 5, what="retries while the database is down")
            time.sleep(5)  # two heartbeat intervals with no database
            assert dead_lettered(broker.url, "dbdown-test") == []
            assert consumer.held == 3  # all three unsettled, none returned to the queue
            proxy.start()  # PostgreSQL is back
            wait_for(lambda: len(received(engine)) == 4, what="the held events after the outage")
        assert received(engine)[1:] == [(e.id, e.subject) for e in events]  # in order, once each
        assert dead_lettered(broker.url, "dbdown-test") == []
        assert consumer.failures == 0
        assert consumer._conn is connection  # the broker connection lived through it
        messages = [r.getMessage() for r in caplog.records]
        assert messages.count("database unavailable; events are held unacknowledged and retried with back-off") == 1
        assert not any(r.levelno >= logging.ERROR or r.exc_info for r in caplog.records), messages
        assert any(r.getMessage() == "database available again; held events processed" for r in caplog.records)
    finally:
        consumer.stop(2)
        proxy.stop()
        engine.dispose()


# -- idle connections and the relay's traces ------------------------------------------------


def test_idle_broker_connections_stay_open_past_several_heartbeats(engine, broker, caplog):
    amqp = with_query(broker.url, "heartbeat=2")
    consumer = start_consumer(engine, amqp, "heartbeat-test")
    relay = OutboxRelay(engine, amqp, lambda ch: declare_producer(ch, DOMAIN), poll_seconds=0.5)
    relay.start()
    try:
        first = created("customers/a")
        with engine.begin() as conn:
            enqueue(conn, first)
        relay.wake()
        wait_for(lambda: len(received(engine)) == 1, what="the first event")
        publisher_conn, consumer_conn = relay.publisher._conn, consumer._conn
        assert publisher_conn is not None and publisher_conn.is_open
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="crm"):
            time.sleep(10)  # five heartbeat intervals with nothing to publish
            second = created("customers/b")
            with engine.begin() as conn:
                enqueue(conn, second)
            relay.wake()
            wait_for(lambda: len(received(engine)) == 2, what="the event after the idle time")
        assert relay.publisher._conn is publisher_conn and consumer._conn is consumer_conn  # no reconnect
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    finally:
        relay.stop(2)
        consumer.stop(2)


def test_idle_relay_polls_make_no_spans(engine, broker, spans):
    database = engine.url.database
    relay = OutboxRelay(engine, broker.url, lambda ch: declare_producer(ch, DOMAIN), poll_seconds=0.05)
    spans.clear()
    with engine.connect() as conn:  # the instrumentation is on for this engine's other work
        conn.execute(sa.text("SELECT 1"))
    assert any(s.attributes.get("db.name") == database for s in spans.get_finished_spans())
    spans.clear()
    relay.start()
    try:
        wait_for(lambda: relay.broker_up, what="the relay's first poll")
        for _ in range(3):
            assert relay.relay_once() == 0
        time.sleep(0.5)  # several more polls of the relay's own loop
    finally:
        relay.stop(2)
    assert [s.name for s in spans.get_finished_spans() if s.attributes.get("db.name") == database] == []


def test_the_publish_span_times_the_publish_and_its_confirms(engine, broker, spans):
    relay = OutboxRelay(engine, broker.url, lambda ch: declare_producer(ch, DOMAIN))
    calls: list[tuple[int, int]] = []
    publish_batch = relay.publisher.publish_batch
    lock = threading.Lock()

    def timed(messages):
        begun = time.time_ns()
        publish_batch(messages)
        with lock:
            calls.append((begun, time.time_ns()))

    relay.publisher.publish_batch = timed
    with engine.begin() as conn:
        for i in range(3):
            enqueue(conn, created(f"customers/{i}"))
    spans.clear()
    try:
        assert relay.relay_once() == 3
    finally:
        relay.stop(2)
    ((begun, ended),) = calls
    producer = [s for s in spans.get_finished_spans() if s.kind.name == "PRODUCER"]
    assert [s.attributes.get("messaging.batch.message_count") for s in producer] == [3]  # one run, no trace
    (span,) = producer
    assert span.start_time <= begun and span.end_time >= ended, (span.start_time, span.end_time, begun, ended)


def test_a_value_the_database_cannot_keep_is_invalid_argument_and_a_bad_statement_is_not(databases):
    """A key too long for a btree index (54000) or a number past its column's type (22003) is
    the caller's input that a handler did not bound: the interceptor answers INVALID_ARGUMENT,
    not INTERNAL. A statement's own fault (division by zero) stays INTERNAL."""
    import grpc

    from crm_chassis.interceptors import value_refused

    engine = create_engine(databases.fresh("refused"), pool_size=1)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE t (k text, n integer)"))
            conn.execute(sa.text("CREATE INDEX t_k ON t (k)"))
        long_key = sa.text("INSERT INTO t (k) SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 200)")
        for statement, params in ((long_key, {}), (sa.text("INSERT INTO t (n) VALUES (:n)"), {"n": 2**31})):
            with pytest.raises(sa.exc.DBAPIError) as err, engine.begin() as conn:
                conn.execute(statement, params)
            refused = value_refused(err.value)
            assert refused is not None and refused.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(sa.exc.DBAPIError) as err, engine.connect() as conn:
            conn.execute(sa.text("SELECT 1/0"))
        assert value_refused(err.value) is None
    finally:
        engine.dispose()
