"""reporting-svc at scale: the reports' latency over the projection tables of N generated events.

`BENCH_SCALE_SIZES=1000000,10000000 python -m bench.reporting_scale_bench` (default 200,000,
what `make bench` runs). BENCH_SCALE_CALLS calls per report (default 20), BENCH_SCALE_CHECK
events in the shape check (default 5,000; 0 skips it), BENCH_SCALE_KEEP=1 keeps the databases.

10,000,000 events through the broker would take hours here (the live path applies 1,300-2,900
events/s), so the tables are written set-based in SQL (bench/reporting_scale_data.py):

1. Shape check (is the generator honest?): for BENCH_SCALE_CHECK events, the generator's
   event view (gen.events: routing key, id, time and the protobuf message of every event) is
   published through RabbitMQ to the real reporting-svc consumer on a database migrated by the
   real migrations, while the generator writes its own tables from the same entities on another
   one; every projected table (facts, rollups, timeline without its identity column, value
   tables) must hold the same rows in both. Rollup rows whose measures are all zero are left
   out on both sides: the live path leaves such a row behind when a fact moves off a key, or
   not, depending on how events were batched; reports skip them (HAVING).
2. For each size: a fresh database migrated with the real migrations, the tables generated
   (the timeline's secondary indexes dropped for the load and made again with the migration's
   definitions), VACUUM ANALYZE, then reporting-svc's real gRPC server (no consumers) on
   loopback; each report RPC called BENCH_SCALE_CALLS times after one warm-up: p50/p95 beside
   an empty health RPC and a raw SQL count on the same server and database in the same run.
   EXPLAIN ANALYZE of the statements behind the slow reports goes to the .txt.

Results: bench/results/reporting-scale-<stamp>.txt/.json.
"""

from __future__ import annotations

import collections
import datetime as dt
import decimal
import json
import os
import platform
import shutil
import time

import grpc
import pika
import sqlalchemy as sa
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import reporting_scale_data as data
from bench.load import pct, table
from crm.reporting.v1 import reporting_service_pb2 as rs
from crm.reporting.v1 import reporting_service_pb2_grpc as rsg
from crm.reporting.v1 import value_pb2 as vpb
from crm.reporting.v1 import value_pb2_grpc as vpg
from crm.type.v1 import date_pb2
from crm_chassis.db import migrate
from crm_chassis.messaging.envelope import Event
from crm_chassis.messaging.topology import declare_consumer_queue, declare_producer, exchange_for
from crm_chassis.pagination import PageTokens
from crm_chassis.service import Service
from reporting_svc import PROJECTIONS, tables, value_tables
from reporting_svc import timeline as timeline_part
from reporting_svc.__main__ import SPEC
from tests.support.harness import ROOT, Broker, Databases, md, service_settings, start_service, wait_for

DATABASE = os.environ.get("BENCH_SCALE_DATABASE", "")
SIZES = [int(s) for s in os.environ.get("BENCH_SCALE_SIZES", "200000").split(",") if s.strip()]
CALLS = int(os.environ.get("BENCH_SCALE_CALLS", "20"))
CHECK = int(os.environ.get("BENCH_SCALE_CHECK", "5000"))
KEEP = os.environ.get("BENCH_SCALE_KEEP") == "1"
TIMELINE_KEYS = sorted(
    {k for p in timeline_part.PROJECTIONS for k in p.handlers} - {"customer.merged.v1", "customer.unmerged.v1"}
)
ROLLUPS = {"acquisition_daily", "support_daily", "support_monthly", "loyalty_daily", "tier_counts", "campaign_stats",
           "customer_value_daily"}  # fmt: skip
assert value_tables.customer_value_daily in tables.PROJECTED


