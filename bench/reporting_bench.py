"""reporting-svc: live projection, rebuild and report latency: `python -m bench.reporting_bench`.

On a fresh database and a private vhost (so the event log holds only these events):

1. BENCH_REPORTING_EVENTS events (support tickets: opened, first_responded, resolved, closed;
   one CSAT survey per ticket; customers created, a tenth of them updated; tickets and surveys
   name one of 50 customers, whose Customer 360 timelines get long) are published to the
   producers' exchanges, with this service's queues and a raw queue bound beforehand.
2. raw: a plain pika consumer (prefetch 100, ack per message) drains the raw queue: msg/s.
3. live: reporting-svc (in this process: gRPC, consumers, job worker) starts and applies its
   queues; events/s from its start to the last event applied (projection_sources). Goal: at
   least 0.5 of raw.
4. rebuild: first its baseline, a plain pika consumer reading crm.events.log from its first
   offset (nothing done with the messages): events/s; then RebuildProjections replays the log
   into shadow tables and swaps: events/s, and its ratio to that read. Goal (issue 12) >= 20,000
   events/s.
5. reports: GetSupportReport (Jalali day x agent; month) and GetAcquisitionReport (Jalali month)
   BENCH_REPORT_CALLS times each: p50/p95 ms; and a Customer 360 first page (50 entries).

Results: bench/results/reporting-<stamp>.txt/.json.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import time

import pika
import sqlalchemy as sa

from bench.load import pct, table
from crm.customer.v1 import customer_events_pb2, customer_pb2
from crm.reporting.v1 import reporting_service_pb2 as rs
from crm.reporting.v1 import reporting_service_pb2_grpc as rsg
from crm.support.v1 import support_events_pb2 as sev
from crm_chassis.messaging.envelope import new_event
from crm_chassis.messaging.topology import EVENT_LOG_STREAM, declare_consumer_queue, declare_producer, exchange_for
from reporting_svc import PROJECTIONS
from reporting_svc.__main__ import SPEC
from tests.support.harness import ROOT, Broker, Databases, channel, md, service_settings, start_service, wait_for

N = int(os.environ.get("BENCH_REPORTING_EVENTS", "20000"))
THREADS = os.environ.get("CONSUMER_THREADS", "1")
# BENCH_REPORTING_SPLIT=1: the live stage in one `python -m reporting_svc consume` process per
# producer (CONSUMER_DOMAINS), instead of the service in this process
SPLIT = os.environ.get("BENCH_REPORTING_SPLIT", "") == "1"
CALLS = int(os.environ.get("BENCH_REPORT_CALLS", "50"))
T0 = dt.datetime(2026, 10, 1, 6, 0, tzinfo=dt.UTC)


def ts(t):
    from google.protobuf import timestamp_pb2

    out = timestamp_pb2.Timestamp()
    out.FromDatetime(t)
    return out


def events(n: int) -> list:
    out = []
    i = 0
    while len(out) < n:
        created = T0 + dt.timedelta(minutes=37 * i)
        name = f"tickets/{i}"
        base = dict(ticket=name, channel=1 + i % 6, team=f"teams/{i % 3}", assignee=f"agents/{i % 20}",
                    complaint=i % 9 == 0, create_time=ts(created), sla_policy="slaPolicies/std",
                    customer=f"customers/{i % 50}")  # fmt: skip
        steps = [
            ("ticket.opened.v1", {}),
            ("ticket.first_responded.v1", {"first_response_time": ts(created + dt.timedelta(minutes=20))}),
            ("ticket.resolved.v1", {"resolve_time": ts(created + dt.timedelta(hours=3)), "sla_resolution_met": True}),
            ("ticket.closed.v1", {"close_time": ts(created + dt.timedelta(hours=5))}),
        ]
        acc = {}
        for v, (key, change) in enumerate(steps, 1):
            acc.update(change)
            msg = sev.TicketEvent(**base, **acc, version=v, exchange_count=v)
            out.append(
                new_event(domain="support", source_service="support-svc", routing_key=key, subject=name, message=msg)
            )
        survey = sev.SurveyEvent(survey=f"surveys/{i}", ticket=name, agent=base["assignee"], team=base["team"],
                                 kind="csat", csat=1 + i % 5, customer=base["customer"], answer_time=ts(created + dt.timedelta(hours=6)))  # fmt: skip
        out.append(new_event(domain="support", source_service="support-svc", routing_key="survey.answered.v1",
                             subject=survey.survey, message=survey))  # fmt: skip
        c = customer_pb2.Customer(name=f"customers/{i}", acquisition_source=("website", "referral", "")[i % 3],
                                  create_time=ts(created), etag='"1"')  # fmt: skip
        out.append(new_event(domain="customer", source_service="customer-svc", routing_key="customer.created.v1",
                             subject=c.name, message=customer_events_pb2.CustomerCreated(customer=c)))  # fmt: skip
        if i % 10 == 0:
            c.etag, c.acquisition_source = '"2"', "exhibition"
            out.append(new_event(domain="customer", source_service="customer-svc", routing_key="customer.updated.v1",
                                 subject=c.name, message=customer_events_pb2.CustomerUpdated(customer=c)))  # fmt: skip
        i += 1
    return out[:n]


def publish(url: str, evs: list) -> float:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.confirm_delivery()
    t0 = time.perf_counter()
    for e in evs:
        ch.basic_publish(e.exchange, e.routing_key, e.data, e.amqp_properties())
    conn.close()
    return len(evs) / (time.perf_counter() - t0)


def raw_consume(url: str, queue: str, n: int) -> float:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.basic_qos(prefetch_count=100)
    got, t0 = 0, time.perf_counter()
    for method, _p, _b in ch.consume(queue, inactivity_timeout=5):
        if method is None:
            break
        ch.basic_ack(method.delivery_tag)
        got += 1
        if got >= n:
            break
    rate = got / (time.perf_counter() - t0)
    ch.cancel()
    conn.close()
    return rate


def raw_stream_read(url: str, n: int) -> float:
    """The rebuild's baseline: a plain pika consumer reading crm.events.log from its first
    offset (prefetch 1000, one multiple ack per 500), nothing else done with the messages."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.basic_qos(prefetch_count=1000)
    got, t0 = 0, time.perf_counter()
    for method, _p, _b in ch.consume(EVENT_LOG_STREAM, inactivity_timeout=5, arguments={"x-stream-offset": "first"}):
        if method is None:
            break
        got += 1
        if got % 500 == 0 or got >= n:
            ch.basic_ack(method.delivery_tag, multiple=True)
        if got >= n:
            break
    rate = got / (time.perf_counter() - t0)
    ch.cancel()
    conn.close()
    return rate


