"""Where one consumer batch of invoice.paid.v1 goes, in-process: `python -m bench.campaign_points_profile`.

A fresh campaign database with the points bench's programme; campaign-svc started in this
process without its consumer; BENCH_PROFILE_BATCHES batches of CONSUMER_BATCH (50) events
(BENCH_POINTS_CUSTOMERS customers) are handed to the merged sales subscription's batch handler
for invoice.paid.v1 (the audience projection, then loyalty, as the consumer calls them), each
in one transaction with its inbox rows, all on one connection. After a quarter of warm-up
batches, half of the rest run plain and half under cProfile. Prints per event:

- CPU (the plain batches): this thread's CPU (time.thread_time: the handlers' Python and the
  driver's; and of it each part's: the merged handler's parts called one by one, as it calls
  them) and the PostgreSQL backend's (utime + stime of its process, /proc/<pid>/stat, the
  commit and the deferred ledger check included); wall time beside them;
- SQL by statement (wall, the plain batches; before/after_cursor_execute);
- cProfile of the other batches (BENCH_PROFILE_SORT, default cumulative; BENCH_PROFILE_CALLERS,
  a regular expression: also the callers of the functions it matches).

CPU figures are the ones to compare: the machine is shared, wall time is not this process's.
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
TICK = os.sysconf("SC_CLK_TCK")


def backend_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a local PostgreSQL backend process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK


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
            # the merged handler's parts, called in its order one by one in the plain batches (as
            # it calls them), each one's thread CPU measured
            from campaign_svc import audience, loyalty

            rt = svc.ctx.shared["runtime"]
            parts = [
                ("audience", {s.domain: s for s in audience.subscriptions(rt)}["sales"].batch["invoice.paid.v1"]),
                ("loyalty", loyalty.engine(rt).earn_batch),
            ]
            part_cpu = dict.fromkeys((name for name, _f in parts), 0.0)
            stmts: dict[str, list[float]] = defaultdict(list)
            clock = {}
            timing = {"on": False}

            @sa.event.listens_for(svc.ctx.engine, "before_cursor_execute")
            def before(conn, cursor, statement, params, context, many):
                clock[id(cursor)] = time.perf_counter()

            @sa.event.listens_for(svc.ctx.engine, "after_cursor_execute")
            def after(conn, cursor, statement, params, context, many):
                spent = time.perf_counter() - clock.pop(id(cursor), 0)
                if timing["on"]:
                    stmts[" ".join(statement.split())[:90]].append(spent)

            evs = invoice_events(BATCH * BATCHES)
            prof = cProfile.Profile()
            warm = BATCHES // 4  # warm-up batches (compiled caches, first members)
            plain = warm + (BATCHES - warm) // 2  # [warm, plain): plain; [plain, BATCHES): cProfile
            wall = cpu = pg = commit = 0.0
            with svc.ctx.engine.connect() as conn:
                pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
                conn.commit()
                for b in range(BATCHES):
                    run = evs[b * BATCH : (b + 1) * BATCH]
                    measured = warm <= b < plain
                    timing["on"] = measured
                    if b >= plain:
                        prof.enable()
                    t0, c0, p0 = time.perf_counter(), time.thread_time(), backend_cpu(pid)
                    with conn.begin():
                        conn.execute(  # the consumer's own inbox statement
                            _INBOX_MANY, {"c": "profile", "ids": [e.id for e in run], "types": [e.type for e in run]}
                        ).all()
                        if measured:
                            for name, part in parts:
                                q0 = time.thread_time()
                                part(conn, run)
                                part_cpu[name] += time.thread_time() - q0
                        else:
                            handle(conn, run)
                        t1 = time.perf_counter()
                    t2, c2, p2 = time.perf_counter(), time.thread_time(), backend_cpu(pid)
                    prof.disable()
                    if measured:
                        wall += t2 - t0
                        cpu += c2 - c0
                        pg += p2 - p0
                        commit += t2 - t1  # the commit, with the deferred ledger check
            n = BATCH * (plain - warm)
            sql = sum(sum(v) for v in stmts.values())
            print(
                f"{n} events in batches of {BATCH} (plain, after {warm} warm-up batches); load average {os.getloadavg()}"
            )
            print(
                f"  CPU {1000 * (cpu + pg) / n:.3f} ms/event: Python (this thread) {1000 * cpu / n:.3f}, "
                f"PostgreSQL backend {1000 * pg / n:.3f}  (clock ticks of 1/{TICK} s)"
            )
            print("  of the thread's: " + ", ".join(f"{k} {1000 * v / n:.3f}" for k, v in part_cpu.items()))
            print(
                f"  wall {1000 * wall / n:.3f} ms/event ({n / wall:,.0f} events/s): SQL {1000 * sql / n:.3f} in "
                f"{sum(len(v) for v in stmts.values()) / (n / BATCH):.1f} statements/batch, commit {1000 * commit / n:.3f}"
            )
            for s, v in sorted(stmts.items(), key=lambda kv: -sum(kv[1]))[:15]:
                print(f"  {1000 * sum(v) / n:7.3f} ms/event  x{len(v) / (n / BATCH):4.1f}/batch  {s}")
            out = io.StringIO()
            print(f"\ncProfile of {BATCHES - plain} batches:")
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