def generate(conn: sa.Connection, n: int, timeline: bool = True) -> dict:
    """The spec tables, the projected tables and the timeline (indexes made after the load)."""
    conn.exec_driver_sql("SET work_mem = '256MB'; SET maintenance_work_mem = '1GB'")
    t0 = time.perf_counter()
    data.create_spec(conn, n)
    t1 = time.perf_counter()
    defs = conn.execute(
        sa.text(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema() AND tablename = 'timeline' "
            "AND indexname NOT IN ('timeline_pkey', 'timeline_event_id_key')"
        )
    ).all()
    for name, _ in defs:
        conn.exec_driver_sql(f"DROP INDEX {name}")
    conn.exec_driver_sql("ALTER TABLE timeline DROP CONSTRAINT timeline_event_id_key")
    data.project(conn, TIMELINE_KEYS, timeline)
    t2 = time.perf_counter()
    conn.exec_driver_sql("ALTER TABLE timeline ADD CONSTRAINT timeline_event_id_key UNIQUE (event_id)")
    for _, ddl in defs:
        conn.exec_driver_sql(ddl)
    t3 = time.perf_counter()
    return {"spec_s": round(t1 - t0, 1), "load_s": round(t2 - t1, 1), "index_s": round(t3 - t2, 1)}


# -- 1. the shape check ------------------------------------------------------------------------
def _message(name: str):
    return message_factory.GetMessageClass(descriptor_pool.Default().FindMessageTypeByName(name))


def published_events(conn: sa.Connection) -> list[Event]:
    out = []
    for r in conn.execute(sa.text("SELECT dom, rk, event_id, at, subject, msg, payload FROM gen.events ORDER BY at")):
        msg = json_format.ParseDict(r.payload, _message(r.msg)())
        out.append(Event(id=r.event_id, type=f"crm.{r.dom}.{r.rk}", source=f"/{r.dom}-svc", subject=r.subject,
                         time=r.at, exchange=exchange_for(r.dom), routing_key=r.rk, data=msg.SerializeToString(),
                         dataschema=r.msg))  # fmt: skip
    return out


def _norm(v):
    if isinstance(v, decimal.Decimal):
        return str(v.normalize()) if v else "0"
    if isinstance(v, dt.datetime):
        return v.astimezone(dt.UTC).isoformat()
    if isinstance(v, dict | list):
        return json.dumps(v, sort_keys=True)
    return v


def table_rows(conn: sa.Connection, t: sa.Table) -> collections.Counter:
    cols = [c for c in t.columns if not (t.name == "timeline" and c.name == "id")]
    keys = {c.name for c in t.primary_key.columns}
    out = collections.Counter()
    for r in conn.execute(sa.select(*cols)):
        m = r._mapping
        if t.name in ROLLUPS and all(not m[c.name] for c in cols if c.name not in keys):
            continue  # an all-zero rollup row (see the module's docstring)
        out[tuple(_norm(m[c.name]) for c in cols)] += 1
    return out


def check_shape(dbs: Databases, n: int) -> dict:
    gen_url = dbs.fresh("rep_scale_gen")
    migrate(gen_url, SPEC.migrations)
    gen = sa.create_engine(gen_url)
    with gen.begin() as c:
        generate(c, n)
        evs = published_events(c)
    broker = Broker()
    try:
        live_url = dbs.fresh("rep_scale_live")
        limit = service_settings(SPEC.name, live_url, broker.url).consumer_delivery_limit
        conn = pika.BlockingConnection(pika.URLParameters(broker.url))
        ch = conn.channel()
        for p in PROJECTIONS():
            declare_producer(ch, p.domain)
            declare_consumer_queue(ch, "reporting-svc", p.domain, list(p.handlers), limit)
        ch.confirm_delivery()
        for e in evs:
            ch.basic_publish(e.exchange, e.routing_key, e.data, e.amqp_properties())
        conn.close()
        svc = start_service(SPEC, live_url, broker.url)
        t0 = time.perf_counter()
        try:

            def inbox():
                with svc.ctx.engine.connect() as c:
                    return c.execute(sa.text("SELECT count(*) FROM inbox")).scalar()

            wait_for(lambda: inbox() >= len(evs), 900, "the live consumer")
            live_s = time.perf_counter() - t0
            result = {"events": len(evs), "live_consumer_s": round(live_s, 1), "tables": []}
            with svc.ctx.engine.connect() as lc, gen.connect() as gc:
                for t in tables.PROJECTED:
                    a, b = table_rows(lc, t), table_rows(gc, t)
                    diff = list((a - b).items())[:3], list((b - a).items())[:3]
                    result["tables"].append({"table": t.name, "live_rows": sum(a.values()), "generated_rows": sum(b.values()),
                                             "same": a == b, "only_live": str(diff[0])[:300],
                                             "only_generated": str(diff[1])[:300]})  # fmt: skip
        finally:
            svc.stop(0)
    finally:
        broker.close()
    gen.dispose()
    result["all_same"] = all(t["same"] for t in result["tables"])
    return result


