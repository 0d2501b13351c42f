"""sales-svc at scale: `python -m bench.sales_bench`.

A fresh sales database migrated to head and loaded by bench/sales_data.py (set-based SQL):
teams and reps, two pipelines, BENCH_SALES_LEADS leads and BENCH_SALES_OPPORTUNITIES
opportunities (BENCH_SALES_OPEN open), one line each. sales-svc runs as its own process with the
baselines on the same server (bench/baseline_server.py, BENCH_SERVICE=sales_svc) and talks to
a customer-svc process of its own (CUSTOMER_SVC_ADDR) on another fresh database. Every figure
sits beside a baseline measured in the same run:

1. GetPipelineBoard of pipeline 'Bench A' (BENCH_BOARD_CALLS calls, one at a time) as admin, a
   manager (mgr7) and a rep (rep7), and mgr4 / rep4 (mgr7's and rep7's records are all in
   pipeline B, see CALLERS): p50/p95/p99 beside the empty RPC (health Check) and beside the
   service's statements (captured by running sales_svc.opportunities_board in-process)
   replayed with plain psycopg. Goal p95 < 50 ms.
2. GetForecast of a Jalali quarter by owner (BENCH_FORECAST_CALLS calls) as admin and as the
   managers mgr7 and mgr4: p50/p95 beside the captured SQL. Goal p95 < 300 ms.
3. ListOpportunities and ListLeads (page_size 50, newest first, as admin): the keyset tokens
   walked to page BENCH_LIST_PAGE, page 1 vs the deep page (p50 of 30 calls each) beside the
   captured keyset SQL. Goal: alike (read here as the deep page's p50 at most 1.5 x page 1's).
4. CreateOpportunity and CreateLead at 1 and 8 callers beside MinimalWrite (an INSERT and an
   outbox INSERT, same server) and the empty RPC. Goal CreateX / MinimalWrite >= 0.75. Then the
   same work in-process (no gRPC): its statements, their client-side time, and their server
   planning and execution time from EXPLAIN ANALYZE replayed in a rolled-back transaction.
5. ConvertLead (BENCH_CONVERT fresh leads, one at a time): p50/p95 beside CreateCustomer on the
   same customer-svc (the call ConvertLead makes) and CreateOpportunity.

EXPLAIN (ANALYZE, BUFFERS) of the board, forecast and deep-page statements is saved in the
JSON (bench/results/sales-<stamp>.json), the services' logs beside it.

Settings: BENCH_SALES_OPPORTUNITIES (1000000), BENCH_SALES_LEADS (1000000), BENCH_SALES_OPEN
(100000), BENCH_SECONDS (per throughput measurement, 5), BENCH_LIST_PAGE (10000),
BENCH_BOARD_CALLS (300), BENCH_FORECAST_CALLS (100), BENCH_CONVERT (300), BENCH_FORECAST_PERIOD
(1404-Q2), BENCH_SECTIONS (comma list of board,forecast,list,create,convert; default all).
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import platform
import sys
import time
import uuid
from types import SimpleNamespace

import grpc
import psycopg
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import load, sales_data
from bench.__main__ import start_customer_svc, start_service_process
from bench.load import pct, table
from crm.customer.v1 import customer_pb2, customer_service_pb2, customer_service_pb2_grpc
from crm.sales.v1 import (
    conversion_pb2,
    conversion_pb2_grpc,
    forecasts_pb2,
    forecasts_pb2_grpc,
    leads_pb2,
    leads_pb2_grpc,
    opportunities_pb2,
    opportunities_pb2_grpc,
)
from crm.type.v1 import money_pb2
from crm_chassis.auth import Principal
from crm_chassis.config import DEFAULT_JWT_SECRET
from crm_chassis.db import create_engine, migrate
from crm_chassis.uow import UnitOfWork
from sales_svc.__main__ import SPEC
from tests.support.harness import ROOT, Broker, Databases, md

N_OPPS = int(os.environ.get("BENCH_SALES_OPPORTUNITIES", "1000000"))
N_LEADS = int(os.environ.get("BENCH_SALES_LEADS", "1000000"))
N_OPEN = int(os.environ.get("BENCH_SALES_OPEN", "100000"))
SECONDS = float(os.environ.get("BENCH_SECONDS", "5"))
LIST_PAGE = int(os.environ.get("BENCH_LIST_PAGE", "10000"))
BOARD_CALLS = int(os.environ.get("BENCH_BOARD_CALLS", "300"))
FORECAST_CALLS = int(os.environ.get("BENCH_FORECAST_CALLS", "100"))
CONVERT = int(os.environ.get("BENCH_CONVERT", "300"))
FORECAST_PERIOD = os.environ.get("BENCH_FORECAST_PERIOD", "1404-Q2")
SECTIONS = set((os.environ.get("BENCH_SECTIONS") or "board,forecast,list,create,convert").split(","))
RESULTS = ROOT / "bench" / "results"
BOARD_P95_GOAL_MS = 50.0
FORECAST_P95_GOAL_MS = 300.0
CREATE_RATIO_GOAL = 0.75
PAGE_SIZE = 50
REPS = 30  # calls per list page measured


def say(msg: str = "") -> None:
    print(msg, flush=True)


def ms(x: float) -> float:
    return round(x, 2)


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def pg_url(url: str) -> str:
    """A SQLAlchemy URL as a libpq one for psycopg."""
    return sa.engine.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def timed(call, n: int, warmup: int = 3) -> list[float]:
    """ms of each of n blocking calls, one at a time, after a few warm-up calls."""
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


# -- the service's SQL, captured in-process -------------------------------------------------------


class RawSql:
    """The statements sales-svc sends for a call, captured by running its use cases in-process
    against a stand-in for `sales` (its uow.read() a connection of a capturing engine), then
    replayed with a plain psycopg connection: the database's share of the call."""

    def __init__(self, url: str):
        self.engine = create_engine(url, pool_size=1)
        with self.engine.connect() as conn:  # the dialect's first-connect queries, not captured
            conn.exec_driver_sql("SELECT 1")
        self.captured: list[tuple[str, dict]] = []
        self.sql_ms = 0.0
        self.each_ms: list[float] = []
        sa.event.listen(self.engine, "before_cursor_execute", self._grab)
        sa.event.listen(self.engine, "after_cursor_execute", self._done)
        settings = SimpleNamespace(jwt_secret=DEFAULT_JWT_SECRET, service_name="sales-svc")
        uow = UnitOfWork(self.engine, None, source_service="sales-svc", event_domain="sales")
        self.sales = SimpleNamespace(
            uow=uow, ctx=SimpleNamespace(settings=settings), phone_region="IR", extra={}, engine=self.engine
        )
        self.conn = psycopg.connect(pg_url(url), autocommit=True)

    def _grab(self, conn, _cursor, statement, parameters, _context, _executemany):
        many = isinstance(parameters, list | tuple)
        self.captured.append((statement, parameters if many else dict(parameters or {})))
        conn.info["bench_t0"] = time.perf_counter()

    def _done(self, conn, *_args):
        took = (time.perf_counter() - conn.info.pop("bench_t0", time.perf_counter())) * 1000
        self.sql_ms += took
        self.each_ms.append(took)

    def profile(self, fn, n: int = 50) -> dict:
        """fn() run in-process n times (no gRPC): its wall time, its statements and the time
        spent in each (cursor execute to return; the commit is in the rest), and EXPLAIN ANALYZE of
        the last call's statements replayed in a transaction that is rolled back."""
        fn()
        totals, sqls, each = [], [], []
        for _ in range(n):
            self.captured, self.sql_ms, self.each_ms = [], 0.0, []
            t0 = time.perf_counter()
            fn()
            totals.append((time.perf_counter() - t0) * 1000)
            sqls.append(self.sql_ms)
            each.append(self.each_ms)
        width = min(len(e) for e in each)
        stmts = [
            {"statement": " ".join(st.split())[:160], "p50_ms": ms(pct([e[i] for e in each], 50))}
            for i, (st, _) in enumerate(self.captured[:width])
        ]
        plans = []
        with self.conn.transaction(force_rollback=True):
            for st, params in self.captured:
                if isinstance(params, list | tuple):
                    params = params[0] if params else {}
                try:
                    with self.conn.transaction():
                        rows = self.conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + st, params).fetchall()
                    plans.append({"statement": " ".join(st.split())[:160], "plan": [r[0] for r in rows]})
                except psycopg.Error as e:
                    plans.append({"statement": " ".join(st.split())[:160], "error": str(e).strip()})

        def server_ms(label: str):  # summed over the replayed statements; "" if none replayed
            got = [
                float(line.split(":")[1].split()[0])
                for p in plans
                for line in p.get("plan", [])
                if line.startswith(label)
            ]
            return ms(sum(got)) if got else ""

        return {
            "in_process_p50_ms": ms(pct(totals, 50)),
            "statements_per_call": max(len(e) for e in each),
            "server_planning_ms": server_ms("Planning Time:"),
            "server_execution_ms": server_ms("Execution Time:"),
            "replayed": f"{sum('plan' in p for p in plans)}/{len(plans)}",
            "sql_p50_ms": ms(pct(sqls, 50)),
            "commit_and_python_p50_ms": ms(pct([t - q for t, q in zip(totals, sqls, strict=True)], 50)),
            "slowest_statement": max(stmts, key=lambda x: x["p50_ms"])["statement"][:60] if stmts else "",
            "slowest_p50_ms": max((x["p50_ms"] for x in stmts), default=0),
            "statements": stmts,
            "plans": plans,
        }

    def capture(self, fn) -> list[tuple[str, dict]]:
        self.captured = []
        fn()
        return list(self.captured)

    def timed(self, stmts: list[tuple[str, dict]], n: int, warmup: int = 2) -> list[float]:
        """ms per run of all the statements in turn."""
        for _ in range(warmup):
            for stmt, params in stmts:
                self.conn.execute(stmt, params).fetchall()
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            for stmt, params in stmts:
                self.conn.execute(stmt, params).fetchall()
            out.append((time.perf_counter() - t0) * 1000)
        return out

    def explain(self, stmts: list[tuple[str, dict]]) -> list[list[str]]:
        """EXPLAIN (ANALYZE, BUFFERS) of each SELECT among the statements."""
        plans = []
        for stmt, params in stmts:
            if stmt.lstrip().upper().startswith(("SELECT", "WITH")):
                rows = self.conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + stmt, params).fetchall()
                plans.append([r[0] for r in rows])
        return plans

    def close(self) -> None:
        self.conn.close()
        self.engine.dispose()


