"""Where one consumer batch of invoice.paid.v1 goes, in-process: `python -m bench.campaign_points_profile`.

A fresh campaign database with the points bench's programme; campaign-svc started in this
process without its consumer; BENCH_PROFILE_BATCHES batches of CONSUMER_BATCH (50) events
(BENCH_POINTS_CUSTOMERS customers) are handed to the merged sales subscription's batch handler
for invoice.paid.v1 (the audience projection, then loyalty, as the consumer calls them), each
in one transaction with its inbox rows. Every statement is timed (before/after_cursor_execute);
the last batches run under cProfile. Prints ms per event: total, SQL by statement, Python
(BENCH_PROFILE_CALLERS, a regular expression: also the callers of the functions it matches).
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import time
from collections import defaultdict

import sqlalchemy as sa

from bench.campaign_points_bench import create_program, invoice_events
from campaign_svc.__main__ import SPEC
from crm_chassis.db import migrate
from crm_chassis.messaging.consumer import _INBOX_MANY
from tests.support.harness import Broker, Databases, start_service

BATCH = int(os.environ.get("CONSUMER_BATCH", "50"))
BATCHES = int(os.environ.get("BENCH_PROFILE_BATCHES", "40"))


def main() -> None:
    dbs, broker = Databases(), Broker()
    try:
        url = dbs.fresh("bench_points_profile")
        migrate(url, SPEC.migrations)
        svc = start_service(SPEC, url, broker.url, relay=False, consumers=False)
        try:
            create_program(svc.port)
            subs = {s.domain: s for s in rt_subscriptions(svc)}
            handle = subs["sales"].batch["invoice.paid.v1"]
            stmts: dict[str, list[float]] = defaultdict(list)
            clock = {}

            @sa.event.listens_for(svc.ctx.engine, "before_cursor_execute")
            def before(conn, cursor, statement, params, context, many):
                clock[id(cursor)] = time.perf_counter()

            @sa.event.listens_for(svc.ctx.engine, "after_cursor_execute")
            def after(conn, cursor, statement, params, context, many):
                stmts[" ".join(statement.split())[:90]].append(time.perf_counter() - clock.pop(id(cursor), 0))

            evs = invoice_events(BATCH * BATCHES)
            prof = cProfile.Profile()
            warm = BATCHES // 4  # warm-up batches (compiled caches, first members)
            total = commit = 0.0
            for b in range(BATCHES):
                run = evs[b * BATCH : (b + 1) * BATCH]
                if b == warm:
                    stmts.clear()
                    total = commit = 0.0
                t0 = time.perf_counter()
                if b >= warm:
                    prof.enable()
                with svc.ctx.engine.begin() as conn:
                    conn.execute(  # the consumer's own inbox statement
                        _INBOX_MANY, {"c": "profile", "ids": [e.id for e in run], "types": [e.type for e in run]}
                    ).all()
                    handle(conn, run)
                    t1 = time.perf_counter()
                prof.disable()
                if b >= warm:
                    total += time.perf_counter() - t0
                    commit += time.perf_counter() - t1  # the commit, with the deferred ledger check
            n = BATCH * (BATCHES - warm)
            sql = sum(sum(v) for v in stmts.values())
            print(f"{n} events in batches of {BATCH}: {1000 * total / n:.3f} ms/event ({n / total:,.0f} events/s)")
            print(
                f"  SQL {1000 * sql / n:.3f} ms/event in {sum(len(v) for v in stmts.values()) / (n / BATCH):.1f} statements/batch; "
                f"Python (and commit) {1000 * (total - sql) / n:.3f} ms/event, of it the commit {1000 * commit / n:.3f}"
            )
            for s, v in sorted(stmts.items(), key=lambda kv: -sum(kv[1]))[:15]:
                print(f"  {1000 * sum(v) / n:7.3f} ms/event  x{len(v) / (n / BATCH):4.1f}/batch  {s}")
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats(os.environ.get("BENCH_PROFILE_SORT", "cumulative")).print_stats(
                30
            )
            if callers := os.environ.get("BENCH_PROFILE_CALLERS"):  # who calls the functions matching it
                pstats.Stats(prof, stream=out).sort_stats("tottime").print_callers(callers)
            print(out.getvalue())
        finally:
            svc.stop(0)
    finally:
        dbs.drop_all()
        broker.close()


def rt_subscriptions(svc):
    from campaign_svc.__main__ import PARTS
    from crm_chassis.parts import merge_subscriptions

    rt = svc.ctx.shared["runtime"]
    return merge_subscriptions([s for p in PARTS if hasattr(p, "subscriptions") for s in p.subscriptions(rt)])


if __name__ == "__main__":
    main()