# -- 2. the reports at size n ------------------------------------------------------------------
def d(s: str) -> date_pb2.Date:
    y, m, day = map(int, s.split("-"))
    return date_pb2.Date(year=y, month=m, day=day)


YEAR = {"start_date": d("2025-11-22"), "end_date": d("2026-11-21")}  # Jalali 1404-09-01 .. 1405-08-30
MONTH = {"start_date": d("2026-10-23"), "end_date": d("2026-11-21")}  # Jalali Aban 1405


def timed(call, calls: int, budget_s: float = 120.0) -> list[float]:
    call()  # warm-up
    out, t_end = [], time.perf_counter() + budget_s
    while len(out) < calls and (len(out) < 5 or time.perf_counter() < t_end):
        t = time.perf_counter()
        call()
        out.append((time.perf_counter() - t) * 1000)
    return out


def heavy_customer(conn) -> tuple[str, int]:
    return tuple(
        conn.execute(sa.text("SELECT customer_id, count(*) FROM timeline WHERE customer_id = '0' GROUP BY 1")).one()
    )


def deep_token(conn, secret: str, customer: str, depth: int) -> str:
    """The page token of GetCustomerTimeline after `depth` entries (as a client paging on gets)."""
    r = conn.execute(
        sa.text(
            "SELECT occurred_at, id FROM timeline WHERE customer_id = :c ORDER BY occurred_at DESC, id DESC "
            "OFFSET :o LIMIT 1"
        ),
        {"c": customer, "o": depth - 1},
    ).one()
    tokens = PageTokens(secret, "customer-timeline")
    return tokens.encode([r.occurred_at.isoformat(), r.id], tokens.fingerprint(customer=customer, kinds=[], sources=[]))


def measure(n: int, dbs: Databases) -> dict:
    url = dbs.fresh(f"rep_scale_{n}")
    migrate(url, SPEC.migrations)
    engine = sa.create_engine(url)
    out: dict = {"events_target": n}
    with engine.begin() as c:
        out.update(generate(c, n))
        counts = dict(c.execute(sa.text("SELECT rk, count(*) FROM gen.events GROUP BY rk")).all())
        out["events"] = sum(counts.values())
        data.drop_spec(c)
        c.exec_driver_sql("CREATE TABLE bench_scale (events bigint NOT NULL, events_target bigint NOT NULL)")
        c.execute(sa.text("INSERT INTO bench_scale VALUES (:e, :n)"), {"e": out["events"], "n": n})
    t = time.perf_counter()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.exec_driver_sql("VACUUM ANALYZE")
        out["vacuum_analyze_s"] = round(time.perf_counter() - t, 1)
    engine.dispose()
    return {**out, **serve_and_time(url)}


