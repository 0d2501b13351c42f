"""Loyalty points accrual through campaign-svc's consumer: `python -m bench.campaign_points_bench`.

A fresh campaign database migrated to head; campaign-svc runs as its own process (`python -m
campaign_svc serve`: gRPC, relay, consumer, timers) long enough to declare its queues and get
one programme (CreateProgram over gRPC: 1 point per 10,000 IRR, a product rule, a bonus
period, two tiers, points expiring after 12 months), then stops. BENCH_POINTS_EVENTS
invoice.paid.v1 events (three lines each, BENCH_POINTS_CUSTOMERS customers) are published
with confirms to crm.sales.events, where they fill both the service's sales queue and a
baseline quorum queue bound the same way. Then, in the same run:

1. baseline: a plain pika consumer (BlockingConnection, prefetch as the service's, one ack per
   message) drains the baseline queue: messages/s;
2. the chassis' EventConsumer with a no-op handler drains a third queue filled the same way,
   in batches of CONSUMER_BATCH deliveries per transaction (the service's setting): the
   ceiling of the consumer itself;
3. the service starts again and its consumer drains its queue: the deliveries that arrive
   together in one transaction with their inbox rows, the audience projection's batch handler
   (facts per event, behaviour recomputed once per customer, the segments hook once) and the
   loyalty batch handler (earn_batch: members, movements, expiry timers, tiers,
   points.earned.v1 and tier.changed.v1 by COPY). Accrual events/s is measured on the database clock, from
   the first earn movement's transaction to the last (record_time), and beside it the wall
   time from the service's start.
3b. the same again (the ledger, outbox, inbox, facts and timers emptied, N new events) with the
   service's consumer and outbox relay in processes of their own (`python -m campaign_svc
   consume` and `relay`, the chassis' single-role commands): the relay's publishing off the
   consumer's GIL.
3c. the same with BENCH_POINTS_CONSUMERS (2) competing `consume` processes on the one queue (and a
   relay), BENCH_POINTS_REPEATS (0.02) of the invoices published again under a new event id and
   as many events published twice: after it the ledger is checked exactly (one earning per
   invoice and per event id: the unique keys held; every balance the sum of the member's
   movements and of its lots; each movement's balance the running sum; one expiry timer per
   member at its soonest lot; failed and deadlocked batches counted in the processes' logs).
   3b and 3c give the consume processes' CPU per event (/proc, a process's own start taken off).

4. the loyalty accrual alone, in this process (earn_batch on BENCH_POINTS_IN_PROCESS new events
   with their inbox rows, no broker, no audience handler), one event per transaction and
   BENCH_POINTS_BATCH per transaction: what a consumer applying batches of deliveries would
   reach without the broker and the audience.

Goal (issue #11): accrual events/s >= 0.5 of the raw pika consume rate. Afterwards the ledger
is checked (every member's balance is the sum of its movements; N earn movements).
Settings: BENCH_POINTS_EVENTS (5000), BENCH_POINTS_CUSTOMERS (1000), CONSUMER_BATCH and
CONSUMER_PREFETCH (the service's: the chassis' defaults unless set),
BENCH_POINTS_IN_PROCESS (2000), BENCH_POINTS_BATCH (100), BENCH_POINTS_CONSUMERS (2),
BENCH_POINTS_REPEATS (0.02).
Results: bench/results/campaign-points-<stamp>.txt/.json.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import platform
import subprocess
import sys
import time
import uuid

import grpc
import pika
import sqlalchemy as sa

from bench.__main__ import start_role as bench_role
from bench.__main__ import start_service_process
from campaign_svc.__main__ import SPEC
from crm.campaign.v1 import loyalty_pb2 as pb
from crm.campaign.v1 import loyalty_pb2_grpc
from crm.sales.v1 import sales_events_pb2 as se
from crm.type.v1 import money_pb2
from crm_chassis.config import DEFAULT_JWT_SECRET, load_settings
from crm_chassis.db import create_engine, migrate
from crm_chassis.messaging.consumer import _INBOX_MANY, EventConsumer, Subscription
from crm_chassis.messaging.envelope import new_event
from crm_chassis.messaging.topology import declare_consumer_queue, declare_producer, exchange_for, queue_name
from tests.support.harness import ROOT, Broker, Databases, md, start_service, stop_process

N = int(os.environ.get("BENCH_POINTS_EVENTS", "5000"))
CUSTOMERS = int(os.environ.get("BENCH_POINTS_CUSTOMERS", "1000"))
# the service's own settings (CONSUMER_BATCH, CONSUMER_PREFETCH or the chassis' defaults), used
# by the baseline and the no-op consumer too
_SETTINGS = load_settings(
    "campaign-svc",
    1,
    env={**os.environ, "DATABASE_URL": "postgresql://bench@localhost/bench", "JWT_SECRET": DEFAULT_JWT_SECRET},
)
CONSUMER_BATCH = _SETTINGS.consumer_batch
PREFETCH = _SETTINGS.consumer_prefetch
RESULTS = ROOT / "bench" / "results"
GOAL = 0.5
IN_PROCESS = int(os.environ.get("BENCH_POINTS_IN_PROCESS", "2000"))
BATCH = int(os.environ.get("BENCH_POINTS_BATCH", "100"))
CONSUMERS = int(os.environ.get("BENCH_POINTS_CONSUMERS", "2"))
REPEATS = float(os.environ.get("BENCH_POINTS_REPEATS", "0.02"))
BASELINE_QUEUE = "bench.points.raw"
NOOP = "bench-noop"  # the chassis consumer with a no-op handler, on its own queue
OUT = io.StringIO()


def say(msg: str = "") -> None:
    print(msg, flush=True)
    OUT.write(msg + "\n")


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def irr(units: int) -> money_pb2.Money:
    return money_pb2.Money(currency_code="IRR", units=units)


def create_program(port: int) -> str:
    now = dt.datetime.now(dt.UTC)
    bonus = pb.BonusPeriod(display_name="bench", multiplier="1.5")
    bonus.start_time.FromDatetime(now - dt.timedelta(days=1))
    bonus.end_time.FromDatetime(now + dt.timedelta(days=1))
    prog = pb.Program(
        display_name="باشگاه مشتریان",
        currency_code="IRR",
        earn_amount=irr(10_000),
        earn_points=1,
        product_rules=[pb.ProductRule(product="products/p2", multiplier="2")],
        bonus_periods=[bonus],
        lifetime_unit=pb.LIFETIME_UNIT_MONTHS,
        lifetime_count=12,
        tiers=[
            pb.Tier(key="silver", threshold_points=500),
            pb.Tier(key="gold", threshold_points=5000, multiplier="1.2"),
        ],
        tier_period=pb.TIER_PERIOD_JALALI_YEAR,
        downgrade=pb.DOWNGRADE_PERIOD_END,
    )
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = loyalty_pb2_grpc.LoyaltyServiceStub(ch)
        return stub.CreateProgram(pb.CreateProgramRequest(program=prog), metadata=md("admin", "bench"), timeout=10).name


def invoice_events(n: int) -> list:
    customers = [str(uuid.uuid4()) for _ in range(CUSTOMERS)]
    out = []
    now = dt.datetime.now(dt.UTC)
    for i in range(n):
        iid = str(uuid.uuid4())
        e = se.InvoiceEvent(
            invoice=f"invoices/{iid}",
            number=f"1405-{i:06d}",
            kind="invoice",
            customer=f"customers/{customers[i % CUSTOMERS]}",
            total=irr(2_180_000),
            tax_total=irr(180_000),
            paid_total=irr(2_180_000),
            state="paid",
        )
        e.lines.add(product="products/p1", quantity="1", amount=irr(1_000_000))
        e.lines.add(product="products/p2", quantity="2", amount=irr(600_000))
        e.lines.add(product="products/p3", quantity="1", amount=irr(400_000))
        e.event_time.FromDatetime(now)
        out.append(
            new_event(
                domain="sales",
                source_service="sales-svc",
                routing_key="invoice.paid.v1",
                subject=f"invoices/{iid}",
                message=e,
            )
        )
    return out


def publish(url: str, evs: list, baseline: bool = True) -> float:
    """Publish with confirms; `baseline`: the baseline's and the no-op consumer's queues are
    declared first, so they get the messages too."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    declare_producer(ch, "sales")
    if baseline:
        ch.queue_declare(queue=BASELINE_QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
        ch.queue_bind(queue=BASELINE_QUEUE, exchange=exchange_for("sales"), routing_key="invoice.paid.v1")
        declare_consumer_queue(ch, NOOP, "sales", ["invoice.paid.v1"], 5)
    ch.confirm_delivery()
    t0 = time.perf_counter()
    for e in evs:
        ch.basic_publish(e.exchange, e.routing_key, e.data, e.amqp_properties())
    rate = len(evs) / (time.perf_counter() - t0)
    conn.close()
    return rate


def depth(url: str, queue: str) -> int:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    n = conn.channel().queue_declare(queue=queue, passive=True).method.message_count
    conn.close()
    return n


def raw_consume(url: str, n: int) -> float:
    """Messages/s of a plain pika consumer draining the baseline queue, one ack per message."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.basic_qos(prefetch_count=PREFETCH)
    state = {"n": 0, "t0": None}

    def on_message(channel, method, properties, body):
        if state["t0"] is None:
            state["t0"] = time.perf_counter()
        state["n"] += 1
        channel.basic_ack(method.delivery_tag)
        if state["n"] >= n:
            channel.stop_consuming()

    ch.basic_consume(BASELINE_QUEUE, on_message)
    ch.start_consuming()
    elapsed = time.perf_counter() - state["t0"]
    conn.close()
    return (n - 1) / elapsed if n > 1 else float(n)


def noop_consume(engine, url: str, n: int) -> float:
    """Events/s of the chassis' EventConsumer with a handler that does nothing (the inbox rows
    and the commit of each transaction), in batches as the service's consumer makes them
    (CONSUMER_BATCH): the ceiling of the consumer itself."""
    sub = Subscription(domain="sales", handlers={"invoice.paid.v1": lambda conn, event: None})
    consumer = EventConsumer(engine, url, NOOP, [sub], prefetch=PREFETCH, batch_size=CONSUMER_BATCH)
    consumer.start()
    try:
        deadline = time.monotonic() + 120
        while consumer.processed < n and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        consumer.stop()
    with engine.connect() as conn:
        first, last, done = conn.execute(
            sa.text("SELECT min(processed_at), max(processed_at), count(*) FROM inbox WHERE consumer = :c"), {"c": NOOP}
        ).one()
    span = (last - first).total_seconds()
    return (done - 1) / span if span > 0 else float("inf")


def in_process(url: str, amqp_url: str, n: int, batch: int) -> float:
    """Events/s of the loyalty accrual alone (earn_batch) in this process, `batch` events per
    transaction with their inbox rows, as a consumer applying a batch of deliveries would:
    no broker, no audience handler."""
    from campaign_svc import loyalty

    svc = start_service(SPEC, url, amqp_url, relay=False, consumers=False)
    try:
        lo = loyalty.engine(svc.ctx.shared["runtime"])
        evs = invoice_events(n)
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            chunk = evs[i : i + batch]
            with svc.ctx.engine.begin() as conn:
                conn.execute(  # the consumer's own inbox statement
                    _INBOX_MANY,
                    {"c": f"{NOOP}-{batch}", "ids": [e.id for e in chunk], "types": [e.type for e in chunk]},
                ).all()
                lo.earn_batch(conn, chunk)
        return n / (time.perf_counter() - t0)
    finally:
        svc.stop(0)


def start_role(command: str, url: str, amqp_url: str, log) -> subprocess.Popen:
    """campaign-svc running one role only (`python -m campaign_svc consume` or `relay`: the
    chassis' single-role commands), its log appended to `log`."""
    return bench_role("campaign-svc", "campaign_svc", command, url, amqp_url, log)


def drain(engine, n: int, timeout: float = 300) -> tuple[float, float]:
    """Wait until n earn movements exist; (accrual events/s on the database clock from the first
    earn transaction to the last, wall seconds waited)."""
    t0 = time.perf_counter()
    earn = sa.text("SELECT count(*) FROM loyalty_movements WHERE kind = 'earn'")
    deadline = time.monotonic() + timeout
    with engine.connect() as conn:
        while conn.execute(earn).scalar_one() < n:
            if time.monotonic() > deadline:
                raise SystemExit(f"the service did not accrue every event in {timeout:.0f} s")
            time.sleep(0.2)
        first, last = conn.execute(
            sa.text("SELECT min(record_time), max(record_time) FROM loyalty_movements WHERE kind = 'earn'")
        ).one()
    span = (last - first).total_seconds()
    return ((n - 1) / span if span > 0 else float("inf")), time.perf_counter() - t0


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of a process so far (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_LEDGER = sa.text(
    """SELECT (SELECT count(*) FROM loyalty_movements WHERE kind = 'earn'),
              (SELECT count(DISTINCT (program_id, invoice_id)) FROM loyalty_movements WHERE kind = 'earn'),
              (SELECT count(DISTINCT (program_id, source_event_id)) FROM loyalty_movements WHERE kind = 'earn'),
              (SELECT count(*) FROM loyalty_members),
              (SELECT count(*) FROM loyalty_members mb WHERE mb.balance <>
                 (SELECT coalesce(sum(points), 0) FROM loyalty_movements l WHERE l.member_id = mb.id)
                 OR mb.balance <> (SELECT coalesce(sum(remaining), 0) FROM loyalty_movements l WHERE l.member_id = mb.id)
                 OR mb.earned <> (SELECT coalesce(sum(points), 0) FROM loyalty_movements l WHERE l.member_id = mb.id)),
              (SELECT count(*) FROM loyalty_movements l WHERE l.kind = 'earn' AND l.balance <>
                 (SELECT sum(points) FROM loyalty_movements p WHERE p.member_id = l.member_id AND p.id <= l.id)),
              (SELECT count(*) FROM outbox WHERE routing_key = 'points.earned.v1'),
              (SELECT count(*) FROM timers WHERE kind = 'loyalty.expire'),
              (SELECT count(*) FROM loyalty_members mb WHERE NOT EXISTS
                 (SELECT FROM timers t WHERE t.kind = 'loyalty.expire' AND t.key = mb.id::text AND t.due_at =
                    (SELECT min(expire_time) FROM loyalty_movements l WHERE l.member_id = mb.id AND l.remaining > 0)))"""
)


def startup_cpu(url: str, amqp_url: str, log) -> float:
    """CPU seconds a `consume` process spends starting (imports, connections) on an empty
    queue: once its CPU stops growing for a second (at most 30 s)."""
    proc = start_role("consume", url, amqp_url, log)
    try:
        last, deadline = -1.0, time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(1.0)
            now = cpu_seconds(proc.pid)
            if now - last < 0.02:
                return now
            last = now
        return last
    finally:
        stop_process(proc)


def run_split(engine, url: str, amqp_url: str, log, consumers: int, raw: float, repeats: float) -> dict:
    """Stages 3b and 3c: the ledger, outbox, inbox, facts and timers emptied, N new events
    published (with `repeats`: that share of the invoices published again under a new event id,
    the same share of the events published twice as they are), a relay and `consumers`
    `python -m campaign_svc consume` processes draining the one queue; then the ledger checked
    exactly: one earning per invoice and event (the unique keys), every balance the sum of the
    member's movements and of its lots, each movement's balance the running sum, one expiry
    timer per member at its soonest lot, failed (and deadlocked) batches from the logs."""
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE loyalty_movements, loyalty_members, outbox, inbox, audience_invoices, timers"))
    evs = invoice_events(N)
    extra = []
    if repeats:
        step = max(1, round(1 / repeats))
        for e in evs[::step]:  # the same invoice under a new event id (a producer's retry)
            extra.append(new_event(domain="sales", source_service="sales-svc", routing_key=e.routing_key,
                                   subject=e.subject, message=e.parse(se.InvoiceEvent)))  # fmt: skip
        extra += evs[step // 2 :: step]  # the same event twice (a redelivery)
    published = evs + extra
    idle = startup_cpu(url, amqp_url, log)  # a consume process's own start, taken off its CPU below
    rate = publish(amqp_url, published, baseline=False)
    start = log.stat().st_size if log.exists() else 0
    roles = [start_role("relay", url, amqp_url, log)] + [
        start_role("consume", url, amqp_url, log) for _ in range(consumers)
    ]
    cpu = 0.0
    try:
        accrual, wall = drain(engine, N)
        ids = N + (len(extra) // 2 if repeats else 0)  # the event ids: the re-published ones are new
        inbox = sa.text("SELECT count(*) FROM inbox WHERE consumer = 'campaign-svc'")
        deadline = time.monotonic() + 60
        with engine.connect() as conn:  # the repeats (they earn nothing) applied too
            while conn.execute(inbox).scalar_one() < ids and time.monotonic() < deadline:
                time.sleep(0.2)
        time.sleep(0.5)
        cpu = sum(cpu_seconds(p.pid) for p in roles[1:]) - consumers * idle
    finally:
        for p in roles:
            stop_process(p)
    with engine.connect() as conn:
        (earns, invoices, event_ids, members, mismatched, running, earned_events, expiry,
         timer_off) = conn.execute(_LEDGER).one()  # fmt: skip
    text = log.read_bytes()[start:].decode(errors="replace")
    failed, deadlocks = text.count("a batch of events failed"), text.count("deadlock detected")
    exact = earns == invoices == event_ids == N and mismatched == running == timer_off == 0 and earned_events == N
    say(
        f"  published {len(published)} ({N} invoices, {len(extra)} repeats) at {rate:,.0f}/s; all accrued {wall:.1f} s after the processes' start"
    )
    say(
        f"  accrual {accrual:,.0f} events/s; ratio to the raw pika consume: {accrual / raw:.2f} (goal >= {GOAL})  "
        f"{'MET' if accrual / raw >= GOAL else 'NOT MET'}; consumers' CPU {1e6 * cpu / N:,.0f} us/event"
    )
    say(
        f"  ledger: {earns} earnings of {invoices} invoices and {event_ids} event ids (expected {N} each), {members} members, "
        f"{mismatched} with a balance that is not the sum of their movements or lots, {running} movements whose "
        f"balance is not the running sum, {earned_events} points.earned.v1, {expiry} expiry timers "
        f"({timer_off} members without one at their soonest lot); batches failed {failed}, deadlocks {deadlocks}  "
        f"{'EXACT' if exact else 'NOT EXACT'}"
    )  # fmt: skip
    return {"consumers": consumers, "published": len(published), "accrual_per_s": round(accrual),
            "ratio": round(accrual / raw, 3), "consumer_cpu_us_per_event": round(1e6 * cpu / N),
            "earns": earns, "invoices": invoices, "event_ids": event_ids, "members": members,
            "balance_mismatches": mismatched, "running_balance_mismatches": running,
            "points_earned_events": earned_events, "expiry_timers": expiry, "members_without_timer": timer_off,
            "failed_batches": failed, "deadlocks": deadlocks, "exact": exact}  # fmt: skip


def main() -> int:
    say(f"# campaign-svc loyalty accrual ({dt.datetime.now():%Y-%m-%d %H:%M})")
    say(f"{platform.node()}, {os.cpu_count()} cores, python {platform.python_version()}; load average {loadavg()}")
    say(
        f"{N} invoice.paid.v1 events over {CUSTOMERS} customers, prefetch {PREFETCH}, consumer batches of {CONSUMER_BATCH}"
    )
    stamp = f"{dt.datetime.now():%Y%m%d-%H%M%S}"
    RESULTS.mkdir(exist_ok=True)
    out: dict = {"events": N, "customers": CUSTOMERS, "prefetch": PREFETCH, "loadavg_start": os.getloadavg()}
    dbs, broker = Databases(), Broker()
    proc = engine = None
    log = RESULTS / f"campaign-points-{stamp}-campaign-svc.log"
    try:
        url = dbs.fresh("bench_points")
        migrate(url, SPEC.migrations)
        engine = create_engine(url, pool_size=4)
        proc, port = start_service_process("campaign-svc", "campaign_svc", url, broker.url, log)
        program = create_program(port)
        time.sleep(1.0)  # the consumer has declared and bound its queues
        stop_process(proc)
        proc = None
        say(f"\n  programme {program}; the service stopped, its queues declared")

        evs = invoice_events(N)
        rate = publish(broker.url, evs)
        queue = queue_name("campaign-svc", "sales")
        say(
            f"  published {N} with confirms at {rate:,.0f}/s; {queue}: {depth(broker.url, queue)}, {BASELINE_QUEUE}: {depth(broker.url, BASELINE_QUEUE)}"
        )

        say("\n== 1. baseline: plain pika consume + ack of the same messages ==")
        raw = raw_consume(broker.url, N)
        say(f"  {raw:,.0f} messages/s")

        say(
            "\n== 2. the chassis' EventConsumer with a no-op handler (batches of CONSUMER_BATCH deliveries per transaction) =="
        )
        noop = noop_consume(engine, broker.url, N)
        say(f"  {noop:,.0f} events/s (ratio {noop / raw:.2f} to the raw consume)")

        say("\n== 3. campaign-svc's consumer: points accrual ==")
        t0 = time.perf_counter()
        proc, port = start_service_process("campaign-svc", "campaign_svc", url, broker.url, log)
        started = time.perf_counter() - t0
        earn = sa.text("SELECT count(*) FROM loyalty_movements WHERE kind = 'earn'")
        deadline = time.monotonic() + 300
        with engine.connect() as conn:
            while conn.execute(earn).scalar_one() < N:
                if time.monotonic() > deadline:
                    raise SystemExit("the service did not accrue every event in 300 s")
                time.sleep(0.2)
        wall = time.perf_counter() - t0
        with engine.connect() as conn:
            first, last = conn.execute(
                sa.text("SELECT min(record_time), max(record_time) FROM loyalty_movements WHERE kind = 'earn'")
            ).one()
            checks = conn.execute(
                sa.text(
                    """SELECT (SELECT count(*) FROM loyalty_members),
                              (SELECT count(*) FROM loyalty_members mb WHERE mb.balance <>
                                 (SELECT coalesce(sum(points), 0) FROM loyalty_movements l WHERE l.member_id = mb.id)),
                              (SELECT count(*) FROM loyalty_members WHERE tier <> ''),
                              (SELECT count(*) FROM outbox WHERE routing_key = 'points.earned.v1'),
                              (SELECT count(*) FROM timers WHERE kind = 'loyalty.expire')"""
                )
            ).one()
        span = (last - first).total_seconds()
        accrual = (N - 1) / span if span > 0 else float("inf")
        ratio = accrual / raw
        say(f"  service up in {started:.1f} s; all {N} accrued {wall:.1f} s after its start")
        say(f"  accrual {accrual:,.0f} events/s (first to last earn transaction, database clock)")
        say(f"  ratio to the raw pika consume: {ratio:.2f} (goal >= {GOAL})  {'MET' if ratio >= GOAL else 'NOT MET'}")
        say(
            f"  ledger: {checks[0]} members, {checks[1]} with a balance that is not the ledger sum, {checks[2]} in a tier; "
            f"{checks[3]} points.earned.v1 in the outbox, {checks[4]} expiry timers"
        )
        stop_process(proc)
        proc = None

        say("\n== 3b. the same with the consumer and the outbox relay in processes of their own ==")
        # the chassis' `consume` and `relay` commands (a relay-only Deployment beside the serving
        # one): the relay's publishing no longer shares the consumer's GIL. The database is the
        # same: its ledger emptied, the queue filled again with new events.
        split = run_split(engine, url, broker.url, log, 1, raw, repeats=0)
        out.update({f"split_{k}": v for k, v in split.items()})
        say(
            f"\n== 3c. {CONSUMERS} competing `consume` processes on the one queue (and a relay), "
            f"{REPEATS:.0%} of the invoices re-published under a new event id and {REPEATS:.0%} of the events delivered twice =="
        )
        competing = run_split(engine, url, broker.url, log, CONSUMERS, raw, repeats=REPEATS)
        out.update({f"competing_{k}": v for k, v in competing.items()})
        say(f"\n== 4. the loyalty accrual alone in-process (earn_batch), {IN_PROCESS} events per batch size ==")
        per_batch = {}
        for size in (1, BATCH):
            per_batch[size] = in_process(url, broker.url, IN_PROCESS, size)
            say(
                f"  {size:4d} per transaction: {per_batch[size]:,.0f} events/s (ratio {per_batch[size] / raw:.2f} to the raw consume)"
            )
        out.update(
            {
                "in_process_per_s": {str(k): round(v) for k, v in per_batch.items()},
                "program": program,
                "publish_per_s": round(rate),
                "raw_consume_per_s": round(raw),
                "noop_consumer_per_s": round(noop),
                "accrual_per_s": round(accrual),
                "wall_seconds_from_start": round(wall, 2),
                "ratio": round(ratio, 3),
                "goal": GOAL,
                "members": checks[0],
                "balance_mismatches": checks[1],
                "members_in_a_tier": checks[2],
                "points_earned_events": checks[3],
                "expiry_timers": checks[4],
            }
        )
    finally:
        if proc is not None:
            stop_process(proc)
        if engine is not None:
            engine.dispose()
        dbs.drop_all()
        broker.close()
    out["loadavg_end"] = os.getloadavg()
    say(f"\nload average at the end: {loadavg()}")
    path = RESULTS / f"campaign-points-{stamp}.json"
    path.write_text(json.dumps(out, indent=2, default=str, ensure_ascii=False))
    (RESULTS / f"campaign-points-{stamp}.txt").write_text(OUT.getvalue())
    say(f"saved {path.relative_to(ROOT)} and .txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
