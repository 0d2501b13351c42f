"""support-svc at scale: `python -m bench.support_bench`.

A fresh support database migrated to head and loaded by bench/support_data.py (set-based SQL):
a 24x7 calendar, teams, agents, categories, one SLA policy, BENCH_SUPPORT_TICKETS open tickets
with their intervals, first messages, ticket_sla rows and armed sla.warn / sla.breach timers,
and an offers team with BENCH_SUPPORT_OFFERS pending offers. support-svc runs as its own
process with the baselines on the same server (bench/baseline_server.py,
BENCH_SERVICE=support_svc; `serve`: gRPC, relay, timer worker, mail-in), plus
BENCH_TIMER_PROCS more `python -m support_svc work` processes (timer workers sharing by SKIP
LOCKED). Every figure sits beside a baseline measured in the same run:

1. timers: BENCH_TIMER_RATE first-response breaches a second come due over BENCH_TIMER_WINDOW
   seconds (from start + 5 s) and the service's real SLA handler fires them; lateness (fired -
   due, timer_firings) p50/p95/p99/max and the achieved firings/s, beside the same count of
   no-op timers fired by a TimerWorker in this process (the chassis' ceiling). Goal p99 < 1 s.
   Then where a firing's time goes, in-process: statements, SQL time, the rest.
2. offers: the offers team's pending offers expire BENCH_OFFER_RATE a second; the time from an
   offer's expire_time to the next offer's offer_time of the same ticket, beside no-op timer
   lateness at the same rate.
3. create: CreateTicket (email, contact, category, team, Persian subject and body) at 1 and 8
   callers beside MinimalWrite and the empty RPC. Goal CreateTicket / MinimalWrite >= 0.75.
   Then the same work in-process: statements, SQL time, EXPLAIN ANALYZE.
4. mail: BENCH_MAIL_CLIENTS smtplib clients sending new mails (unique Message-ID, Persian
   subject) to the mail-in endpoint for BENCH_SECONDS: tickets/s, beside the same clients
   against a no-op aiosmtpd sink (its own process).
5. queue: GetQueueView (all teams, one team) BENCH_QUEUE_CALLS calls each beside the empty RPC
   and its SQL replayed with psycopg. Goal p95 < 50 ms.

Settings: BENCH_SUPPORT_TICKETS (100000), BENCH_TIMER_RATE (1000), BENCH_TIMER_WINDOW (30),
BENCH_TIMER_GRACE (seconds waited after the window, 20), BENCH_TIMER_PROCS (0),
BENCH_SUPPORT_OFFERS (2000), BENCH_OFFER_RATE (200), BENCH_SECONDS (5), BENCH_MAIL_CLIENTS (4),
BENCH_QUEUE_CALLS (200), BENCH_SLA_ACTIONS (notify_manager), BENCH_SECTIONS (comma list of
timers,offers,create,mail,queue; default all). Results: bench/results/support-<stamp>.txt/.json.
"""

from __future__ import annotations

import datetime as dt
import io
import itertools
import json
import os
import platform
import smtplib
import subprocess
import sys
import threading
import time
import uuid
from email.message import EmailMessage
from email.utils import make_msgid
from types import SimpleNamespace

import grpc
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import load, support_data
from bench.__main__ import start_service_process
from bench.load import pct, table
from bench.sales_bench import RawSql
from crm.customer.v1 import customer_pb2, customer_service_pb2
from crm.support.v1 import queue_pb2, queue_pb2_grpc, ticket_pb2, tickets_pb2, tickets_pb2_grpc
from crm_chassis.auth import Principal
from crm_chassis.config import DEFAULT_JWT_SECRET
from crm_chassis.db import create_engine, migrate
from crm_chassis.timers import TimerWorker
from support_svc.__main__ import SPEC
from tests.support.harness import ROOT, Broker, Databases, free_port, md, service_settings