def serve_and_time(url: str) -> dict:
    """The report RPCs on reporting-svc's gRPC server over a generated database (migrated to
    head first: BENCH_SCALE_DATABASE times a database kept from an earlier run, after a new
    migration)."""
    migrate(url, SPEC.migrations)
    engine = sa.create_engine(url)
    out: dict = {"revision": None}
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        out["revision"] = c.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
        out["events"], out["events_target"] = c.exec_driver_sql("SELECT events, events_target FROM bench_scale").one()
        out["db_size"] = c.execute(sa.text("SELECT pg_size_pretty(pg_database_size(current_database()))")).scalar()
        out["rows"] = {
            t.name: c.execute(sa.select(sa.func.count()).select_from(t)).scalar()
            for t in [*tables.PROJECTED, value_tables.customer_value_daily]
        }
        out["sizes"] = {
            name: c.execute(sa.text("SELECT pg_size_pretty(pg_total_relation_size(:t))"), {"t": name}).scalar()
            for name in (
                "timeline",
                "support_daily",
                "support_monthly",
                "customer_value_daily",
                "customer_value_summary",
                "acquisition_daily",
                "points_facts",
            )
        }
        heavy, heavy_rows = heavy_customer(c)
        typical = c.execute(sa.text("SELECT customer_id FROM customer_source_facts ORDER BY customer_id LIMIT 1 OFFSET "
                                    "(SELECT count(*) / 2 FROM customer_source_facts)")).scalar()  # fmt: skip
    out["heavy_customer_entries"] = heavy_rows
    settings = service_settings(SPEC.name, url, "amqp://guest:guest@127.0.0.1:1/")
    svc = Service(SPEC, settings, run_migrations=False, relay=False, consumers=False, background=False, port=0).start()
    try:
        with engine.connect() as c:
            token = deep_token(c, settings.jwt_secret, heavy, max(1, int(heavy_rows * 0.8)))
        ch = grpc.insecure_channel(f"127.0.0.1:{svc.port}")
        rep, val, health = rsg.ReportingServiceStub(ch), vpg.ValueServiceStub(ch), health_pb2_grpc.HealthStub(ch)
        m = md()
        irr = {"currency_code": "IRR"}
        calls = {
            "baseline: empty health RPC": lambda: health.Check(health_pb2.HealthCheckRequest()),
            "acquisition Jalali month x source, year": lambda: rep.GetAcquisitionReport(
                rs.GetAcquisitionReportRequest(period="month", calendar="jalali", **YEAR), metadata=m),
            "support day x agent": lambda: rep.GetSupportReport(
                rs.GetSupportReportRequest(period="day", calendar="jalali", dimensions=["agent"], **MONTH), metadata=m),
            "support Jalali month x team, year": lambda: rep.GetSupportReport(
                rs.GetSupportReportRequest(period="month", calendar="jalali", dimensions=["team"], **YEAR), metadata=m),
            "loyalty Jalali month, year": lambda: rep.GetLoyaltyReport(
                rs.GetLoyaltyReportRequest(period="month", calendar="jalali", **YEAR), metadata=m),
            "campaigns (all 300)": lambda: rep.GetCampaignReport(rs.GetCampaignReportRequest(), metadata=m),
            "Pareto, year": lambda: val.GetParetoReport(vpb.GetParetoReportRequest(**YEAR, **irr), metadata=m),
            "RFM segments": lambda: val.GetRfmReport(
                vpb.GetRfmReportRequest(end_date=YEAR["end_date"], **irr), metadata=m),
            "RFM champions, first page": lambda: val.ListRfmSegmentCustomers(
                vpb.ListRfmSegmentCustomersRequest(segment="champions", end_date=YEAR["end_date"], **irr), metadata=m),
            "Customer 360 first page, typical customer": lambda: rep.GetCustomerTimeline(
                rs.GetCustomerTimelineRequest(customer=f"customers/{typical}"), metadata=m),
            "Customer 360 first page, heaviest customer": lambda: rep.GetCustomerTimeline(
                rs.GetCustomerTimelineRequest(customer=f"customers/{heavy}"), metadata=m),
            "Customer 360 page at 80% depth, heaviest": lambda: rep.GetCustomerTimeline(
                rs.GetCustomerTimelineRequest(customer=f"customers/{heavy}", page_token=token), metadata=m),
        }  # fmt: skip
        rows = []
        out["load_average_before"] = round(os.getloadavg()[0], 1)
        with engine.connect() as c:
            for sql, label in (("SELECT count(*) FROM acquisition_daily", "baseline: SQL count(*) acquisition_daily"),
                               ("SELECT count(*) FROM timeline", "baseline: SQL count(*) timeline")):  # fmt: skip
                times = timed(lambda sql=sql: c.exec_driver_sql(sql).scalar(), CALLS)
                rows.append({"report": label, "p50_ms": round(pct(times, 50), 1), "p95_ms": round(pct(times, 95), 1),
                             "calls": len(times)})  # fmt: skip
        # the same reports in process, each call its own transaction: the new path (support_monthly,
        # customer_value_summary, work_mem 64 MB) beside the daily path it replaces (support_daily
        # alone; customer_value_daily with the server's work_mem), same run, same database
        from reporting_svc import support_report, value

        y0, y1 = dt.date(2025, 11, 22), dt.date(2026, 11, 21)
        q_sup = {"start": y0, "end": y1, "period": "month", "calendar": "jalali", "lang": "en", "dims": ["team"]}

        def inproc(fn):
            def call():
                with engine.begin() as c:
                    fn(c)

            return call

        calls.update({
            "RFM segments, ending today (no late customers)": lambda: val.GetRfmReport(
                vpb.GetRfmReportRequest(**irr), metadata=m),
            "Pareto, all time": lambda: val.GetParetoReport(vpb.GetParetoReportRequest(**irr), metadata=m),
        })  # fmt: skip
        # (new, before) pairs, their calls alternating (new, before, new, ...) so that the load
        # of the shared machine weighs on both alike
        pairs = [
            ("in process: support Jalali month x team, year, support_monthly + edges",
             lambda c: support_report.report(c, q_sup),
             "in process: the same, support_daily only (before)",
             lambda c: support_report.report(c, q_sup, monthly=False)),
            ("in process: Pareto, year (as the RPC: daily rollup, server's work_mem)",
             lambda c: value.pareto(c, "IRR", y0, y1),
             "in process: Pareto, year, work_mem 64 MB",
             lambda c: value.pareto(c, "IRR", y0, y1, work_mem="64MB")),
            ("in process: Pareto, all time, summary", lambda c: value.pareto(c, "IRR", None, None, summary=True),
             "in process: Pareto, all time, daily rollup (before)",
             lambda c: value.pareto(c, "IRR", None, None, summary=False)),
            ("in process: RFM segments, as the RPC (the summary above 50,000 daily rows)",
             lambda c: value.rfm_counts(c, "IRR", None, y1),
             "in process: RFM segments, daily rollup, work_mem 4 MB (before)",
             lambda c: value.rfm_counts(c, "IRR", None, y1, summary=False, work_mem=None)),
            ("in process: RFM champions page, as the RPC",
             lambda c: value.rfm_page(c, "IRR", None, y1, "champions", None, 51),
             "in process: RFM champions page, daily rollup, work_mem 4 MB (before)",
             lambda c: value.rfm_page(c, "IRR", None, y1, "champions", None, 51, summary=False, work_mem=None)),
        ]  # fmt: skip
        for name, call in calls.items():
            times = timed(call, CALLS)
            goal = 50 if name.startswith("Customer 360") else None if name.startswith("baseline") else 1000
            p95 = round(pct(times, 95), 1)
            rows.append({"report": name, "p50_ms": round(pct(times, 50), 1), "p95_ms": p95, "calls": len(times),
                         "goal_ms": goal or "", "meets": "" if goal is None else ("yes" if p95 < goal else "NO")})  # fmt: skip
        for new_name, new_fn, old_name, old_fn in pairs:
            got = {new_name: [], old_name: []}
            for i in range(CALLS + 1):  # the first of each a warm-up
                for name, fn in ((new_name, new_fn), (old_name, old_fn)):
                    t = time.perf_counter()
                    inproc(fn)()
                    if i:
                        got[name].append((time.perf_counter() - t) * 1000)
            for name, times in got.items():
                rows.append({"report": name, "p50_ms": round(pct(times, 50), 1), "p95_ms": round(pct(times, 95), 1),
                             "calls": len(times), "goal_ms": "", "meets": ""})  # fmt: skip
        out["reports"] = rows
        out["load_average_after"] = round(os.getloadavg()[0], 1)
        ch.close()
    finally:
        svc.stop(0)
    out["explain"] = explain(engine)
    engine.dispose()
    return out