def split_live(db: str, amqp_url: str, limit: int) -> int:
    """Events/s of one `python -m reporting_svc consume` process per producer of the bench's
    events (CONSUMER_DOMAINS=support, =customer), timed from the first applied event to the
    last (the processes' start, imports included, is not theirs to pay per event)."""
    from bench.__main__ import start_role
    from crm_chassis.db import create_engine, migrate

    migrate(db, SPEC.migrations)
    engine = create_engine(db, pool_size=1)
    procs = [  # the delivery limit the queues were declared with above
        start_role(
            "reporting-svc",
            "reporting_svc",
            "consume",
            db,
            amqp_url,
            CONSUMER_DELIVERY_LIMIT=str(limit),
            CONSUMER_DOMAINS=d,
        )  # fmt: skip
        for d in ("customer", "support")
    ]
    count = sa.text("SELECT coalesce(sum(applied_events), 0) FROM projection_sources")
    try:
        with engine.connect() as c:
            first = int(wait_for(lambda: c.execute(count).scalar() or None, 120, "the first applied event"))
            t0 = time.perf_counter()
            wait_for(lambda: c.execute(count).scalar() >= N, 600, "the live projection (one process per producer)")
            return round((N - first) / (time.perf_counter() - t0))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
        engine.dispose()


def main() -> None:
    dbs, broker = Databases(), Broker()
    out: dict = {"events": N, "host": platform.node(), "python": platform.python_version(), "consumer_threads": THREADS}
    try:
        evs = events(N)
        db = dbs.fresh("rep_bench")
        limit = service_settings(SPEC.name, db, broker.url).consumer_delivery_limit  # as the consumer declares it
        conn = pika.BlockingConnection(pika.URLParameters(broker.url))
        ch = conn.channel()
        ch.queue_declare("bench.raw", durable=True, arguments={"x-queue-type": "quorum"})
        for p in PROJECTIONS():
            declare_producer(ch, p.domain)
            ch.queue_bind("bench.raw", exchange_for(p.domain), "#")
            declare_consumer_queue(ch, "reporting-svc", p.domain, list(p.handlers), limit)
        conn.close()
        out["publish_per_s"] = round(publish(broker.url, evs))
        out["raw_consume_per_s"] = round(raw_consume(broker.url, "bench.raw", N))

        if SPLIT:
            out["live_per_s"] = split_live(db, broker.url, limit)
            out["live_mode"] = "one consume process per producer"
        # CONSUMER_THREADS (the chassis setting: competing consumers in the process), 1 unless set
        svc = start_service(SPEC, db, broker.url, env={"CONSUMER_THREADS": THREADS})
        t0 = time.perf_counter()

        def applied():
            with svc.ctx.engine.connect() as c:
                return c.execute(sa.text("SELECT coalesce(sum(applied_events), 0) FROM projection_sources")).scalar()

        wait_for(lambda: applied() >= N, 600, "the live projection")
        if not SPLIT:
            out["live_per_s"] = round(N / (time.perf_counter() - t0))
        out["live_over_raw"] = round(out["live_per_s"] / out["raw_consume_per_s"], 2)
        out["raw_stream_read_per_s"] = round(raw_stream_read(broker.url, N))
        with channel(svc) as gch:
            stub = rsg.ReportingServiceStub(gch)
            t0 = time.perf_counter()
            job = stub.RebuildProjections(rs.RebuildProjectionsRequest(), metadata=md())

            def done():
                j = stub.GetProjectionRebuild(rs.GetProjectionRebuildRequest(name=job.name), metadata=md())
                return j if j.state in ("succeeded", "failed", "cancelled") else None

            j = wait_for(done, 600, "the rebuild")
            out["rebuild_state"] = j.state
            out["rebuild_per_s"] = round(j.processed_events / (time.perf_counter() - t0))
            out["rebuild_over_raw_stream"] = round(out["rebuild_per_s"] / out["raw_stream_read_per_s"], 2)
            calls = {
                "support day x agent (jalali)": lambda: stub.GetSupportReport(
                    rs.GetSupportReportRequest(period="day", calendar="jalali", dimensions=["agent"]), metadata=md()
                ),
                "support month": lambda: stub.GetSupportReport(
                    rs.GetSupportReportRequest(period="month"), metadata=md()
                ),
                "acquisition jalali month": lambda: stub.GetAcquisitionReport(
                    rs.GetAcquisitionReportRequest(period="month", calendar="jalali"), metadata=md()
                ),
                "customer 360 first page (50)": lambda: stub.GetCustomerTimeline(
                    rs.GetCustomerTimelineRequest(customer="customers/7"), metadata=md()
                ),
            }
            rows = []
            for name, call in calls.items():
                times = []
                for _ in range(CALLS):
                    t = time.perf_counter()
                    call()
                    times.append((time.perf_counter() - t) * 1000)
                rows.append({"report": name, "p50_ms": round(pct(times, 50), 1), "p95_ms": round(pct(times, 95), 1)})
            out["reports"] = rows
        svc.stop(0)
    finally:
        broker.close()
        dbs.drop_all()
    text = "\n".join(
        [
            f"reporting-svc bench: {N} events",
            table(
                [{"figure": k, "value": v} for k, v in out.items() if k != "reports"],
                ["figure", "value"],
            ),
            "",
            table(out.get("reports", []), ["report", "p50_ms", "p95_ms"]),
        ]
    )
    print(text)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    results = ROOT / "bench" / "results"
    (results / f"reporting-{stamp}.txt").write_text(text + "\n")
    (results / f"reporting-{stamp}.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
