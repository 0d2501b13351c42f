"""A rebuild interrupted by a restart resumes from its checkpoint, and events that arrive while
it runs reach the rebuilt tables through the live consumer (they are past the log's end the
replay stops at): the service is stopped in the middle of the replay, an event is published
before that, a new process on the same database finishes the job."""

from __future__ import annotations

import datetime as dt
import threading

import pika
import sqlalchemy as sa

from crm.reporting.v1 import reporting_service_pb2 as rs
from crm.reporting.v1 import reporting_service_pb2_grpc as rsg
from crm.support.v1 import ticket_pb2
from crm_chassis import jobs
from crm_chassis.messaging.topology import declare_producer
from reporting_svc import rebuild
from reporting_svc.__main__ import SPEC
from tests.support.harness import channel, md, start_service, wait_for

UTC = dt.UTC
D = dt.datetime(2026, 11, 21, 6, 0, tzinfo=UTC)
H = dt.timedelta(hours=1)
WEB = ticket_pb2.Channel.Value("CHANNEL_WEB")


def publish(url: str, events) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        declare_producer(ch, "support")
        for e in events:
            ch.basic_publish(e.exchange, e.routing_key, e.data, e.amqp_properties())
    finally:
        conn.close()


def totals(svc) -> rs.SupportRow:
    with channel(svc) as ch:
        return rsg.ReportingServiceStub(ch).GetSupportReport(rs.GetSupportReportRequest(), metadata=md()).total


def test_restart_mid_rebuild_resumes_and_keeps_live_events(databases, own_broker, ev, monkeypatch):
    db = databases.fresh("rep_resume")
    first = start_service(SPEC, db, own_broker.url)
    assert first.consumer.ready.wait(10)
    events = [
        e
        for n in range(4)
        for e in ev.tickets(20 + n, agent="agents/a", channel=WEB, created=D + n * H, first_response=60 * (n + 1))
    ]
    publish(own_broker.url, events)
    # every event applied, first responses included (60, 120, 180, 240 s: 150 on average), not
    # only the four openings: a snapshot taken earlier would miss the last responses
    wait_for(
        lambda: (t := totals(first)).requests == 4 and t.avg_first_response_seconds == 150, 10, "the live projection"
    )
    before = totals(first)

    monkeypatch.setattr(rebuild, "BATCH", 2)
    reached, go, calls = threading.Event(), threading.Event(), []
    real = rebuild.apply_batch

    def gated(conn, schema, table, batch):
        calls.append(len(batch))
        if len(calls) == 2:  # the second batch of the first run: hold it while the test acts
            reached.set()
            go.wait(5)
        return real(conn, schema, table, batch)

    monkeypatch.setattr(rebuild, "apply_batch", gated)
    with channel(first) as ch:
        job = rsg.ReportingServiceStub(ch).RebuildProjections(rs.RebuildProjectionsRequest(), metadata=md())
    assert reached.wait(10)
    # an event after the log's end the replay stops at: only the live consumer can bring it
    late = ev.tickets(30, agent="agents/b", channel=WEB, created=D + 5 * H, complaint=True)
    publish(own_broker.url, late)
    wait_for(lambda: totals(first).requests == 5, 10, "the live consumer during the rebuild")
    stopping = threading.Thread(target=first.stop, args=(0,))
    stopping.start()
    go.set()
    stopping.join(15)
    with sa.create_engine(db).connect() as conn:
        paused = jobs.get(conn, job.name.removeprefix("projectionRebuilds/"))
    assert paused.state == jobs.QUEUED and paused.checkpoint["next"] == 4  # two batches committed

    second = start_service(SPEC, db, own_broker.url)
    try:
        with channel(second) as ch:
            stub = rsg.ReportingServiceStub(ch)

            def finished():
                j = stub.GetProjectionRebuild(rs.GetProjectionRebuildRequest(name=job.name), metadata=md())
                return j if j.state in ("succeeded", "failed", "cancelled") else None

            done = wait_for(finished, 20, "the resumed rebuild")
        assert done.state == "succeeded" and done.processed_events == done.total_events == len(events)
        assert calls[:2] == [2, 2] and sum(calls) == len(events)  # nothing replayed twice
        with second.ctx.engine.connect() as conn:
            assert jobs.get(conn, paused.id).attempts == 2
        after = totals(second)
        assert (after.requests, after.complaints) == (5, 1)
        assert after.avg_first_response_seconds == before.avg_first_response_seconds
    finally:
        second.stop(0)