def explain(engine) -> dict:
    """EXPLAIN ANALYZE of the statements the slow reports run (compiled as the reports build them)."""
    from reporting_svc import acquisition_report, support_report, value

    got = {}
    q_sup = {"start": dt.date(2025, 11, 22), "end": dt.date(2026, 11, 21), "period": "month", "calendar": "jalali",
             "lang": "en", "dims": ["team"]}  # fmt: skip
    stmts = {}
    with engine.connect() as c:
        captured: list = []

        def grab(conn, cursor, statement, parameters, context, executemany):
            captured.append((statement, parameters))

        sa.event.listen(engine, "before_cursor_execute", grab)
        try:
            for name, fn in {
                "support Jalali month x team, year": lambda: support_report.report(c, q_sup),
                "acquisition Jalali month x source, year": lambda: acquisition_report.report(c, {**q_sup, "sources": []}),
                "Pareto, year": lambda: value.pareto(c, "IRR", q_sup["start"], q_sup["end"]),
                "RFM segments": lambda: value.rfm_counts(c, "IRR", None, q_sup["end"]),
            }.items():  # fmt: skip
                with c.begin():
                    fn()
                # the statement that aggregates (support: the rows; the others: their one query)
                stmts[name] = [st for st in captured if st[0].startswith("SET")] + [
                    next(st for st in captured if not st[0].startswith(("SET", "SELECT to_regclass")))
                ]
                captured.clear()
        finally:
            sa.event.remove(engine, "before_cursor_execute", grab)
        for name, statements in stmts.items():
            with c.begin():
                for sql, params in statements:  # SET LOCAL work_mem first, as the report runs it
                    if sql.startswith("SET"):
                        c.exec_driver_sql(sql, params)
                    else:
                        plan = c.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + sql, params).scalars().all()
                        got[name] = "\n".join(plan)
    return got


