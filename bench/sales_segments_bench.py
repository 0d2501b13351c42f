"""reporting-svc, report 2 (sales by segment): live projection, rebuild and report latency:
`python -m bench.sales_segments_bench`.

On a fresh database and a private vhost (so the event log holds only these events):

1. BENCH_SALES_CUSTOMERS customers (customer.created with birth date, gender, province, city,
   type; a tenth updated to another city), a lead naming 60% of them, and BENCH_SALES_ORDERS
   orders over a year (1-3 lines of 60 products in 8 product lines; 5% cancelled afterwards),
   published shuffled (orders before their customers as often as not) to customer-svc's and
   sales-svc's exchanges, with this service's queues and a raw queue bound beforehand.
2. raw: a plain pika consumer (prefetch 100, ack per message) drains the raw queue: msg/s, the
   baseline of the same run.
3. live: reporting-svc (every projection: these events also feed the timeline, the acquisition
   and campaign parts) starts and applies its queues: events/s until the inbox has them all.
4. rebuild: RebuildProjections replays crm.events.log into shadow tables and swaps: events/s.
5. GetSalesReport in several shapes, BENCH_REPORT_CALLS times each: p50/p95 ms.

Results: bench/results/sales-segments-<stamp>.txt/.json.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import random
import time

import pika
import sqlalchemy as sa
from google.protobuf import timestamp_pb2

import reporting_svc
import reporting_svc.__main__ as main_module
from bench.load import pct, table
from bench.reporting_bench import publish, raw_consume
from crm.customer.v1 import customer_events_pb2, customer_pb2
from crm.reporting.v1 import reporting_service_pb2 as rs
from crm.reporting.v1 import reporting_service_pb2_grpc as rsg
from crm.reporting.v1 import sales_report_pb2 as sp
from crm.sales.v1 import sales_events_pb2 as sales
from crm.type.v1 import date_pb2, money_pb2
from crm_chassis.messaging.envelope import new_event
from crm_chassis.messaging.topology import declare_consumer_queue, declare_producer, exchange_for
from crm_chassis.parts import parts_spec
from reporting_svc import PROJECTIONS, segments
from reporting_svc.__main__ import PARTS, SPEC
from tests.support.harness import ROOT, Broker, Databases, channel, md, service_settings, start_service, wait_for

CUSTOMERS = int(os.environ.get("BENCH_SALES_CUSTOMERS", "2000"))
ORDERS = int(os.environ.get("BENCH_SALES_ORDERS", "20000"))
CALLS = int(os.environ.get("BENCH_REPORT_CALLS", "30"))
T0 = dt.datetime(2025, 11, 1, 6, 0, tzinfo=dt.UTC)
PLACES = [("Tehran", "Tehran"), ("Tehran", "Shemiranat"), ("Isfahan", "Isfahan"), ("Isfahan", "Kashan"),
          ("Fars", "Shiraz"), ("Razavi Khorasan", "Mashhad"), ("East Azerbaijan", "Tabriz"), ("Gilan", "Rasht"),
          ("Khuzestan", "Ahvaz"), ("Alborz", "Karaj")]  # fmt: skip


def ts(t: dt.datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(t)
    return out


def events(rng: random.Random) -> list:
    out = []
    for i in range(CUSTOMERS):
        province, city = rng.choice(PLACES)
        person = rng.random() < 0.9
        c = customer_pb2.Customer(
            name=f"customers/{i}", etag='"1"', province=province, city=city, create_time=ts(T0),
            type=customer_pb2.CUSTOMER_TYPE_PERSON if person else customer_pb2.CUSTOMER_TYPE_ORGANIZATION,
            gender=rng.choice((customer_pb2.GENDER_FEMALE, customer_pb2.GENDER_MALE)) if person else 0,
        )  # fmt: skip
        if person:
            c.birth_date.CopyFrom(date_pb2.Date(year=rng.randint(1950, 2008), month=rng.randint(1, 12), day=1))
        out.append(new_event(domain="customer", source_service="customer-svc", routing_key="customer.created.v1",
                             subject=c.name, message=customer_events_pb2.CustomerCreated(customer=c)))  # fmt: skip
        if i % 10 == 0:
            c.etag, c.city = '"2"', rng.choice(PLACES)[1]
            out.append(new_event(domain="customer", source_service="customer-svc", routing_key="customer.updated.v1",
                                 subject=c.name, message=customer_events_pb2.CustomerUpdated(customer=c)))  # fmt: skip
        if rng.random() < 0.6:
            lead = sales.LeadEvent(lead=f"leads/{i}", status="converted", customer=c.name, version=2,
                                   create_time=ts(T0 - dt.timedelta(days=rng.randint(0, 200))))  # fmt: skip
            out.append(new_event(domain="sales", source_service="sales-svc", routing_key="lead.converted.v1",
                                 subject=lead.lead, message=lead))  # fmt: skip
    for n in range(ORDERS):
        day = (T0 + dt.timedelta(days=rng.randint(0, 364))).date()
        lines = []
        for _ in range(rng.randint(1, 3)):
            p = rng.randint(0, 59)
            lines.append(sales.LineFact(product=f"products/{p}", product_line=f"productLines/{p % 8}",
                                        quantity=str(rng.randint(1, 5)),
                                        amount=money_pb2.Money(currency_code="IRR", units=rng.randint(1, 500) * 10_000)))  # fmt: skip
        o = sales.OrderEvent(order=f"orders/{n}", customer=f"customers/{rng.randrange(CUSTOMERS)}", state="open",
                             lines=lines, order_date=date_pb2.Date(year=day.year, month=day.month, day=day.day),
                             event_time=ts(dt.datetime.combine(day, dt.time(8), tzinfo=dt.UTC)))  # fmt: skip
        out.append(new_event(domain="sales", source_service="sales-svc", routing_key="order.placed.v1",
                             subject=o.order, message=o))  # fmt: skip
        if n % 20 == 0:
            o.state, o.event_time.seconds = "cancelled", o.event_time.seconds + 86400
            out.append(new_event(domain="sales", source_service="sales-svc", routing_key="order.cancelled.v1",
                                 subject=o.order, message=o))  # fmt: skip
    rng.shuffle(out)
    return out


def run(evs: list, spec, projections) -> dict:
    """One service over the events: raw, live, rebuild and report figures."""
    dbs, broker = Databases(), Broker()
    n = len(evs)
    out: dict = {}
    svc = None
    try:
        db = dbs.fresh("rep_sales_bench")
        limit = service_settings(SPEC.name, db, broker.url).consumer_delivery_limit
        conn = pika.BlockingConnection(pika.URLParameters(broker.url))
        ch = conn.channel()
        ch.queue_declare("bench.raw", durable=True, arguments={"x-queue-type": "quorum"})
        domains: dict[str, set] = {}
        for p in projections():
            domains.setdefault(p.domain, set()).update(p.handlers)
        for domain, keys in domains.items():
            declare_producer(ch, domain)
            declare_consumer_queue(ch, "reporting-svc", domain, sorted(keys), limit)
        for domain in ("customer", "sales"):
            ch.queue_bind("bench.raw", exchange_for(domain), "#")
        conn.close()
        out["publish_per_s"] = round(publish(broker.url, evs))
        out["raw_consume_per_s"] = round(raw_consume(broker.url, "bench.raw", n))

        svc = start_service(spec, db, broker.url)
        t0 = time.perf_counter()

        def handled():
            with svc.ctx.engine.connect() as c:
                return c.execute(sa.text("SELECT count(DISTINCT event_id) FROM inbox")).scalar()

        wait_for(lambda: handled() >= n, 1200, "the live projection")
        out["live_per_s"] = round(n / (time.perf_counter() - t0))
        out["live_over_raw"] = round(out["live_per_s"] / out["raw_consume_per_s"], 2)
        with svc.ctx.engine.connect() as c:
            for t in ("sales_order_facts", "sales_daily", "sales_buyers_daily", "lead_purchase_daily") * (spec is SPEC):
                out[f"rows_{t}"] = c.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar()
        with channel(svc) as gch:
            stub = rsg.ReportingServiceStub(gch)
            t0 = time.perf_counter()
            job = stub.RebuildProjections(rs.RebuildProjectionsRequest(), metadata=md())

            def done():
                j = stub.GetProjectionRebuild(rs.GetProjectionRebuildRequest(name=job.name), metadata=md())
                return j if j.state in ("succeeded", "failed", "cancelled") else None

            j = wait_for(done, 1200, "the rebuild")
            out["rebuild_state"] = j.state
            if j.error:
                out["rebuild_error"] = j.error[:200]
            out["rebuild_per_s"] = round(j.processed_events / (time.perf_counter() - t0))
            if spec is SPEC:
                out["reports"] = reports(stub)
        svc.stop(0)
    finally:
        broker.close()
        dbs.drop_all()
    return out


def reports(stub) -> list[dict]:
    shapes = {
        "all (total, lead to purchase)": {},
        "jalali month x city": {"period": "month", "calendar": "jalali", "dimensions": ["city"]},
        "jalali month x product": {"period": "month", "calendar": "jalali", "dimensions": ["product"]},
        "day x age band x gender": {"period": "day", "dimensions": ["age_band", "gender"]},
        "week x product line x kind": {"period": "week", "dimensions": ["product_line", "customer_kind"]},
    }
    rows = []
    for name, kw in shapes.items():
        req = sp.GetSalesReportRequest(**kw)
        times = []
        for _ in range(CALLS):
            t = time.perf_counter()
            resp = stub.GetSalesReport(req, metadata=md())
            times.append((time.perf_counter() - t) * 1000)
        rows.append({"report": name, "rows": len(resp.rows), "p50_ms": round(pct(times, 50), 1),
                     "p95_ms": round(pct(times, 95), 1)})  # fmt: skip
    return rows


def main() -> None:
    """With BENCH_SALES_BASELINE=1, first the same events through the service without report 2's
    projection (the baseline of what it adds), then with it."""
    evs = events(random.Random(2026))
    n = len(evs)
    out: dict = {"events": n, "customers": CUSTOMERS, "orders": ORDERS, "host": platform.node(),
                 "python": platform.python_version()}  # fmt: skip
    if os.environ.get("BENCH_SALES_BASELINE"):
        spec = parts_spec("reporting-svc", 50055, main_module.__file__, None, [p for p in PARTS if p is not segments])
        without = [p for p in PROJECTIONS() if p not in segments.PROJECTIONS]
        original = reporting_svc.PROJECTIONS
        reporting_svc.PROJECTIONS = lambda: without  # the rebuild job reads it
        try:
            out["without_report_2"] = run(evs, spec, lambda: without)
        finally:
            reporting_svc.PROJECTIONS = original
    out.update(run(evs, SPEC, PROJECTIONS))
    base = out.pop("without_report_2", None)
    if base:
        for k in ("raw_consume_per_s", "live_per_s", "live_over_raw", "rebuild_per_s", "rebuild_state"):
            out[f"without report 2: {k}"] = base.get(k)
    text = "\n".join(
        [
            f"reporting-svc sales-by-segment bench: {n} events",
            table([{"figure": k, "value": v} for k, v in out.items() if k != "reports"], ["figure", "value"]),
            "",
            table(out.get("reports", []), ["report", "rows", "p50_ms", "p95_ms"]),
        ]
    )
    print(text)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    results = ROOT / "bench" / "results"
    (results / f"sales-segments-{stamp}.txt").write_text(text + "\n")
    (results / f"sales-segments-{stamp}.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
