"""Where a rebuild's time goes, in-process: `python -m bench.reporting_rebuild_profile`.

The reporting bench's events (BENCH_REPORTING_EVENTS, default 20,000: tickets, surveys,
customers) published to a private vhost, so crm.events.log holds only them; reporting-svc
started in this process on a fresh database (its consumers idle: their queues were declared
after the publish). Then, one after the other on the same stream and database:

1. read: a plain pika consumer reads the whole stream from offset 0 into memory (prefetch
   1000, one multiple ack per 500): events/s, the rebuild's floor;
2. parse: the rebuild's `_readable` (envelope and Requires checks) over what was read;
3. apply: `rebuild.apply_batch` of what was read, BENCH_PROFILE_BATCH (500) events per
   transaction, into a fresh shadow schema (`rebuild._prepare`), under cProfile (not with
   BENCH_PROFILE_CPROFILE=0): events/s and the profile (cumulative and own time). Read and apply run in sequence here, as in the job.
4. statements: the apply's statements (their SQL's first words), how many executions, the
   time from the cursor's execute to its end (PostgreSQL and the driver) and how many of them
   SQLAlchemy compiled ("generated") rather than took from its cache; and the apply's process
   CPU seconds (this process: the Python side; PostgreSQL's is the rest of the wall time).

BENCH_PROFILE_STAGE=live times the live path's apply instead of step 3: the same events,
CONSUMER_BATCH (200) a transaction through the consumer's own `handle_batch` (inbox, the
subscriptions' batch_all wrappers, lag rows) into the service's tables: what a live consumer
does after pika hands it the deliveries. Each producer's events in their order, batches taken
from each producer in turn (BENCH_PROFILE_LIVE_ORDER=queue: a batch is one run of one queue's
deliveries), or the stream's order (=stream: both producers interleaved as published, a run
per few events: the worst case of a consumer whose queues' deliveries alternate).

Prints the figures and the profile; writes nothing else. The time left after "apply" is what a
rebuild costs beyond reading the stream.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import time
import uuid

import pika
import sqlalchemy as sa

from bench.reporting_bench import N, events, publish
from crm_chassis.messaging.consumer import EventConsumer
from crm_chassis.messaging.envelope import from_amqp
from crm_chassis.messaging.publisher import url_parameters
from crm_chassis.messaging.topology import EVENT_LOG_STREAM, declare_producer
from reporting_svc import PROJECTIONS, rebuild
from reporting_svc.__main__ import SPEC
from tests.support.harness import Broker, Databases, start_service

BATCH = int(os.environ.get("BENCH_PROFILE_BATCH", "500"))
STAGE = os.environ.get("BENCH_PROFILE_STAGE", "rebuild")  # or live
LIVE_BATCH = int(os.environ.get("CONSUMER_BATCH", "200"))
LIVE_ORDER = os.environ.get("BENCH_PROFILE_LIVE_ORDER", "queue")  # or stream
PROFILE = os.environ.get("BENCH_PROFILE_CPROFILE", "1") != "0"  # 0: the apply timed without cProfile


class Statements:
    """Per statement (its first 90 characters): executions, seconds in the cursor, compiles."""

    def __init__(self, engine) -> None:
        self.stats: dict[str, list] = {}
        self.on = False
        sa.event.listen(engine, "before_cursor_execute", self.before)
        sa.event.listen(engine, "after_cursor_execute", self.after)

    def before(self, conn, cursor, statement, parameters, context, executemany) -> None:
        conn.info["bench_t0"] = time.perf_counter()

    def after(self, conn, cursor, statement, parameters, context, executemany) -> None:
        if not self.on:
            return
        key = " ".join(statement.split())[:90]
        row = self.stats.setdefault(key, [0, 0.0, 0])
        row[0] += 1
        row[1] += time.perf_counter() - conn.info.pop("bench_t0", time.perf_counter())
        stats = context._get_cache_stats() if context is not None and context.compiled is not None else ""
        if stats and not stats.startswith(("cached", "raw")):  # generated, no key (not cacheable), ...
            row[2] += 1

    def report(self) -> str:
        rows = sorted(self.stats.items(), key=lambda kv: -kv[1][1])
        lines = [f"  {'statement':90}  {'n':>5}  {'s':>6}  compiled"]
        lines += [f"  {k:90}  {n:5}  {t:6.3f}  {c}" for k, (n, t, c) in rows]
        lines.append(
            f"  total {sum(r[0] for r in self.stats.values())} statements, {sum(r[1] for r in self.stats.values()):.3f} s"
        )
        return "\n".join(lines)


def read_stream(url: str, n: int) -> list:
    conn = pika.BlockingConnection(url_parameters(url))
    ch = conn.channel()
    ch.basic_qos(prefetch_count=1000)
    got = []
    for method, props, body in ch.consume(EVENT_LOG_STREAM, arguments={"x-stream-offset": 0}, inactivity_timeout=5):
        if method is None:
            break
        got.append((method, props, body))
        if len(got) % 500 == 0 or len(got) >= n:
            ch.basic_ack(method.delivery_tag, multiple=True)
        if len(got) >= n:
            break
    ch.cancel()
    conn.close()
    return got


def main() -> None:
    dbs, broker = Databases(), Broker()
    try:
        db = dbs.fresh("rebuild_profile")
        conn = pika.BlockingConnection(pika.URLParameters(broker.url))
        ch = conn.channel()
        for p in PROJECTIONS():
            declare_producer(ch, p.domain)
        conn.close()
        publish(broker.url, events(N))
        svc = start_service(SPEC, db, broker.url)
        try:
            t0 = time.perf_counter()
            got = read_stream(broker.url, N)
            t_read = time.perf_counter() - t0
            table = rebuild.dispatch_table(PROJECTIONS())
            t0 = time.perf_counter()
            for i in range(0, len(got), BATCH):
                rebuild._readable(got[i : i + BATCH], table)
            t_parse = time.perf_counter() - t0
            if STAGE == "live":
                consumer = EventConsumer(svc.ctx.engine, "amqp://unused", "reporting-svc", SPEC.subscriptions(svc.ctx))
                subs = {s.domain: s for s in consumer.subscriptions}
                evs = [from_amqp(*d) for d in got]
                items = [(subs[e.exchange.split(".")[1]], e) for e in evs]
                if LIVE_ORDER == "stream":
                    batches = [items[i : i + LIVE_BATCH] for i in range(0, len(items), LIVE_BATCH)]
                else:
                    per = [[it for it in items if it[0] is sub] for sub in subs.values()]
                    chunks = [[q[i : i + LIVE_BATCH] for i in range(0, len(q), LIVE_BATCH)] for q in per]
                    batches = [c[j] for j in range(max(map(len, chunks))) for c in chunks if j < len(c)]

                def apply_all():
                    for b in batches:
                        consumer.handle_batch(b)
            else:
                with svc.ctx.engine.begin() as c:
                    schema = rebuild._prepare(c, "profile" + uuid.uuid4().hex)

                def apply_all():
                    for i in range(0, len(got), BATCH):
                        with svc.ctx.engine.begin() as c:
                            rebuild.apply_batch(c, schema, table, got[i : i + BATCH])

            prof = cProfile.Profile()
            statements = Statements(svc.ctx.engine)
            statements.on = True
            cpu0 = time.process_time()
            t0 = time.perf_counter()
            if PROFILE:
                prof.enable()
            apply_all()
            if PROFILE:
                prof.disable()
            t_apply = time.perf_counter() - t0
            cpu_apply = time.process_time() - cpu0
            statements.on = False
        finally:
            svc.stop(0)
        n = len(got)
        size = f"{LIVE_BATCH} ({LIVE_ORDER} order)" if STAGE == "live" else BATCH
        print(f"reporting {STAGE} profile: {n} events, batches of {size}, load average {os.getloadavg()[0]:.2f}")
        print(f"  read the stream (plain pika)    {t_read:6.2f} s  {n / t_read:8,.0f} events/s")
        print(f"  parse and check (_readable)     {t_parse:6.2f} s  {n / t_parse:8,.0f} events/s")
        what = "handle_batch, parsed before" if STAGE == "live" else "apply_batch, incl. parse"
        print(f"  apply ({what}) {t_apply:5.2f} s  {n / t_apply:8,.0f} events/s")
        print(
            f"  apply: this process' CPU       {cpu_apply:6.2f} s  {cpu_apply / n * 1e6:8,.0f} us/event {' (under cProfile)' if PROFILE else ''}"
        )
        print(f"  read + apply in sequence         {t_read + t_apply:5.2f} s  {n / (t_read + t_apply):8,.0f} events/s")
        if PROFILE:
            out = io.StringIO()
            stats = pstats.Stats(prof, stream=out)
            stats.sort_stats("cumulative").print_stats(30)
            stats.sort_stats("tottime").print_stats(20)
            print(out.getvalue())
        print("statements of the apply:")
        print(statements.report())
    finally:
        broker.close()
        dbs.drop_all()


if __name__ == "__main__":
    main()