def main() -> None:
    dbs = Databases()
    out: dict = {
        "stamp": dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S"),
        "host": platform.node(),
        "python": platform.python_version(),
        "calls": CALLS,
        "disk_free_gb_before": round(shutil.disk_usage(ROOT).free / 1e9, 1),
    }
    try:
        if CHECK:
            out["shape_check"] = check_shape(dbs, CHECK)
            report(out)
            report(out, save=True)
            if not KEEP:
                dbs.drop_all()
                dbs.created.clear()
        out["runs"] = []
        if DATABASE:
            out["runs"].append({"spec_s": "-", "load_s": "-", "index_s": "-", "vacuum_analyze_s": "-",
                                **serve_and_time(DATABASE)})  # fmt: skip
            report(out)
            report(out, save=True)
        for n in SIZES:
            out["runs"].append(measure(n, dbs))
            if not KEEP:
                dbs.drop_all()
                dbs.created.clear()
            report(out)
            report(out, save=True)  # after each size: a long run stopped later keeps what it measured
    finally:
        if not KEEP:
            dbs.drop_all()


def report(out: dict, save: bool = False) -> None:
    lines = [f"reporting-svc at scale ({out['host']}, Python {out['python']}, {out['calls']} calls per report)"]
    sc = out.get("shape_check")
    if sc:
        lines += ["", f"Shape check: {sc['events']} generated events published to the real consumer "
                  f"({sc['live_consumer_s']} s) vs the SQL generator from the same entities: "
                  f"{'ALL TABLES THE SAME' if sc['all_same'] else 'DIFFERENT'}",
                  table(sc["tables"], ["table", "live_rows", "generated_rows", "same"])]  # fmt: skip
        for t in sc["tables"]:
            if not t["same"]:
                lines += [
                    f"  {t['table']} only live: {t['only_live']}",
                    f"  {t['table']} only generated: {t['only_generated']}",
                ]
    for run in out.get("runs", []):
        lines += ["", f"{run['events']:,} events (target {run['events_target']:,}), migrations at {run['revision']}: spec {run['spec_s']} s, load "
                  f"{run['load_s']} s, indexes {run['index_s']} s, vacuum analyze {run['vacuum_analyze_s']} s; "
                  f"database {run['db_size']}; heaviest customer {run['heavy_customer_entries']:,} timeline entries; "
                  f"load average (2 cores, shared) {run['load_average_before']} before timing, {run['load_average_after']} after",
                  "rows: " + ", ".join(f"{k} {v:,}" for k, v in run["rows"].items()),
                  "sizes: " + ", ".join(f"{k} {v}" for k, v in run["sizes"].items()),
                  table(run["reports"], ["report", "p50_ms", "p95_ms", "calls", "goal_ms", "meets"])]  # fmt: skip
    text = "\n".join(lines)
    if not save:
        print(text, flush=True)
    else:
        plans = [f"\n-- EXPLAIN ANALYZE at {r['events']:,} events: {k}\n{v}" for r in out.get("runs", [])
                 for k, v in r.get("explain", {}).items()]  # fmt: skip
        stamp = out["stamp"]
        results = ROOT / "bench" / "results"
        (results / f"reporting-scale-{stamp}.txt").write_text(text + "\n" + "\n".join(plans) + "\n")
        (results / f"reporting-scale-{stamp}.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
        print(f"saved bench/results/reporting-scale-{stamp}.txt", flush=True)


if __name__ == "__main__":
    main()