def principal_of(roles: str, sub: str) -> Principal:
    return Principal(sub, (roles,))


# The brief's manager and rep (mgr7, rep7: sales_data.load returns them) and, beside them, a pair
# whose records are in pipeline 'Bench A' and include won ones: in sales_data, rep k owns
# opportunities g = k (mod 200), the pipeline is A for g % 10 < 7 and a closed one is won for g
# even, so rep7's (and mgr7's team's) are all in pipeline B and none won; rep4 / mgr4's are in A.
CALLERS = [
    ("admin", "admin", "bench"),
    ("manager", "sales_manager", "mgr7"),
    ("rep", "sales_rep", "rep7"),
    ("manager", "sales_manager", "mgr4"),
    ("rep", "sales_rep", "rep4"),
]
FORECAST_CALLERS = [CALLERS[0], CALLERS[1], CALLERS[3]]


# -- 1. the pipeline board ---------------------------------------------------------------------------


def board_section(ch, raw: RawSql, ids: dict) -> tuple[list[dict], dict]:
    from sales_svc.opportunities_board import board

    stub = opportunities_pb2_grpc.OpportunityServiceStub(ch)
    health = health_pb2_grpc.HealthStub(ch)
    req = opportunities_pb2.GetPipelineBoardRequest(pipeline=f"pipelines/{ids['pipeline']}")
    empty = health_pb2.HealthCheckRequest()
    rows = [lat_row("empty RPC (health Check)", timed(lambda: health.Check(empty), BOARD_CALLS))]
    detail = {"pipeline": req.pipeline, "plans": {}, "counts": {}}
    for label, role, sub in CALLERS:
        meta = md(role, sub)
        resp = stub.GetPipelineBoard(req, metadata=meta, timeout=60)
        detail["counts"][sub] = resp.total_count
        vals = timed(lambda meta=meta: stub.GetPipelineBoard(req, metadata=meta, timeout=60), BOARD_CALLS)
        stmts = raw.capture(lambda role=role, sub=sub: board(raw.sales.uow, req, principal_of(role, sub)))
        sql = raw.timed(stmts, BOARD_CALLS)
        detail["plans"][sub] = raw.explain(stmts)
        p95 = pct(vals, 95)
        rows.append(
            lat_row(
                f"GetPipelineBoard as {label} ({sub}), {resp.total_count:,} open in scope",
                vals,
                sql_p50_ms=ms(pct(sql, 50)),
                sql_p95_ms=ms(pct(sql, 95)),
                goal="p95 < 50 ms: " + ("met" if p95 < BOARD_P95_GOAL_MS else "MISSED"),
            )
        )
        rows.append(lat_row(f"  its SQL, raw psycopg ({len(stmts)} statement(s))", sql))
        say(f"  {label} {sub}: p50 {pct(vals, 50):.1f} ms, p95 {p95:.1f} ms; SQL p50 {pct(sql, 50):.1f} ms")
    return rows, detail