N_TICKETS = int(os.environ.get("BENCH_SUPPORT_TICKETS", "100000"))
RATE = float(os.environ.get("BENCH_TIMER_RATE", "1000"))
WINDOW = float(os.environ.get("BENCH_TIMER_WINDOW", "30"))
GRACE = float(os.environ.get("BENCH_TIMER_GRACE", "20"))
TIMER_PROCS = int(os.environ.get("BENCH_TIMER_PROCS", "0"))
N_OFFERS = int(os.environ.get("BENCH_SUPPORT_OFFERS", "2000"))
OFFER_RATE = float(os.environ.get("BENCH_OFFER_RATE", "200"))
SECONDS = float(os.environ.get("BENCH_SECONDS", "5"))
MAIL_CLIENTS = int(os.environ.get("BENCH_MAIL_CLIENTS", "4"))
QUEUE_CALLS = int(os.environ.get("BENCH_QUEUE_CALLS", "200"))
SECTIONS = set((os.environ.get("BENCH_SECTIONS") or "timers,offers,create,mail,queue").split(","))
N_DUE = int(RATE * WINDOW)
LEAD = 5.0
RESULTS = ROOT / "bench" / "results"
TIMER_P99_GOAL_S = 1.0
QUEUE_P95_GOAL_MS = 50.0
CREATE_RATIO_GOAL = 0.75
NOOP = "bench.noop"
OUT = io.StringIO()


def say(msg: str = "") -> None:
    print(msg, flush=True)
    OUT.write(msg + "\n")


