"""Where a rebuild's time goes, in-process: `python -m bench.reporting_rebuild_profile`.

The reporting bench's events (BENCH_REPORTING_EVENTS, default 20,000: tickets, surveys,
customers) published to a private vhost, so crm.events.log holds only them; reporting-svc
started in this process on a fresh database (its consumers idle: their queues were declared
after the publish). Then, one after the other on the same stream and database:

1. read: a plain pika consumer reads the whole stream from offset 0 into memory (prefetch
   1000, one multiple ack per 500): events/s, the rebuild's floor;
2. parse: the rebuild's `_readable` (envelope and Requires checks) over what was read;
3. apply: `rebuild.apply_batch` of what was read, BENCH_PROFILE_BATCH (500) events per
   transaction, into a fresh shadow schema (`rebuild._prepare`), under cProfile: events/s and
   the profile (cumulative and own time). Read and apply run in sequence here, as in the job.

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

from bench.reporting_bench import N, events, publish
from crm_chassis.messaging.publisher import url_parameters
from crm_chassis.messaging.topology import EVENT_LOG_STREAM, declare_producer
from reporting_svc import PROJECTIONS, rebuild
from reporting_svc.__main__ import SPEC
from tests.support.harness import Broker, Databases, start_service

BATCH = int(os.environ.get("BENCH_PROFILE_BATCH", "500"))


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
            with svc.ctx.engine.begin() as c:
                schema = rebuild._prepare(c, "profile" + uuid.uuid4().hex)
            prof = cProfile.Profile()
            t0 = time.perf_counter()
            prof.enable()
            for i in range(0, len(got), BATCH):
                with svc.ctx.engine.begin() as c:
                    rebuild.apply_batch(c, schema, table, got[i : i + BATCH])
            prof.disable()
            t_apply = time.perf_counter() - t0
        finally:
            svc.stop(0)
        n = len(got)
        print(f"reporting rebuild profile: {n} events, batches of {BATCH}, load average {os.getloadavg()[0]:.2f}")
        print(f"  read the stream (plain pika)    {t_read:6.2f} s  {n / t_read:8,.0f} events/s")
        print(f"  parse and check (_readable)     {t_parse:6.2f} s  {n / t_parse:8,.0f} events/s")
        print(f"  apply (apply_batch, incl. parse) {t_apply:5.2f} s  {n / t_apply:8,.0f} events/s")
        print(f"  read + apply in sequence         {t_read + t_apply:5.2f} s  {n / (t_read + t_apply):8,.0f} events/s")
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out)
        stats.sort_stats("cumulative").print_stats(30)
        stats.sort_stats("tottime").print_stats(20)
        print(out.getvalue())
    finally:
        broker.close()
        dbs.drop_all()


if __name__ == "__main__":
    main()