# -- 2. the forecast ------------------------------------------------------------------------------------


def forecast_section(ch, raw: RawSql) -> tuple[list[dict], dict]:
    from sales_svc.forecasts import Forecasts

    stub = forecasts_pb2_grpc.ForecastServiceStub(ch)
    req = forecasts_pb2.GetForecastRequest(period=FORECAST_PERIOD, group_by="owner")
    uc = Forecasts(raw.sales)
    rows, detail = [], {"period": FORECAST_PERIOD, "group_by": "owner", "plans": {}, "answers": {}}
    for label, role, sub in FORECAST_CALLERS:
        meta = md(role, sub)
        resp = stub.GetForecast(req, metadata=meta, timeout=120)
        t = resp.period_totals[0].figures if resp.period_totals else None
        detail["answers"][sub] = {
            "rows": len(resp.rows),
            "open_count": t.open_count if t else 0,
            "won_count": t.won_count if t else 0,
            "period": [f"{p.start_date.year}-{p.start_date.month:02}-{p.start_date.day:02}" for p in resp.periods],
        }
        vals = timed(lambda meta=meta: stub.GetForecast(req, metadata=meta, timeout=120), FORECAST_CALLS)
        stmts = raw.capture(lambda role=role, sub=sub: uc.get_forecast(req, principal_of(role, sub)))
        sql = raw.timed(stmts, FORECAST_CALLS)
        detail["plans"][sub] = raw.explain(stmts)
        p95 = pct(vals, 95)
        what = (
            f"GetForecast {FORECAST_PERIOD} by owner as {label} ({sub}): {len(resp.rows)} rows, "
            f"{t.open_count if t else 0:,} open + {t.won_count if t else 0:,} won"
        )
        rows.append(
            lat_row(
                what,
                vals,
                sql_p50_ms=ms(pct(sql, 50)),
                sql_p95_ms=ms(pct(sql, 95)),
                goal="p95 < 300 ms: " + ("met" if p95 < FORECAST_P95_GOAL_MS else "MISSED"),
            )
        )
        rows.append(lat_row(f"  its SQL, raw psycopg ({len(stmts)} statement(s))", sql))
        say(f"  {label} {sub}: p50 {pct(vals, 50):.1f} ms, p95 {p95:.1f} ms; SQL p50 {pct(sql, 50):.1f} ms")
    return rows, detail