def ms(x: float) -> float:
    return round(x, 2)


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def timed(call, n: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        call()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def lat_row(what: str, vals: list[float], **extra) -> dict:
    return {
        "what": what,
        "calls": len(vals),
        "p50_ms": ms(pct(vals, 50)),
        "p95_ms": ms(pct(vals, 95)),
        "p99_ms": ms(pct(vals, 99)),
        **extra,
    }


# -- 1. timers --------------------------------------------------------------------------------------


def _lateness(engine, kinds: tuple[str, ...], start: float, n: int, deadline_passed: float) -> dict:
    """Lateness of the firings of `kinds` due since `start` (epoch s); timers of the window not
    fired yet count as late by (now - due) at least (censored), and are reported."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT lateness_seconds, extract(epoch FROM fired_at), extract(epoch FROM due_at) FROM timer_firings "
                "WHERE kind = ANY(:k) AND ok AND due_at >= to_timestamp(:s) AND due_at < to_timestamp(:e)"
            ),
            {"k": list(kinds), "s": start, "e": start + LEAD + n / RATE + 1},
        ).all()
        left = conn.execute(
            sa.text(
                "SELECT extract(epoch FROM now() - due_at) FROM timers WHERE kind = ANY(:k) "
                "AND due_at >= to_timestamp(:s) AND due_at <= now()"
            ),
            {"k": list(kinds), "s": start},
        ).scalars()
        left = [float(x) for x in left]
    lat = [float(r[0]) for r in rows] + left
    fired = len(rows)
    span = (max(float(r[1]) for r in rows) - min(float(r[2]) for r in rows)) if rows else 0
    return {
        "fired": fired,
        "not_fired": len(left),
        "p50_s": round(pct(lat, 50), 3),
        "p95_s": round(pct(lat, 95), 3),
        "p99_s": round(pct(lat, 99), 3),
        "max_s": round(max(lat), 3) if lat else 0,
        "firings_per_s": round(fired / span, 1) if span else 0,
    }


def _wait_fired(engine, kinds, start, n, timeout) -> None:
    end = time.time() + timeout
    while time.time() < end:
        with engine.connect() as conn:
            done = conn.execute(
                sa.text("SELECT count(*) FROM timer_firings WHERE kind = ANY(:k) AND due_at >= to_timestamp(:s)"),
                {"k": list(kinds), "s": start},
            ).scalar()
        if done >= n:
            return
        time.sleep(0.5)


def noop_run(engine, n: int, rate: float, workers: int = 1) -> dict:
    """n no-op timers due `rate` a second from now + LEAD, fired by TimerWorker(s) here."""
    ws = [TimerWorker(engine, {NOOP: lambda conn, timer: None}) for _ in range(workers)]
    for w in ws:
        w.start()
    try:
        start = support_data.noop_timers(engine, NOOP, n, rate, LEAD)
        _wait_fired(engine, (NOOP,), start, n, LEAD + n / rate + GRACE)
    finally:
        for w in ws:
            w.stop()
    out = _lateness(engine, (NOOP,), start, n, 0)
    with engine.begin() as conn:  # what was not fired goes away
        conn.execute(sa.text("DELETE FROM timers WHERE kind = :k"), {"k": NOOP})
    return out


def sla_run(engine, n: int, offset: int) -> dict:
    start = support_data.arm_due(engine, n, RATE, LEAD, offset)
    _wait_fired(engine, ("sla.breach",), start, n, LEAD + n / RATE + GRACE)
    out = _lateness(engine, ("sla.breach",), start, n, 0)
    with engine.begin() as conn:
        out["breached_flagged"] = conn.execute(
            sa.text(
                "SELECT count(*) FROM ticket_sla WHERE first_response_breached AND first_response_due >= to_timestamp(:s)"
            ),
            {"s": start},
        ).scalar()
        # the rest of the window is not fired later, behind the next section's back
        conn.execute(
            sa.text(
                "UPDATE timers SET due_at = now() + interval '10 days', next_attempt_at = now() + interval '10 days' "
                "WHERE kind IN ('sla.warn', 'sla.breach') AND due_at < now() + interval '1 hour'"
            )
        )
    return out


def firing_profile(url: str, amqp: str, n: int = 200) -> list[dict]:
    """Where a firing's time goes, in-process: n due SLA breaches (and n no-op timers) fired by
    run_once() with every statement timed; claim, handler and bookkeeping statements apart."""
    from crm_chassis.service import ServiceContext
    from support_svc.__main__ import PARTS
    from support_svc.runtime import support

    raw = RawSql(url)
    ctx = ServiceContext(settings=service_settings("support-svc", url, amqp), engine=raw.engine, database_url=url)
    rt = support(ctx, PARTS)
    for p in PARTS:
        if hasattr(p, "timer_handlers"):
            p.timer_handlers(rt)
    rt.timers.register(NOOP, lambda conn, timer: None)
    rt.timers.batch_size = n
    rows = []
    try:
        for what, arm in (
            ("no-op timer", lambda: support_data.noop_timers(raw.engine, NOOP, n, 1e6, -1)),
            ("SLA first-response breach", lambda: support_data.arm_due(raw.engine, n, 1e6, -1, N_DUE)),
        ):
            arm()
            raw.captured, raw.sql_ms, raw.each_ms = [], 0.0, []
            t0 = time.perf_counter()
            fired = 0
            while True:
                k = rt.timers.run_once()
                fired += k
                if not k:
                    break
            total = (time.perf_counter() - t0) * 1000
            stmts = [" ".join(s.split()) for s, _ in raw.captured]
            claim = sum(t for s, t in zip(stmts, raw.each_ms, strict=False) if "SET lease_token" in s)
            book = sum(
                t
                for s, t in zip(stmts, raw.each_ms, strict=False)
                if s.startswith(("INSERT INTO timer_firings", "SELECT timers.lease_token", "WITH v AS"))
                or s.startswith(("SAVEPOINT", "RELEASE SAVEPOINT", "ROLLBACK TO SAVEPOINT", "SET LOCAL lock_timeout"))
                or s.startswith("SELECT timers.id FROM timers")
                or ("FROM timers" in s and "FOR UPDATE" in s and "clock_timestamp" in s)
                or (s.startswith("DELETE FROM timers WHERE timers.id ="))
            )
            per = max(fired, 1)
            rows.append(
                {
                    "what": what,
                    "fired": fired,
                    "ms_per_firing": ms(total / per),
                    "statements_per_firing": round(len(stmts) / per, 1),
                    "claim_sql_ms": ms(claim / per),
                    "timer_bookkeeping_sql_ms": ms(book / per),
                    "handler_sql_ms": ms((raw.sql_ms - claim - book) / per),
                    "python_and_commit_ms": ms((total - raw.sql_ms) / per),
                    "slowest": max(((t, s[:70]) for s, t in zip(stmts, raw.each_ms, strict=False)), default=(0, ""))[1],
                }
            )
    finally:
        raw.close()
    return rows


def timers_section(engine, url: str, amqp: str) -> tuple[list[dict], dict]:
    say(f"  {N_DUE:,} no-op timers, {RATE:.0f} due/s from now + {LEAD:.0f} s (TimerWorker in the bench process)")
    base = noop_run(engine, N_DUE, RATE)
    say(f"    {base}")
    say(f"  {N_DUE:,} SLA first-response breaches due {RATE:.0f}/s (support-svc + {TIMER_PROCS} work process(es))")
    real = sla_run(engine, N_DUE, 0)
    say(f"    {real}")
    goal = "p99 < 1 s: " + ("met" if real["p99_s"] < TIMER_P99_GOAL_S and not real["not_fired"] else "MISSED")
    rows = [
        {"what": f"no-op timers ({RATE:.0f} due/s), TimerWorker here", **base},
        {"what": f"SLA breaches ({RATE:.0f} due/s), support-svc x{1 + TIMER_PROCS} proc", **real, "goal": goal},
    ]
    return rows, {}


# -- 2. re-offers ----------------------------------------------------------------------------------


def offers_section(engine, team: str) -> list[dict]:
    base = noop_run(engine, N_OFFERS, OFFER_RATE)
    start = support_data.arm_offers(engine, team, OFFER_RATE, LEAD)
    _wait_fired(engine, ("offer.expire",), start, N_OFFERS, LEAD + N_OFFERS / OFFER_RATE + GRACE)
    with engine.connect() as conn:
        gaps = conn.execute(
            sa.text(
                """
            SELECT extract(epoch FROM n.offer_time - e.expire_time)
              FROM ticket_offers e JOIN ticket_offers n ON n.ticket_id = e.ticket_id AND n.attempt = e.attempt + 1
             WHERE e.team_id = CAST(:t AS uuid) AND e.state = 'expired' AND e.expire_time >= to_timestamp(:s)
            """
            ),
            {"t": team, "s": start},
        ).scalars()
        gaps = [float(g) for g in gaps]
        pending = conn.execute(
            sa.text(
                "SELECT count(*) FROM ticket_offers WHERE team_id = CAST(:t AS uuid) AND attempt = 1 AND state = 'offered'"
            ),
            {"t": team},
        ).scalar()
    lat = _lateness(engine, ("offer.expire",), start, N_OFFERS, 0)
    return [
        {"what": f"no-op timer lateness ({OFFER_RATE:.0f} due/s)", "n": base["fired"], **_s(base)},
        {
            "what": f"expire_time -> next offer_time ({OFFER_RATE:.0f} expiring/s)",
            "n": len(gaps),
            "p50_s": round(pct(gaps, 50), 3),
            "p95_s": round(pct(gaps, 95), 3),
            "p99_s": round(pct(gaps, 99), 3),
            "max_s": round(max(gaps), 3) if gaps else 0,
            "not_reoffered": N_OFFERS - len(gaps),
            "still_pending": pending,
        },
        {"what": "  offer.expire timer lateness", "n": lat["fired"], **_s(lat)},
    ]


def _s(d: dict) -> dict:
    return {k: d[k] for k in ("p50_s", "p95_s", "p99_s", "max_s")}


# -- 3. CreateTicket ----------------------------------------------------------------------------------


class Requests:
    def __init__(self, team: str, category: str):
        self.team, self.category = team, category
        self.run = uuid.uuid4().hex[:8]
        self.n = itertools.count()

    def ticket(self) -> tickets_pb2.CreateTicketRequest:
        i = next(self.n)
        t = ticket_pb2.Ticket(
            subject=f"قطع شدن اینترنت پس از پرداخت قبض {i}",
            channel=ticket_pb2.CHANNEL_EMAIL,
            contact_address=f"bench-{self.run}-{i}@example.com",
            contact_name="علی رضایی",
            category=f"categories/{self.category}",
            team=f"teams/{self.team}",
        )
        return tickets_pb2.CreateTicketRequest(ticket=t, body=support_data.BODY, request_id=f"bench-{self.run}-{i}")

    def minimal(self) -> customer_service_pb2.CreateCustomerRequest:
        i = next(self.n)
        return customer_service_pb2.CreateCustomerRequest(
            customer=customer_pb2.Customer(given_name="علی", family_name=f"رضایی{i}")
        )


def create_section(ch, reqs: Requests, baseline) -> list[dict]:
    meta = md("admin", "bench")
    stub = tickets_pb2_grpc.TicketServiceStub(ch)
    health = health_pb2_grpc.HealthStub(ch)
    stub.CreateTicket(reqs.ticket(), metadata=meta, timeout=30)
    empty = health_pb2.HealthCheckRequest()
    rows = []
    for conc in (1, 8):
        ceiling = load.run("empty RPC (health Check)", lambda: health.Check.future(empty), conc, SECONDS)
        minimal = load.run(
            "MinimalWrite (INSERT + outbox INSERT)",
            lambda: baseline.MinimalWrite.future(reqs.minimal(), metadata=meta, timeout=30),
            conc,
            SECONDS,
        )
        create = load.run(
            "CreateTicket (email, category, team)",
            lambda: stub.CreateTicket.future(reqs.ticket(), metadata=meta, timeout=30),
            conc,
            SECONDS,
        )
        for r, base in ((ceiling, None), (minimal, None), (create, minimal)):
            row = r.row(ceiling, (50, 95, 99))
            if base:
                ratio = round(r.rps / base.rps, 3) if base.rps else 0
                row["ratio_to_minimal"] = ratio
                row["goal"] = ">= 0.75: " + ("met" if ratio >= CREATE_RATIO_GOAL else "MISSED")
            rows.append(row)
        say(f"  {conc} caller(s): minimal {minimal.rps:.0f} rps, CreateTicket {create.rps:.0f} rps")
    return rows


def create_profile(url: str, amqp: str, reqs: Requests) -> list[dict]:
    from bench.baseline_server import TABLE
    from crm.customer.v1 import customer_events_pb2
    from crm_chassis.service import ServiceContext
    from support_svc import tickets_api
    from support_svc.__main__ import PARTS
    from support_svc.runtime import support

    raw = RawSql(url)
    ctx = ServiceContext(settings=service_settings("support-svc", url, amqp), engine=raw.engine, database_url=url)
    rt = support(ctx, PARTS)
    uc = tickets_api.use_cases(rt)
    admin = Principal("bench", ("admin",))

    def minimal():
        cid = str(uuid.uuid4())
        out = customer_pb2.Customer(name=f"customers/{cid}", given_name="a", family_name="b")
        with rt.uow.begin() as tx:
            tx.execute(TABLE.insert(), {"id": cid, "given_name": "a", "family_name": "b"})
            tx.publish("customer.created.v1", customer_events_pb2.CustomerCreated(customer=out), out.name)

    try:
        return [
            {"what": "MinimalWrite's work", **raw.profile(minimal)},
            {"what": "CreateTicket's use case", **raw.profile(lambda: uc.create(reqs.ticket(), admin))},
        ]
    finally:
        raw.close()


# -- 4. mail-in ----------------------------------------------------------------------------------------


def _mail(i: int, run: str, to: str) -> EmailMessage:
    m = EmailMessage()
    m["From"] = f"مشتری {i} <mail-{run}-{i}@example.com>"
    m["To"] = to
    m["Subject"] = f"مشکل در اتصال اینترنت شماره {i}"
    m["Message-ID"] = make_msgid(f"bench{run}{i}", "example.com")
    m.set_content(support_data.BODY)
    return m


def smtp_load(port: int, clients: int, seconds: float, to: str) -> dict:
    run = uuid.uuid4().hex[:8]
    counter = itertools.count()
    stats = {"sent": 0, "errors": 0, "lat": []}
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client():
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            while time.perf_counter() < stop_at:
                i = next(counter)
                t0 = time.perf_counter()
                try:
                    s.send_message(_mail(i, run, to), from_addr=f"mail-{run}-{i}@example.com", to_addrs=[to])
                    ok = True
                except smtplib.SMTPException:
                    ok = False
                with lock:
                    stats["sent" if ok else "errors"] += 1
                    stats["lat"].append((time.perf_counter() - t0) * 1000)

    t0 = time.perf_counter()
    ts = [threading.Thread(target=client) for _ in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    took = time.perf_counter() - t0
    return {
        "clients": clients,
        "mails": stats["sent"],
        "errors": stats["errors"],
        "per_second": round(stats["sent"] / took, 1),
        "p50_ms": ms(pct(stats["lat"], 50)),
        "p99_ms": ms(pct(stats["lat"], 99)),
    }


SINK = """
import sys, time
from aiosmtpd.controller import Controller
class H:
    async def handle_DATA(self, server, session, envelope):
        return "250 OK"
c = Controller(H(), hostname="127.0.0.1", port=int(sys.argv[1]))
c.start()
print("ready", flush=True)
sys.stdin.read()
c.stop()
"""


def mail_section(engine, mail_port: int) -> list[dict]:
    sink_port = free_port()
    sink = subprocess.Popen(
        [sys.executable, "-c", SINK, str(sink_port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        sink.stdout.readline()
        rows = []
        for clients in (1, MAIL_CLIENTS):
            with engine.connect() as conn:
                before = conn.execute(sa.text("SELECT count(*) FROM tickets")).scalar()
            base = smtp_load(sink_port, clients, SECONDS, "team0@bench.local")
            real = smtp_load(mail_port, clients, SECONDS, "team0@bench.local")
            with engine.connect() as conn:
                made = conn.execute(sa.text("SELECT count(*) FROM tickets")).scalar() - before
            rows.append({"what": "no-op aiosmtpd sink (own process)", **base})
            rows.append(
                {
                    "what": "support-svc mail-in -> new tickets",
                    **real,
                    "tickets_created": made,
                    "ratio_to_sink": round(real["per_second"] / base["per_second"], 3) if base["per_second"] else 0,
                }
            )
            say(f"  {clients} client(s): sink {base['per_second']}/s, mail-in {real['per_second']}/s ({made} tickets)")
        return rows
    finally:
        sink.stdin.close()
        sink.wait(10)


# -- 5. queue view ------------------------------------------------------------------------------------------


def queue_section(ch, raw: RawSql, team: str) -> tuple[list[dict], dict]:
    from support_svc.queue import QueueServicer

    stub = queue_pb2_grpc.QueueServiceStub(ch)
    health = health_pb2_grpc.HealthStub(ch)
    meta = md("admin", "bench")
    rows = [
        lat_row("empty RPC (health Check)", timed(lambda: health.Check(health_pb2.HealthCheckRequest()), QUEUE_CALLS))
    ]
    servicer = QueueServicer(SimpleNamespace(engine=raw.engine))
    plans = {}
    for label, req in (
        ("all teams", queue_pb2.GetQueueViewRequest()),
        ("one team (team 0)", queue_pb2.GetQueueViewRequest(team=f"teams/{team}")),
    ):
        resp = stub.GetQueueView(req, metadata=meta, timeout=60)
        vals = timed(lambda req=req: stub.GetQueueView(req, metadata=meta, timeout=60), QUEUE_CALLS)
        stmts = raw.capture(lambda req=req: servicer.GetQueueView(req, None))
        sql = raw.timed(stmts, QUEUE_CALLS)
        plans[label] = raw.explain(stmts)
        open_n = sum(t.open + t.waiting_on_customer + t.waiting_on_third_party for t in resp.teams)
        p95 = pct(vals, 95)
        rows.append(
            lat_row(
                f"GetQueueView {label}: {len(resp.teams)} teams, {len(resp.agents)} agents, {open_n:,} open",
                vals,
                sql_p50_ms=ms(pct(sql, 50)),
                sql_p95_ms=ms(pct(sql, 95)),
                goal="p95 < 50 ms: " + ("met" if p95 < QUEUE_P95_GOAL_MS else "MISSED"),
            )
        )
        rows.append(lat_row(f"  its SQL, raw psycopg ({len(stmts)} statements)", sql))
        say(f"  {label}: p50 {pct(vals, 50):.1f} ms, p95 {p95:.1f} ms; SQL p50 {pct(sql, 50):.1f} ms")
    return rows, plans


# -- main ---------------------------------------------------------------------------------------------------


def main() -> int:
    from bench.baseline_server import stubs

    say(
        f"support bench: {platform.node()} {os.cpu_count()} cores, python {platform.python_version()}, "
        f"grpcio {grpc.__version__}; {N_TICKETS:,} open tickets; timers {RATE:.0f}/s over {WINDOW:.0f} s; "
        f"{SECONDS:.0f} s per throughput measurement; load average {loadavg()} (the machine is shared)"
    )
    stamp = f"{dt.datetime.now():%Y%m%d-%H%M%S}"
    RESULTS.mkdir(exist_ok=True)
    out: dict = {"tickets": N_TICKETS, "timer_rate": RATE, "timer_window": WINDOW, "timer_procs": 1 + TIMER_PROCS}
    out["loadavg_start"] = os.getloadavg()
    dbs, broker = Databases(), Broker()
    procs: list = []
    raw = engine = None
    try:
        say("\n== load ==")
        url = dbs.fresh("bench_support")
        t0 = time.perf_counter()
        migrate(url, SPEC.migrations)
        engine = create_engine(url, pool_size=2)
        ids = support_data.load(engine, N_TICKETS, N_DUE + 200, N_OFFERS, say=say)
        with engine.connect() as conn:
            size = conn.execute(sa.text("SELECT pg_size_pretty(pg_database_size(current_database()))")).scalar()
        out["load"] = {"seconds": round(time.perf_counter() - t0, 1), "database_size": size, **ids}
        say(f"  database {size}; load average {loadavg()}")

        if "timers" in SECTIONS:  # before the service runs: its worker would take these timers
            say("\n  where a firing's time goes (in-process, run_once over 200 due timers, every statement timed)")
            out["timer_profile"] = firing_profile(url, broker.url)
        log = RESULTS / f"support-{stamp}-support-svc.log"
        mail_port = free_port()
        env = {"MAIL_IN_PORT": str(mail_port), "MAIL_DOMAIN": "bench.local"}
        proc, port = start_service_process("support-svc", "bench.baseline_server", url, broker.url, log, **env)
        procs.append(proc)
        for _ in range(TIMER_PROCS):
            wenv = dict(
                os.environ,
                SERVICE_NAME="support-svc",
                DATABASE_URL=url,
                AMQP_URL=broker.url,
                JWT_SECRET=DEFAULT_JWT_SECRET,
                LOG_LEVEL="WARNING",
                GRPC_PORT=str(free_port()),
            )
            lf = open(log, "ab")  # noqa: SIM115
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "support_svc", "work"],
                    env=wenv,
                    cwd=ROOT,
                    stdout=lf,
                    stderr=subprocess.STDOUT,
                )
            )
            lf.close()
        say(
            f"  support-svc :{port}, mail-in :{mail_port} (log {log.relative_to(ROOT)}), {TIMER_PROCS} work process(es)"
        )
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        _, baseline_grpc = stubs()
        baseline = baseline_grpc.BaselineServiceStub(ch)
        reqs = Requests(ids["team0"], ids["category"])

        if "timers" in SECTIONS:
            say(f"\n== timers: {RATE:.0f} due/s for {WINDOW:.0f} s, lateness (fired - due) ==")
            rows, detail = timers_section(engine, url, broker.url)
            say(
                table(rows, ["what", "fired", "not_fired", "firings_per_s", "p50_s", "p95_s", "p99_s", "max_s", "goal"])
            )
            say("\nwhere a firing's time goes (in-process before the service started, run_once over 200 due timers)")
            say(
                table(
                    out["timer_profile"],
                    [
                        "what",
                        "fired",
                        "ms_per_firing",
                        "statements_per_firing",
                        "claim_sql_ms",
                        "timer_bookkeeping_sql_ms",
                        "handler_sql_ms",
                        "python_and_commit_ms",
                    ],
                )
            )
            out["timers"] = {"rows": rows, **detail}
        if "offers" in SECTIONS:
            say(f"\n== re-offers: {N_OFFERS:,} pending offers expire {OFFER_RATE:.0f}/s (team of 50 online agents) ==")
            rows = offers_section(engine, ids["offers_team"])
            say(table(rows, ["what", "n", "p50_s", "p95_s", "p99_s", "max_s", "not_reoffered", "still_pending"]))
            out["offers"] = rows
        if "create" in SECTIONS:
            say("\n== CreateTicket vs MinimalWrite on the same server ==")
            rows = create_section(ch, reqs, baseline)
            cols = ["what", "callers", "calls", "errors", "rps", "p50_ms", "p95_ms", "p99_ms", "ratio_to_ceiling"]
            say(table(rows, [*cols, "ratio_to_minimal", "goal"]))
            say("\nwhere a create's time goes: the same work in-process (no gRPC), 50 calls, one at a time")
            prof = create_profile(url, broker.url, reqs)
            say(
                table(
                    prof,
                    [
                        "what",
                        "in_process_p50_ms",
                        "statements_per_call",
                        "sql_p50_ms",
                        "server_planning_ms",
                        "server_execution_ms",
                        "commit_and_python_p50_ms",
                        "slowest_p50_ms",
                        "slowest_statement",
                    ],
                )
            )
            for st in prof[1]["statements"]:
                say(f"    {st['p50_ms']:6.2f} ms  {st['statement'][:110]}")
            out["create"] = {"rows": rows, "in_process": prof}
        if "mail" in SECTIONS:
            say(f"\n== inbound mail -> tickets ({SECONDS:.0f} s per measurement) ==")
            rows = mail_section(engine, mail_port)
            say(
                table(
                    rows,
                    [
                        "what",
                        "clients",
                        "mails",
                        "errors",
                        "per_second",
                        "p50_ms",
                        "p99_ms",
                        "tickets_created",
                        "ratio_to_sink",
                    ],
                )
            )
            out["mail"] = rows
        if "queue" in SECTIONS:
            say(f"\n== GetQueueView ({QUEUE_CALLS} calls each, one at a time) ==")
            raw = RawSql(url)
            rows, plans = queue_section(ch, raw, ids["team0"])
            say(table(rows, ["what", "calls", "p50_ms", "p95_ms", "p99_ms", "sql_p50_ms", "sql_p95_ms", "goal"]))
            out["queue"] = {"rows": rows, "plans": plans}
        ch.close()
    finally:
        if raw is not None:
            raw.close()
        if engine is not None:
            engine.dispose()
        for p in reversed(procs):
            p.terminate()
            p.wait(30)
        dbs.drop_all()
        broker.close()
    out["loadavg_end"] = os.getloadavg()
    say(f"\nload average at the end: {loadavg()}")
    path = RESULTS / f"support-{stamp}.json"
    path.write_text(json.dumps(out, indent=2, default=str, ensure_ascii=False))
    (RESULTS / f"support-{stamp}.txt").write_text(OUT.getvalue())
    say(f"saved {path.relative_to(ROOT)} and .txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
