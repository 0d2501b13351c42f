"""The live consumer and RebuildProjections over a real broker (a vhost of this module's own,
so the event log holds only these events): events published to the producers' exchanges build
the projections live; a rebuild replays crm.events.log into fresh tables and swaps them in,
and the rebuilt tables answer the same reports. The live tables are damaged on purpose before
the rebuild, so the test fails if the swap did not happen."""

from __future__ import annotations

import datetime as dt

import pika
import pytest
import sqlalchemy as sa

from crm.customer.v1 import customer_events_pb2, customer_pb2
from crm.reporting.v1 import reporting_service_pb2 as rs
from crm.reporting.v1 import reporting_service_pb2_grpc as rsg
from crm.support.v1 import ticket_pb2
from crm_chassis import jobs
from crm_chassis.messaging.envelope import new_event
from crm_chassis.messaging.topology import declare_producer
from reporting_svc import rebuild
from reporting_svc.__main__ import SPEC
from tests.support.harness import channel, md, start_service, wait_for

UTC = dt.UTC
D = dt.datetime(2026, 11, 21, 6, 0, tzinfo=UTC)
H = dt.timedelta(hours=1)


@pytest.fixture(scope="module")
def live(databases, own_broker):
    service = start_service(SPEC, databases.fresh("rep_rebuild"), own_broker.url)
    assert service.consumer.ready.wait(10)
    yield service
    service.stop(0)


@pytest.fixture(scope="module")
def stub(live):
    with channel(live) as ch:
        yield rsg.ReportingServiceStub(ch)


def publish(url: str, events) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        for domain in {e.exchange.split(".")[1] for e in events}:
            declare_producer(ch, domain)
        for e in events:
            ch.basic_publish(e.exchange, e.routing_key, e.data, e.amqp_properties())
    finally:
        conn.close()


def customer(n: int, source: str, version: int):
    c = customer_pb2.Customer(
        name=f"customers/00000000-0000-4000-8000-{n:012d}", acquisition_source=source, etag=f'"{version}"'
    )
    c.create_time.FromDatetime(D + n * H)
    key = "customer.created.v1" if version == 1 else "customer.updated.v1"
    cls = customer_events_pb2.CustomerCreated if version == 1 else customer_events_pb2.CustomerUpdated
    return new_event(
        domain="customer", source_service="customer-svc", routing_key=key, subject=c.name, message=cls(customer=c)
    )


def answers(stub):
    def one(**kw):
        return stub.GetSupportReport(rs.GetSupportReportRequest(**kw), metadata=md())

    return (
        one(period="day", calendar="jalali"),
        one(dimensions=["agent"]),
        stub.CountCustomersBySource(rs.CountCustomersBySourceRequest(), metadata=md()),
        stub.GetAcquisitionReport(rs.GetAcquisitionReportRequest(period="month", calendar="jalali"), metadata=md()),
        stub.GetCustomerTimeline(  # Customer 360: created, then updated
            rs.GetCustomerTimelineRequest(customer="customers/00000000-0000-4000-8000-000000000002"), metadata=md()
        ),
    )


def applied(live) -> int:
    with live.ctx.engine.connect() as conn:
        return conn.execute(sa.text("SELECT coalesce(sum(applied_events), 0) FROM projection_sources")).scalar()