# -- 3. list pages ----------------------------------------------------------------------------------------


def _walk(page, label: str) -> tuple[int, str, dict]:
    """Walk the keyset tokens to page LIST_PAGE: (the deep page's number, its token, stats)."""
    walk_ms: list[float] = []
    t_walk = time.perf_counter()
    n, token, used = 0, "", ""
    while True:
        used = token  # the token of page n + 1
        t0 = time.perf_counter()
        resp = page(token)
        walk_ms.append((time.perf_counter() - t0) * 1000)
        n += 1
        if n % 2000 == 0:
            say(f"    {label}: walked {n:,} pages ({time.perf_counter() - t_walk:.0f} s)")
        if not resp.next_page_token or n >= LIST_PAGE:
            break
        token = resp.next_page_token
    stats = {
        "pages_walked": n,
        "walk_seconds": round(time.perf_counter() - t_walk, 1),
        "walk_p50_ms": ms(pct(walk_ms, 50)),
        "first_100_pages_p50_ms": ms(pct(walk_ms[:100], 50)),
        "last_100_pages_p50_ms": ms(pct(walk_ms[-100:], 50)),
    }
    return n, used, stats


def list_section(ch, raw: RawSql) -> tuple[list[dict], dict]:
    from sales_svc.leads import Leads
    from sales_svc.opportunities import OpportunityUseCases

    meta = md("admin", "bench")
    admin = principal_of("admin", "bench")
    opp_stub = opportunities_pb2_grpc.OpportunityServiceStub(ch)
    lead_stub = leads_pb2_grpc.LeadServiceStub(ch)
    opp_uc, lead_uc = OpportunityUseCases(raw.sales), Leads(raw.sales)
    kinds = [
        (
            "ListOpportunities",
            lambda tok: opp_stub.ListOpportunities(
                opportunities_pb2.ListOpportunitiesRequest(page_size=PAGE_SIZE, page_token=tok),
                metadata=meta,
                timeout=60,
            ),
            lambda tok: opp_uc.list(
                opportunities_pb2.ListOpportunitiesRequest(page_size=PAGE_SIZE, page_token=tok), admin
            ),
            lambda r: [x.name for x in r.opportunities],
        ),
        (
            "ListLeads",
            lambda tok: lead_stub.ListLeads(
                leads_pb2.ListLeadsRequest(page_size=PAGE_SIZE, page_token=tok), metadata=meta, timeout=60
            ),
            lambda tok: lead_uc.list(leads_pb2.ListLeadsRequest(page_size=PAGE_SIZE, page_token=tok), admin),
            lambda r: [x.name for x in r.leads],
        ),
    ]
    rows, detail = [], {}
    for label, page, in_process, names in kinds:
        say(f"  {label}: walking the keyset tokens to page {LIST_PAGE:,} (page_size {PAGE_SIZE}, newest first)")
        deep, deep_token, stats = _walk(page, label)
        g1 = timed(lambda page=page: page(""), REPS)
        gd = timed(lambda page=page, tok=deep_token: page(tok), REPS)
        s1_stmts = raw.capture(lambda f=in_process: f(""))
        sd_stmts = raw.capture(lambda f=in_process, tok=deep_token: f(tok))
        s1, sd = raw.timed(s1_stmts, REPS), raw.timed(sd_stmts, REPS)
        stats["deep_page_rows"] = len(names(page(deep_token)))
        stats["plans"] = {"page_1": raw.explain(s1_stmts), f"page_{deep}": raw.explain(sd_stmts)}
        base = pct(g1, 50)
        ratio = pct(gd, 50) / base if base else 0
        for what, p, vals in (
            (f"{label} over gRPC (keyset)", 1, g1),
            (f"{label} over gRPC (keyset)", deep, gd),
            ("  its SQL, raw psycopg", 1, s1),
            ("  its SQL, raw psycopg", deep, sd),
        ):
            rows.append(
                {
                    "what": what,
                    "page": p,
                    "p50_ms": ms(pct(vals, 50)),
                    "p95_ms": ms(pct(vals, 95)),
                    "ratio_to_page_1": round(pct(vals, 50) / base, 2) if base else None,
                }
            )
        rows[-3]["goal"] = "alike (deep/page 1 <= 1.5): " + ("met" if ratio <= 1.5 else "MISSED")
        detail[label] = stats
        say(
            f"  {label}: page 1 p50 {base:.1f} ms, page {deep:,} p50 {pct(gd, 50):.1f} ms ({stats['walk_seconds']} s walk)"
        )
    return rows, detail