def test_live_projection_then_rebuild_gives_the_same_answers(live, stub, own_broker, ev, monkeypatch, caplog):
    email = ticket_pb2.Channel.Value("CHANNEL_EMAIL")
    events = [
        *ev.tickets(
            11,
            agent="agents/a",
            channel=email,
            created=D,
            first_response=600,
            resolved=3600,
            closed=D + 2 * H,
            exchanges=2,
        ),
        *ev.tickets(
            12, agent="agents/b", channel=email, created=D + 20 * H, first_response=60, exchanges=1, complaint=True
        ),
        ev.csat(11, 11, "agents/a", 4, D + 3 * H),
        ev.breach(12, "resolution", "agents/b", D + 22 * H),
        customer(1, "website", 1),
        customer(2, "website", 1),
        customer(2, "referral", 2),
        customer(3, "exhibition", 1),
        ev.lead(1, "website", "new", D, 1),
        ev.lead(1, "website", "converted", D, 2),
        ev.opportunity(1, "website", "won", "IRT", 1_500_000, D + 5 * H, 3),
    ]
    stale = ev.again(events[0])  # an old version again, as a relay retry might publish it
    # a poison event: it decodes, but its handler fails (no such currency); the live consumer
    # dead-letters it after the delivery limit, the rebuild skips it
    poison = ev.opportunity(9, "website", "won", "TOMAN", 5, D, 1)
    publish(own_broker.url, [*events[:3], stale, *events[3:], poison])
    wait_for(lambda: applied(live) == len(events) + 1, 15, "the live consumer to apply every event")
    before = answers(stub)
    assert before[0].total.requests == 2 and before[0].total.closed == 1
    web = {r.source: r for r in before[3].rows}["website"]
    assert (web.customers, web.leads, web.converted_leads, web.won_opportunities) == (1, 1, 1, 1)
    assert (web.won_revenue[0].currency_code, web.won_revenue[0].units) == ("IRR", 15_000_000)
    assert [e.kind for e in before[4].entries] == ["customer.updated", "customer.created"]
    assert {s.acquisition_source: s.customer_count for s in before[2].sources} == {
        "website": 1,
        "referral": 1,
        "exhibition": 1,
    }

    with live.ctx.engine.begin() as conn:  # damage the live tables: only a real swap repairs them
        conn.execute(sa.text("UPDATE support_daily SET requests = requests + 100"))
        conn.execute(sa.text("DELETE FROM customer_source_facts"))
        conn.execute(sa.text("UPDATE acquisition_daily SET leads = leads + 7"))
        conn.execute(sa.text("DELETE FROM timeline"))
    assert answers(stub) != before

    indexes = sa.text("SELECT tablename, indexname FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1, 2")
    with live.ctx.engine.connect() as conn:
        index_names = conn.execute(indexes).all()
    # batches of 8: the first set-based (several versions of one ticket, an older one after them),
    # the second, with the poison event, again event by event
    monkeypatch.setattr(rebuild, "BATCH", 8)
    job = stub.RebuildProjections(rs.RebuildProjectionsRequest(request_id="r1"), metadata=md())
    assert job.name.startswith("projectionRebuilds/")
    again = stub.RebuildProjections(rs.RebuildProjectionsRequest(request_id="r1"), metadata=md())
    assert again.name == job.name

    def finished():
        j = stub.GetProjectionRebuild(rs.GetProjectionRebuildRequest(name=job.name), metadata=md())
        return j if j.state in ("succeeded", "failed", "cancelled") else None

    done = wait_for(finished, 20, "the rebuild")
    assert (done.state, done.error) == ("succeeded", "")
    assert done.processed_events == done.total_events == len(events) + 2
    with live.ctx.engine.connect() as conn:
        assert jobs.get(conn, done.name.removeprefix("projectionRebuilds/")).counters == {"skipped": 1}
    assert answers(stub) == before
    assert sum("failed set-based" in r.getMessage() for r in caplog.records) == 1
    with live.ctx.engine.connect() as conn:
        schemas = conn.execute(
            sa.text("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'rebuild_%' OR nspname LIKE 'retired_%'")
        ).all()
        assert schemas == [] and conn.execute(sa.text("SELECT count(*) FROM projection_rebuilds")).scalar() == 0
        assert conn.execute(indexes).all() == index_names  # as the migrations named them

    # the live consumer goes on into the swapped-in tables
    late = ev.tickets(13, agent="agents/a", channel=email, created=D + 2 * H)
    publish(own_broker.url, late)
    wait_for(lambda: answers(stub)[0].total.requests == 3, 10, "the live consumer after the swap")

    status = stub.GetProjectionStatus(rs.GetProjectionStatusRequest(), metadata=md())
    lag = {p.domain: p for p in status.producers}
    wait_for(
        lambda: all(
            p.events_behind == 0
            for p in stub.GetProjectionStatus(rs.GetProjectionStatusRequest(), metadata=md()).producers
        ),
        5,
        "empty queues",
    )
    assert (
        set(lag) == {"campaign", "customer", "sales", "support"} and lag["support"].applied_events == 10
    )  # 8 + the stale copy + the late ticket
    assert not status.HasField("rebuild")


def test_bad_rebuild_name(stub):
    import grpc

    from crm_chassis.errors import read_rpc_error

    with pytest.raises(grpc.RpcError) as info:
        stub.GetProjectionRebuild(rs.GetProjectionRebuildRequest(name="jobs/1"), metadata=md())
    assert read_rpc_error(info.value).field_violations[0].field == "name"
    with pytest.raises(grpc.RpcError) as info:
        stub.GetProjectionRebuild(
            rs.GetProjectionRebuildRequest(name="projectionRebuilds/00000000-0000-4000-8000-000000000000"),
            metadata=md(),
        )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