# -- 4. creates ----------------------------------------------------------------------------------------------


class Requests:
    """Realistic create requests, a fresh request_id (and contact details) each time (callable
    from the load generator's callback threads: itertools.count is atomic)."""

    def __init__(self, products: list[str]):
        self.products = products
        self.run = uuid.uuid4().hex[:10]
        self.n = itertools.count()

    def _i(self) -> int:
        return next(self.n)

    def lead(self) -> leads_pb2.CreateLeadRequest:
        i = self._i()
        lead = leads_pb2.Lead(
            given_name=sales_data.GIVEN[i % 10],
            family_name=sales_data.FAMILIES[(i // 10) % 10],
            email=f"bench-{self.run}-{i}@example.com",
            mobile=f"+98935{(int(self.run[:6], 16) * 7 + i) % 10_000_000:07d}",
            source=sales_data.SOURCES[i % len(sales_data.SOURCES)],
            province=sales_data.PROVINCES[i % len(sales_data.PROVINCES)],
        )
        return leads_pb2.CreateLeadRequest(lead=lead, request_id=f"bench-lead-{self.run}-{i}")

    def opportunity(self) -> opportunities_pb2.CreateOpportunityRequest:
        i = self._i()
        line = opportunities_pb2.OpportunityLine(
            product=self.products[i % len(self.products)],
            quantity=str(1 + i % 5),
            unit_price=money_pb2.Money(currency_code="IRR", units=25_000_000 + (i % 97) * 100_000),
        )
        opp = opportunities_pb2.Opportunity(
            display_name=f"Bench deal {self.run}-{i}",
            customer=f"customers/{uuid.uuid5(uuid.NAMESPACE_URL, f'cust-{i % 5000}')}",
            contact_name="علی رضایی",
            currency_code="IRR",
            lines=[line],
            source="website",
        )
        return opportunities_pb2.CreateOpportunityRequest(opportunity=opp, request_id=f"bench-opp-{self.run}-{i}")

    def customer(self) -> customer_pb2.Customer:
        i = self._i()
        return customer_pb2.Customer(
            type=customer_pb2.CUSTOMER_TYPE_PERSON,
            given_name=sales_data.GIVEN[i % 10],
            family_name=f"{sales_data.FAMILIES[(i // 10) % 10]}{i}",
            email=f"cust-{self.run}-{i}@example.com",
            mobile=f"+98936{(int(self.run[:6], 16) * 7 + i) % 10_000_000:07d}",
            acquisition_source="website",
        )

    def minimal(self) -> customer_service_pb2.CreateCustomerRequest:
        return customer_service_pb2.CreateCustomerRequest(customer=self.customer())


def create_profiles(raw: RawSql, reqs: Requests) -> list[dict]:
    """Where a create's time goes, in-process on the same database (no gRPC, no interceptors)."""
    from bench.baseline_server import TABLE
    from crm.customer.v1 import customer_events_pb2
    from sales_svc.leads import Leads
    from sales_svc.opportunities import OpportunityUseCases

    admin = principal_of("admin", "bench")
    uow = raw.sales.uow
    opp_uc, lead_uc = OpportunityUseCases(raw.sales), Leads(raw.sales)

    def minimal():
        c = reqs.customer()
        cid = str(uuid.uuid4())
        out = customer_pb2.Customer(name=f"customers/{cid}", given_name=c.given_name, family_name=c.family_name)
        with uow.begin() as tx:
            tx.execute(TABLE.insert(), {"id": cid, "given_name": c.given_name, "family_name": c.family_name})
            tx.publish("customer.created.v1", customer_events_pb2.CustomerCreated(customer=out), out.name)

    rows = []
    for what, fn in (
        ("MinimalWrite's work", minimal),
        ("CreateOpportunity's use case", lambda: opp_uc.create(reqs.opportunity(), admin)),
        ("CreateLead's use case", lambda: lead_uc.create(reqs.lead(), admin)),
    ):
        rows.append({"what": what, **raw.profile(fn)})
    return rows


def create_section(ch, reqs: Requests, baseline) -> tuple[list[dict], dict]:
    meta = md("admin", "bench")
    opp_stub = opportunities_pb2_grpc.OpportunityServiceStub(ch)
    lead_stub = leads_pb2_grpc.LeadServiceStub(ch)
    health = health_pb2_grpc.HealthStub(ch)
    probe = {
        "opportunity": opp_stub.CreateOpportunity(reqs.opportunity(), metadata=meta, timeout=30).name,
        "lead": lead_stub.CreateLead(reqs.lead(), metadata=meta, timeout=30).name,
    }
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
        opp = load.run(
            "CreateOpportunity (1 line)",
            lambda: opp_stub.CreateOpportunity.future(reqs.opportunity(), metadata=meta, timeout=30),
            conc,
            SECONDS,
        )
        lead = load.run(
            "CreateLead", lambda: lead_stub.CreateLead.future(reqs.lead(), metadata=meta, timeout=30), conc, SECONDS
        )
        for r, base in ((ceiling, None), (minimal, None), (opp, minimal), (lead, minimal)):
            row = r.row(ceiling, (50, 95, 99))
            if base:
                ratio = round(r.rps / base.rps, 3) if base.rps else 0
                row["ratio_to_minimal"] = ratio
                row["goal"] = ">= 0.75: " + ("met" if ratio >= CREATE_RATIO_GOAL else "MISSED")
            rows.append(row)
        say(f"  {conc} caller(s): minimal {minimal.rps:.0f} rps, opportunity {opp.rps:.0f}, lead {lead.rps:.0f}")
    return rows, probe


# -- 5. ConvertLead -------------------------------------------------------------------------------------------


def convert_section(ch, cust_ch, reqs: Requests) -> tuple[list[dict], dict]:
    meta = md("admin", "bench")
    lead_stub = leads_pb2_grpc.LeadServiceStub(ch)
    conv_stub = conversion_pb2_grpc.LeadConversionServiceStub(ch)
    opp_stub = opportunities_pb2_grpc.OpportunityServiceStub(ch)
    cust_stub = customer_service_pb2_grpc.CustomerServiceStub(cust_ch)
    warm = 3
    names = [lead_stub.CreateLead(reqs.lead(), metadata=meta, timeout=30).name for _ in range(CONVERT + warm)]
    say(f"  {len(names)} fresh leads created (CreateLead); converting them one at a time")
    it = iter(names)
    created = [0]

    def convert():
        r = conv_stub.ConvertLead(conversion_pb2.ConvertLeadRequest(name=next(it)), metadata=meta, timeout=30)
        created[0] += r.customer_created

    conv = timed(convert, CONVERT, warm)
    cust = timed(
        lambda: cust_stub.CreateCustomer(
            customer_service_pb2.CreateCustomerRequest(customer=reqs.customer(), request_id=f"bench-{uuid.uuid4()}"),
            metadata=meta,
            timeout=30,
        ),
        CONVERT,
    )
    opp = timed(lambda: opp_stub.CreateOpportunity(reqs.opportunity(), metadata=meta, timeout=30), CONVERT)
    parts = pct(cust, 50) + pct(opp, 50)
    rows = [
        lat_row("ConvertLead (customer-svc CreateCustomer + opportunity + lead, 3 transactions)", conv),
        lat_row("CreateCustomer on the same customer-svc (the call ConvertLead makes)", cust),
        lat_row("CreateOpportunity (1 line) on the same sales-svc", opp),
    ]
    rows[0]["ratio_to_parts_p50"] = round(pct(conv, 50) / parts, 2) if parts else None
    say(
        f"  ConvertLead p50 {pct(conv, 50):.1f} ms; CreateCustomer {pct(cust, 50):.1f}; CreateOpportunity {pct(opp, 50):.1f}"
    )
    return rows, {"converted": len(conv), "customers_created": created[0]}


# -- main --------------------------------------------------------------------------------------------------------


def main() -> int:
    from bench.baseline_server import stubs

    say(
        f"sales bench: {platform.node()} {os.cpu_count()} cores, python {platform.python_version()}, "
        f"grpcio {grpc.__version__}; {N_OPPS:,} opportunities ({N_OPEN:,} open), {N_LEADS:,} leads; "
        f"{SECONDS:.0f} s per throughput measurement; load average {loadavg()} (the machine is shared)"
    )
    stamp = f"{dt.datetime.now():%Y%m%d-%H%M%S}"
    RESULTS.mkdir(exist_ok=True)
    out: dict = {
        "opportunities": N_OPPS,
        "open": N_OPEN,
        "leads": N_LEADS,
        "seconds_per_measurement": SECONDS,
        "list_page": LIST_PAGE,
        "loadavg_start": os.getloadavg(),
    }
    dbs, broker = Databases(), Broker()
    procs: list = []
    raw = None
    try:
        say("\n== load ==")
        url = dbs.fresh("bench_sales")
        t0 = time.perf_counter()
        migrate(url, SPEC.migrations)
        say(f"  migrated to head: {time.perf_counter() - t0:.1f} s")
        engine = create_engine(url, pool_size=1)
        ids = sales_data.load(engine, N_LEADS, N_OPPS, N_OPEN, say=say)
        with engine.connect() as conn:
            products = [
                f"products/{p}"
                for p in conn.execute(sa.text("SELECT id FROM products WHERE sku LIKE 'B-%' ORDER BY sku")).scalars()
            ]
            size = conn.execute(sa.text("SELECT pg_size_pretty(pg_database_size(current_database()))")).scalar()
        engine.dispose()
        out["load"] = {"seconds": round(time.perf_counter() - t0, 1), "database_size": size, **ids}
        say(f"  database {size}; load average {loadavg()}")

        cust_log = RESULTS / f"sales-{stamp}-customer-svc.log"
        sales_log = RESULTS / f"sales-{stamp}-sales-svc.log"
        cproc, cport = start_customer_svc(dbs.fresh("bench_sales_customers"), broker.url, cust_log)
        procs.append(cproc)
        proc, port = start_service_process(
            "sales-svc", "bench.baseline_server", url, broker.url, sales_log, CUSTOMER_SVC_ADDR=f"127.0.0.1:{cport}"
        )
        procs.append(proc)
        say(f"  sales-svc :{port} (log {sales_log.relative_to(ROOT)}), customer-svc :{cport}")
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        cust_ch = grpc.insecure_channel(f"127.0.0.1:{cport}")
        raw = RawSql(url)
        _, baseline_grpc = stubs()
        baseline = baseline_grpc.BaselineServiceStub(ch)
        reqs = Requests(products)
        lat_cols = ["what", "calls", "p50_ms", "p95_ms", "p99_ms", "sql_p50_ms", "sql_p95_ms", "goal"]

        if "board" in SECTIONS:
            say(f"\n== GetPipelineBoard 'Bench A' ({BOARD_CALLS} calls each, one at a time) ==")
            rows, out["board"] = board_section(ch, raw, ids)
            out["board"]["rows"] = rows
            say(table(rows, lat_cols))
        if "forecast" in SECTIONS:
            say(f"\n== GetForecast {FORECAST_PERIOD} by owner ({FORECAST_CALLS} calls each, one at a time) ==")
            rows, out["forecast"] = forecast_section(ch, raw)
            out["forecast"]["rows"] = rows
            say(table(rows, lat_cols))
        if "list" in SECTIONS:
            say(f"\n== ListOpportunities / ListLeads: keyset page 1 vs page {LIST_PAGE:,} (p50 of {REPS}) ==")
            rows, out["list"] = list_section(ch, raw)
            out["list"]["rows"] = rows
            say(table(rows, ["what", "page", "p50_ms", "p95_ms", "ratio_to_page_1", "goal"]))
        if "create" in SECTIONS:
            say("\n== CreateOpportunity / CreateLead vs MinimalWrite on the same server ==")
            rows, probe = create_section(ch, reqs, baseline)
            cols = ["what", "callers", "calls", "errors", "rps", "p50_ms", "p95_ms", "p99_ms", "ratio_to_ceiling"]
            say(table(rows, [*cols, "ratio_to_minimal", "goal"]))
            say("\nwhere a create's time goes: the same work in-process (no gRPC), 50 calls, one at a time")
            prof = create_profiles(raw, reqs)
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
                        "replayed",
                        "commit_and_python_p50_ms",
                        "slowest_p50_ms",
                        "slowest_statement",
                    ],
                )
            )
            out["create"] = {"rows": rows, "probe": probe, "in_process": prof}
        if "convert" in SECTIONS:
            say(f"\n== ConvertLead, {CONVERT} fresh leads one at a time (sales-svc -> customer-svc) ==")
            rows, info = convert_section(ch, cust_ch, reqs)
            out["convert"] = {"rows": rows, **info}
            say(table(rows, ["what", "calls", "p50_ms", "p95_ms", "p99_ms", "ratio_to_parts_p50"]))
        ch.close()
        cust_ch.close()
    finally:
        if raw is not None:
            raw.close()
        for p in reversed(procs):
            p.terminate()
            p.wait(30)
        dbs.drop_all()
        broker.close()
    out["loadavg_end"] = os.getloadavg()
    say(f"\nload average at the end: {loadavg()}")
    path = RESULTS / f"sales-{stamp}.json"
    path.write_text(json.dumps(out, indent=2, default=str, ensure_ascii=False))
    say(f"saved {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
