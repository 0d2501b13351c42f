"""customer-svc at scale: `python -m bench.customers_bench`.

1. Bulk load: BENCH_CUSTOMERS (default 1,000,000) generated customers (bench/customers_data.py)
   COPYed straight into a customer-svc database migrated to head, secondary indexes dropped
   and rebuilt around the COPY, then VACUUM ANALYZE. With BENCH_KEEP_DB=1 the loaded database
   (`bench_customers_<N>`) is kept and never written to; each run measures a file copy of it,
   so runs start alike (deleting an earlier run's rows instead left bloated indexes behind and
   made each run slower than the one before).
2. customer-svc as its own process on that database, measured over gRPC on loopback:
   - SearchCustomers: p50/p95/p99 of a few hundred queries of six kinds (full name, family
     name, 3-4 letter prefix, Persian typed with Arabic letters, mobile, typo), one caller,
     beside the same SQL timed directly with psycopg (the statements queries.search_page
     sends, captured in-process) and the empty-RPC ceiling; throughput at 1 and 8 callers.
   - ListCustomers with a filter, keyset pages of 50 walked to page BENCH_LIST_PAGE (10,000):
     page 1 vs the deep page, beside the raw keyset SQL and the OFFSET query of the same page.
   - GetCustomer and CreateCustomer at 1 and 32 callers beside the empty-RPC ceiling (and
     GetCustomer's SELECT through plain psycopg).
   - ImportCustomers of BENCH_IMPORT_ROWS (100,000) rows, ~5% duplicates of existing
     customers, DEDUPE_POLICY_SKIP, if the importer is implemented ("not available yet"
     otherwise), beside validate + search_key + COPY of the same file into a bare table.
Every table is also saved as JSON under bench/results/ (with EXPLAIN ANALYZE of the deep list
page both ways), the service's log beside it.

Settings: BENCH_CUSTOMERS, BENCH_KEEP_DB, BENCH_SECONDS (per throughput measurement, 5),
BENCH_SEARCH_QUERIES (per kind, 50), BENCH_LIST_PAGE (10000), BENCH_IMPORT_ROWS (100000),
BENCH_SECTIONS (comma list of search,list,grpc,import; default all).
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
import uuid

import grpc
import psycopg
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import customers_data as data
from bench import load
from bench.load import pct, table
from crm.customer.v1 import customer_pb2, customer_service_pb2, customer_service_pb2_grpc
from crm_chassis.config import DEFAULT_JWT_SECRET
from crm_chassis.db import create_engine, ensure_database, migrate, with_database
from crm_chassis.pagination import PageTokens
from customer_svc import adapters, queries, service_layer
from customer_svc.__main__ import SPEC
from tests.support.harness import ROOT, Broker, Databases, md

N = int(os.environ.get("BENCH_CUSTOMERS", "1000000"))
KEEP = os.environ.get("BENCH_KEEP_DB", "") == "1"
SECONDS = float(os.environ.get("BENCH_SECONDS", "5"))
PER_KIND = int(os.environ.get("BENCH_SEARCH_QUERIES", "50"))
LIST_PAGE = int(os.environ.get("BENCH_LIST_PAGE", "10000"))
IMPORT_ROWS = int(os.environ.get("BENCH_IMPORT_ROWS", "100000"))
SECTIONS = set((os.environ.get("BENCH_SECTIONS") or "search,list,grpc,import").split(","))
RESULTS = ROOT / "bench" / "results"
SEED = 20261123
YEARS = 3
META = "bench_customers_meta"  # one row: what was loaded, when (outside the service's schema)
SEARCH_P95_TARGET_MS = 50.0
IMPORT_TARGET = 2000.0


def say(msg: str = "") -> None:
    print(msg, flush=True)


def pg_url(url: str) -> str:
    """A SQLAlchemy URL as a libpq one for psycopg."""
    return sa.engine.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def ms(x: float) -> float:
    return round(x, 2)


# -- 1. the database ----------------------------------------------------------------------------


def _loaded(conn: psycopg.Connection) -> tuple[int, dt.datetime, float] | None:
    if conn.execute("SELECT to_regclass(%s)", (META,)).fetchone()[0] is None:
        return None
    return conn.execute(f"SELECT rows, loaded_at, seconds FROM {META}").fetchone()


def prepare_database(dbs: Databases) -> tuple[str, dict]:
    """The database a run measures. Without BENCH_KEEP_DB: a fresh one, loaded. With it: the
    loaded database `bench_customers_<N>` is kept untouched as a template (loaded once, migrated
    to head), and each run works on a file copy of it (`..._run`), so every run starts from the
    same freshly built tables and indexes and earlier runs' writes leave no bloat behind."""
    if not KEEP:
        url = dbs.fresh("bench_customers")
        migrate(url, SPEC.migrations)
        with psycopg.connect(pg_url(url), autocommit=True) as conn:
            return url, bulk_load(conn, N)
    master = with_database(dbs.base, f"bench_customers_{N}")
    ensure_database(master)
    t0 = time.perf_counter()
    migrate(master, SPEC.migrations)
    say(f"migrated to head in {time.perf_counter() - t0:.1f} s")
    with psycopg.connect(pg_url(master), autocommit=True) as conn:
        got = _loaded(conn)
        info = (
            {"rows": got[0], "reused": True, "load_seconds_when_loaded": round(got[2], 1)}
            if got and got[0] == N
            else bulk_load(conn, N)
        )
    run = f"bench_customers_{N}_run"
    t0 = time.perf_counter()
    with psycopg.connect(pg_url(with_database(dbs.base, "postgres")), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{run}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{run}" TEMPLATE "bench_customers_{N}" STRATEGY FILE_COPY')
    say(f"this run's copy of the loaded database: {run} ({time.perf_counter() - t0:.0f} s to copy)")
    return with_database(dbs.base, run), info


def bulk_load(conn: psycopg.Connection, n: int) -> dict:
    """COPY n generated customers in time order; rebuild the secondary indexes afterwards."""
    say(f"bulk load: {n:,} customers (COPY; search_text from customer_svc.domain.search_key)")
    end = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(minutes=1)
    start = end - dt.timedelta(days=365 * YEARS)
    phases: dict[str, float] = {}
    t_all = time.perf_counter()
    with conn.transaction():
        existing = conn.execute("SELECT count(*) FROM customers").fetchone()[0]
        if existing:
            say(f"  emptying a partly loaded table ({existing:,} rows)")
            conn.execute("TRUNCATE customers CASCADE")
        conn.execute(f"DROP TABLE IF EXISTS {META}")
        conn.execute("SET LOCAL maintenance_work_mem = '512MB'")
        indexes = conn.execute(
            """SELECT i.indexname, i.indexdef FROM pg_indexes i
               WHERE i.tablename = 'customers' AND i.schemaname = current_schema()
                 AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)"""
        ).fetchall()
        for name, _ in indexes:
            conn.execute(f'DROP INDEX "{name}"')
        gen = data.Generator(SEED)
        step = max(1, n // 20)
        t0 = time.perf_counter()
        cols = ", ".join(data.COLUMNS)
        with conn.cursor() as cur, cur.copy(f"COPY customers ({cols}) FROM STDIN") as copy:
            for i, row in enumerate(gen.rows(n, start, end), 1):
                copy.write_row(row)
                if i % step == 0 or i == n:
                    el = time.perf_counter() - t0
                    rate = i / el
                    say(f"  {i:>10,} rows ({100 * i / n:3.0f}%)  {rate:8,.0f} rows/s  ETA {(n - i) / rate:5.0f} s")
        phases["generate_and_copy_s"] = time.perf_counter() - t0
        t_idx = time.perf_counter()
        for name, ddl in indexes:
            t0 = time.perf_counter()
            conn.execute(ddl)
            say(f"  index {name}: {time.perf_counter() - t0:.1f} s")
        phases["indexes_s"] = time.perf_counter() - t_idx
        conn.execute("SELECT setval('customer_code_seq', %s)", (n,))
    t0 = time.perf_counter()
    conn.execute("VACUUM (ANALYZE) customers")
    phases["vacuum_analyze_s"] = time.perf_counter() - t0
    total = time.perf_counter() - t_all
    with conn.transaction():
        conn.execute(f"CREATE TABLE {META} (rows int, loaded_at timestamptz, seconds float8)")
        conn.execute(f"INSERT INTO {META} VALUES (%s, now(), %s)", (n, total))
    size = conn.execute("SELECT pg_size_pretty(pg_total_relation_size('customers'))").fetchone()[0]
    say(
        f"loaded {n:,} customers in {total:.0f} s ({n / total:,.0f} rows/s overall; "
        f"COPY {phases['generate_and_copy_s']:.0f} s, indexes {phases['indexes_s']:.0f} s, "
        f"VACUUM ANALYZE {phases['vacuum_analyze_s']:.0f} s); table + indexes {size}"
    )
    return {
        "rows": n,
        "reused": False,
        "load_seconds": round(total, 1),
        "copy_rows_per_s": round(n / phases["generate_and_copy_s"]),
        **{k: round(v, 1) for k, v in phases.items()},
        "size": size,
    }


# -- 2. the service ---------------------------------------------------------------------------


def start_customer_svc(db_url: str, amqp_url: str, log_path) -> tuple[subprocess.Popen, int]:
    """customer-svc as its own process, its log in a file (bench/__main__.py starts it)."""
    from bench.__main__ import start_customer_svc as start

    return start(db_url, amqp_url, log_path)


def first_db_error(log_path, since: int) -> str:
    """The first database error detail logged by the service after byte offset `since`."""
    try:
        with open(log_path, "rb") as f:
            f.seek(since)
            for line in f:
                m = re.search(rb"(DETAIL:  [^\\]*)", line)
                if m:
                    return m.group(1).decode(errors="replace")
    except OSError:
        pass
    return ""


class RawSql:
    """The statements the service sends for a call, captured by running customer_svc.queries
    in-process (no gRPC), replayed with a plain psycopg connection: the database's share."""

    def __init__(self, url: str):
        self.engine = create_engine(url, pool_size=1)
        self.tokens = PageTokens(DEFAULT_JWT_SECRET, "customers")  # as CustomerUseCases makes them
        self.captured: list[tuple[str, dict]] = []
        threshold = service_layer.WORD_SIMILARITY_THRESHOLD

        def session(dbapi, _record):  # what customer-svc sets on its connections
            dbapi.execute(f"SET pg_trgm.word_similarity_threshold = {threshold}")
            dbapi.commit()

        sa.event.listen(self.engine, "connect", session)
        with self.engine.connect() as conn:  # the dialect's first-connect queries, not captured
            conn.exec_driver_sql("SELECT 1")
        sa.event.listen(self.engine, "before_cursor_execute", self._grab)
        self.conn = psycopg.connect(pg_url(url), autocommit=True)
        self.conn.execute(f"SET pg_trgm.word_similarity_threshold = {threshold}")

    def _grab(self, _conn, _cursor, statement, parameters, _context, _executemany):
        self.captured.append((statement, dict(parameters or {})))

    def capture(self, fn) -> list[tuple[str, dict]]:
        self.captured = []
        with self.engine.connect() as conn:
            fn(conn)
        return list(self.captured)

    def search(self, q: str) -> list[tuple[str, dict]]:
        return self.capture(lambda conn: queries.search_page(conn, self.tokens, q, 20, "", ""))

    def list(self, token: str, filter_text: str, order_by: str, size: int = 50) -> list[tuple[str, dict]]:
        return self.capture(
            lambda conn: queries.list_page(conn, self.tokens, size, token, filter_text, order_by, False)
        )

    def timed(self, stmts: list[tuple[str, dict]], repeat: int = 1) -> tuple[list[float], list]:
        """ms per run of all the statements in turn; the last statement's rows."""
        out, rows = [], []
        for _ in range(repeat):
            t0 = time.perf_counter()
            for stmt, params in stmts:
                rows = self.conn.execute(stmt, params).fetchall()
            out.append((time.perf_counter() - t0) * 1000)
        return out, rows

    def close(self) -> None:
        self.conn.close()
        self.engine.dispose()


def _persian(s: str) -> bool:
    return any("\u0600" <= ch <= "\u06ff" for ch in s)


def _typo(word: str, rnd: random.Random) -> str:
    """Two neighbouring letters swapped inside the word (Rezaei -> Rezaie)."""
    letters = [c for c in word if c != "\u200c"]
    if len(letters) < 4:
        return word + word[-1]
    i = rnd.randrange(1, len(letters) - 2)
    if letters[i] == letters[i + 1]:
        del letters[i]
    else:
        letters[i], letters[i + 1] = letters[i + 1], letters[i]
    return "".join(letters)


def search_queries(conn: psycopg.Connection) -> list[tuple[str, str, str]]:
    """(kind, query, expected customer name) from customers picked at random from the table."""
    rnd = random.Random(SEED + 1)
    codes = [data.customer_code(rnd.randint(1, N)) for _ in range(PER_KIND * 15)]
    rows = conn.execute(
        "SELECT id::text, given_name, family_name, mobile FROM customers "
        "WHERE customer_code = ANY(%s) AND type = 1 AND family_name <> '' AND given_name <> '' "
        "AND delete_time IS NULL ORDER BY customer_code",
        (codes,),
    ).fetchall()
    rnd.shuffle(rows)
    pool = iter(itertools.cycle(rows))
    out: list[tuple[str, str, str]] = []

    def take(kind: str, make, ok=lambda r: True) -> None:
        got, tries = 0, 0
        while got < PER_KIND and tries < len(rows) * 2:
            tries += 1
            r = next(pool)
            if ok(r):
                out.append((kind, make(r), f"customers/{r[0]}"))
                got += 1

    take("full name", lambda r: f"{r[1]} {r[2]}")
    take("family name alone", lambda r: r[2])
    take("prefix (3-4 letters)", lambda r: r[2].replace("\u200c", "")[: rnd.choice((3, 4))])
    take(
        "Persian typed in Arabic letters",
        lambda r: data.arabic_letters(f"{r[1]} {r[2]}"),
        lambda r: _persian(r[2]) and ("ی" in r[1] + r[2] or "ک" in r[1] + r[2]),
    )
    forms = itertools.cycle(
        (lambda m: "0" + m[3:], lambda m: m, lambda m: data.persian_digits("0" + m[3:]), lambda m: m[3:])
    )
    take("mobile number", lambda r: next(forms)(r[3]), lambda r: r[3].startswith("+98"))
    take("typo (full name)", lambda r: f"{r[1]} {_typo(r[2], rnd)}")
    return out


def search_section(stub, health, meta, raw: RawSql) -> tuple[list[dict], list[dict]]:
    qs = search_queries(raw.conn)
    say(f"{len(qs)} queries of {len({k for k, _, _ in qs})} kinds; a warm-up pass, then timed passes")

    def call(q: str):
        return stub.SearchCustomers(customer_service_pb2.SearchCustomersRequest(query=q), metadata=meta, timeout=60)

    for _, q, _ in qs:
        call(q)
    per: list[dict] = []
    for kind, q, want in qs:
        t0 = time.perf_counter()
        resp = call(q)
        lat = (time.perf_counter() - t0) * 1000
        names = [r.customer.name for r in resp.results]
        per.append({"kind": kind, "query": q, "grpc_ms": lat, "hits": len(names), "found": want in names})
    for p in per:
        sql_ms, _ = raw.timed(raw.search(p["query"]))
        p["sql_ms"] = sql_ms[0]
    kinds = list(dict.fromkeys(p["kind"] for p in per))
    rows = []
    for kind in [*kinds, "all"]:
        sel = [p for p in per if kind in ("all", p["kind"])]
        g = [p["grpc_ms"] for p in sel]
        s = [p["sql_ms"] for p in sel]
        rows.append(
            {
                "kind": kind,
                "queries": len(sel),
                "grpc_p50_ms": ms(pct(g, 50)),
                "grpc_p95_ms": ms(pct(g, 95)),
                "grpc_p99_ms": ms(pct(g, 99)),
                "sql_p50_ms": ms(pct(s, 50)),
                "sql_p95_ms": ms(pct(s, 95)),
                "sql/grpc_p50": round(pct(s, 50) / pct(g, 50), 2) if pct(g, 50) else None,
                "avg_hits": round(statistics.mean(p["hits"] for p in sel), 1),
                "expected_in_page": f"{sum(p['found'] for p in sel)}/{len(sel)}",
            }
        )
    slowest = sorted(per, key=lambda p: -p["grpc_ms"])[:5]
    cycle = itertools.cycle([q for _, q, _ in qs])
    empty = health_pb2.HealthCheckRequest()
    thr = []
    for conc in (1, 8):
        ceiling = load.run("empty RPC (health Check)", lambda: health.Check.future(empty), conc, SECONDS)
        r = load.run(
            "SearchCustomers (mixed queries)",
            lambda: stub.SearchCustomers.future(
                customer_service_pb2.SearchCustomersRequest(query=next(cycle)), metadata=meta, timeout=60
            ),
            conc,
            SECONDS,
        )
        thr += [x.row(ceiling, (50, 95, 99)) for x in (ceiling, r)]
    for p in slowest:
        p["grpc_ms"], p["sql_ms"] = ms(p["grpc_ms"]), ms(p["sql_ms"])
    return rows, thr, slowest


def list_section(stub, meta, raw: RawSql, loaded_from: dt.datetime) -> tuple[list[dict], dict]:
    cutoff = (loaded_from + dt.timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    filt = f'city = "Tehran" AND create_time > "{cutoff}"'
    order = "create_time desc"
    size = 50
    matching = raw.conn.execute(
        "SELECT count(*) FROM customers WHERE city = 'Tehran' AND create_time > %s AND delete_time IS NULL",
        (cutoff,),
    ).fetchone()[0]
    say(f"filter: {filt}, order_by {order!r}, page_size {size}: {matching:,} matching customers")

    def page(token: str):
        req = customer_service_pb2.ListCustomersRequest(page_size=size, page_token=token, filter=filt, order_by=order)
        return stub.ListCustomers(req, metadata=meta, timeout=60)

    token_of = {1: ""}  # page number -> the token that fetches it
    walk_ms: list[float] = []
    t_walk = time.perf_counter()
    n = 0
    token = ""
    while n < LIST_PAGE:
        t0 = time.perf_counter()
        resp = page(token)
        walk_ms.append((time.perf_counter() - t0) * 1000)
        n += 1
        if n % 1000 == 0:
            say(f"  walked {n:,} pages ({time.perf_counter() - t_walk:.0f} s)")
        if not resp.next_page_token:
            break
        token = resp.next_page_token
        token_of[n + 1] = token
        if n + 1 > LIST_PAGE:
            break
        if n > 2:  # keep only what is needed: page 1 and the latest
            token_of.pop(n - 1, None)
    walk_s = time.perf_counter() - t_walk
    deep = n
    deep_token = token_of[deep]
    say(f"walked {deep:,} pages in {walk_s:.0f} s (every page through its token)")
    reps = 30
    lat = {}
    for p, tok in ((1, ""), (deep, deep_token)):
        page(tok)
        vals = []
        for _ in range(reps):
            t0 = time.perf_counter()
            resp = page(tok)
            vals.append((time.perf_counter() - t0) * 1000)
        lat[p] = (vals, [c.name for c in resp.customers])
    stmts1 = raw.list("", filt, order, size)
    stmtsd = raw.list(deep_token, filt, order, size)
    sql1, _ = raw.timed(stmts1, reps)
    sqld, rows_d = raw.timed(stmtsd, reps)
    offset = (deep - 1) * size
    main_stmt, main_params = stmts1[-1]  # the page query (after the custom-field lookup)
    off_main = (main_stmt + " OFFSET %(bench_offset)s", {**main_params, "bench_offset": offset})
    off_reps = 5
    sqlo, rows_o = raw.timed([*stmts1[:-1], off_main], off_reps)
    same = (
        [str(r[0]) for r in rows_o][:size]
        == [str(r[0]) for r in rows_d][:size]
        == [n_.removeprefix("customers/") for n_ in lat[deep][1]]
    )
    plans = {}
    for label, (st, pa) in (("keyset_deep", stmtsd[-1]), ("offset_deep", off_main)):
        plan = raw.conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + st, pa).fetchall()
        plans[label] = [r[0] for r in plan]
    g1, gd = lat[1][0], lat[deep][0]
    rows = [
        {
            "what": "ListCustomers over gRPC (keyset)",
            "page": 1,
            "p50_ms": ms(pct(g1, 50)),
            "p95_ms": ms(pct(g1, 95)),
            "ratio_to_page_1": 1.0,
        },
        {
            "what": "ListCustomers over gRPC (keyset)",
            "page": deep,
            "p50_ms": ms(pct(gd, 50)),
            "p95_ms": ms(pct(gd, 95)),
            "ratio_to_page_1": round(pct(gd, 50) / pct(g1, 50), 2),
        },
        {
            "what": "raw SQL, keyset (the service's statement)",
            "page": 1,
            "p50_ms": ms(pct(sql1, 50)),
            "p95_ms": ms(pct(sql1, 95)),
            "ratio_to_page_1": round(pct(sql1, 50) / pct(g1, 50), 2),
        },
        {
            "what": "raw SQL, keyset (the service's statement)",
            "page": deep,
            "p50_ms": ms(pct(sqld, 50)),
            "p95_ms": ms(pct(sqld, 95)),
            "ratio_to_page_1": round(pct(sqld, 50) / pct(g1, 50), 2),
        },
        {
            "what": f"baseline: raw SQL, OFFSET {offset:,} ({off_reps} runs)",
            "page": deep,
            "p50_ms": ms(pct(sqlo, 50)),
            "p95_ms": ms(pct(sqlo, 95)),
            "ratio_to_page_1": round(pct(sqlo, 50) / pct(g1, 50), 2),
        },
    ]
    walk = {
        "filter": filt,
        "matching": matching,
        "pages_walked": deep,
        "walk_seconds": round(walk_s, 1),
        "walk_p50_ms": ms(pct(walk_ms, 50)),
        "walk_p95_ms": ms(pct(walk_ms, 95)),
        "first_100_pages_p50_ms": ms(pct(walk_ms[:100], 50)),
        "last_100_pages_p50_ms": ms(pct(walk_ms[-100:], 50)),
        "offset_page_equals_keyset_page": same,
        "plans": plans,
    }
    return rows, walk


# -- Get / Create ---------------------------------------------------------------------------------


def _create_requests(count: int = 2000):
    """A function returning CreateCustomerRequests: generated persons, a new request_id each
    time (callable from the load generator's callback threads: itertools.count is atomic)."""
    gen = data.Generator(SEED + 2)
    pool = []
    while len(pool) < count:
        v = gen.values("")
        if v["type"] != data.PERSON:
            continue
        c = customer_pb2.Customer(
            type=customer_pb2.CUSTOMER_TYPE_PERSON,
            given_name=v["given_name"],
            family_name=v["family_name"],
            email=v["email"],
            mobile=v["mobile"],
            city=v["city"],
            province=v["province"],
            address=v["address"],
            acquisition_source=v["acquisition_source"],
            tags=v["tags"],
        )
        pool.append(c)
    run = uuid.uuid4().hex[:12]
    counter = itertools.count()

    def make():
        i = next(counter)
        return customer_service_pb2.CreateCustomerRequest(customer=pool[i % count], request_id=f"bench-{run}-{i}")

    return make


def grpc_section(stub, health, meta, raw: RawSql, log_path) -> tuple[list[dict], dict]:
    rnd = random.Random(SEED + 3)
    codes = [data.customer_code(rnd.randint(1, N)) for _ in range(5000)]
    ids = [r[0] for r in raw.conn.execute("SELECT id::text FROM customers WHERE customer_code = ANY(%s)", (codes,))]
    rnd.shuffle(ids)
    gets = itertools.cycle([customer_service_pb2.GetCustomerRequest(name=f"customers/{i}") for i in ids])
    creates = _create_requests()
    probe = {}
    since = log_path.stat().st_size if log_path.exists() else 0
    try:
        c = stub.CreateCustomer(creates(), metadata=meta, timeout=30)
        probe = {"ok": True, "customer_code": c.customer_code}
    except grpc.RpcError as e:
        time.sleep(0.5)  # the service's log line
        cause = first_db_error(log_path, since)
        probe = {"ok": False, "code": e.code().name, "details": e.details(), "cause": cause}
        say(f"CreateCustomer probe FAILED: {e.code().name}: {e.details()}; {cause}")
    seq = raw.conn.execute("SELECT last_value FROM customer_code_seq").fetchone()[0]
    probe["customer_code_seq"] = seq
    # The database's share of a GetCustomer: the service's statement, one at a time.
    get_stmts = raw.capture(lambda conn: adapters.get_customer(conn, ids[0]))
    get_sql = get_stmts[-1][0]
    key = next(k for k, v in get_stmts[-1][1].items() if v == ids[0])
    lat, t0, i = [], time.perf_counter(), 0
    while time.perf_counter() - t0 < SECONDS:
        t1 = time.perf_counter()
        raw.conn.execute(get_sql, {**get_stmts[-1][1], key: ids[i % len(ids)]}).fetchall()
        lat.append((time.perf_counter() - t1) * 1000)
        i += 1
    sql_get = {"calls": i, "rps": i / (time.perf_counter() - t0), "p50": pct(lat, 50), "p99": pct(lat, 99)}
    empty = health_pb2.HealthCheckRequest()
    rows = []
    for conc in (1, 32):
        ceiling = load.run("empty RPC (health Check)", lambda: health.Check.future(empty), conc, SECONDS)
        results = [
            ceiling,
            load.run("GetCustomer", lambda: stub.GetCustomer.future(next(gets), metadata=meta), conc, SECONDS),
            load.run("CreateCustomer", lambda: stub.CreateCustomer.future(creates(), metadata=meta), conc, SECONDS),
        ]
        rows += [r.row(ceiling) for r in results]
    rows.append(
        {
            "what": "baseline: GetCustomer's SELECT, raw psycopg",
            "callers": 1,
            "calls": sql_get["calls"],
            "errors": 0,
            "rps": round(sql_get["rps"], 1),
            "p50_ms": ms(sql_get["p50"]),
            "p99_ms": ms(sql_get["p99"]),
        }
    )
    return rows, probe


# -- Import ---------------------------------------------------------------------------------------

IMPORT_COLUMNS = [
    "given_name",
    "family_name",
    "mobile",
    "email",
    "national_id",
    "city",
    "province",
    "address",
    "postal_code",
    "acquisition_source",
]


def import_rows(conn: psycopg.Connection, count: int) -> tuple[list[list[str]], int]:
    """count persons as CSV cells: ~5% are existing customers (same mobile / e-mail / national
    id, as another system exported them), the rest new."""
    rnd = random.Random(SEED + 4)
    dups = count // 20
    codes = [data.customer_code(rnd.randint(1, N)) for _ in range(dups * 2)]
    existing = conn.execute(
        f"SELECT {', '.join(IMPORT_COLUMNS)} FROM customers WHERE customer_code = ANY(%s) AND type = 1 "
        "AND (mobile <> '' OR email <> '' OR national_id <> '') LIMIT %s",
        (codes, dups),
    ).fetchall()
    gen = data.Generator(SEED + 5)
    fresh = []
    while len(fresh) < count - len(existing):
        v = gen.values("")
        if v["type"] == data.PERSON:
            fresh.append([str(v.get(c) or "") for c in IMPORT_COLUMNS])
    rows = fresh + [[str(x or "") for x in r] for r in existing]
    rnd.shuffle(rows)
    return rows, len(existing)


def _csv(rows: list[list[str]]) -> bytes:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(IMPORT_COLUMNS)
    w.writerows(rows)
    return buf.getvalue().encode()


def import_baseline(conn: psycopg.Connection, content: bytes) -> float:
    """rows/s of the same file read, validated (domain.validate), keyed (search_key) and COPYed
    into an unindexed temporary copy of the table: the work of an import without dedupe,
    index maintenance, events or job bookkeeping."""
    import csv
    import io

    from customer_svc import domain

    ctx = domain.Context({s: False for s in data.SOURCES}, {})
    t0 = time.perf_counter()
    with conn.transaction():
        conn.execute("CREATE TEMP TABLE import_baseline (LIKE customers INCLUDING DEFAULTS) ON COMMIT DROP")
        cols = ["type", *IMPORT_COLUMNS, "display_name", "search_text"]
        n = 0
        with conn.cursor() as cur, cur.copy(f"COPY import_baseline ({', '.join(cols)}) FROM STDIN") as copy:
            for rec in csv.DictReader(io.StringIO(content.decode())):
                v = domain.validate({"type": data.PERSON, **rec}, ctx)
                copy.write_row([data.PERSON, *(v[c] for c in IMPORT_COLUMNS), v["display_name"], domain.search_key(v)])
                n += 1
    return n / (time.perf_counter() - t0)


def import_section(stub, meta, raw: RawSql, log_path) -> dict:
    rows, dups = import_rows(raw.conn, IMPORT_ROWS)
    content = _csv(rows)
    req = customer_service_pb2.ImportCustomersRequest(
        content=content,
        file_format=customer_service_pb2.IMPORT_FILE_FORMAT_CSV,
        customer_type=customer_pb2.CUSTOMER_TYPE_PERSON,
        dedupe_policy=customer_service_pb2.DEDUPE_POLICY_SKIP,
        request_id=f"bench-import-{uuid.uuid4()}",
    )
    say(f"{len(rows):,} rows ({dups:,} existing customers), CSV {len(content) / 1e6:.1f} MB")
    since = log_path.stat().st_size if log_path.exists() else 0
    t0 = time.perf_counter()
    try:
        job = stub.ImportCustomers(req, metadata=meta, timeout=600)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.UNIMPLEMENTED:
            say("import: not available yet")
            return {"available": False, "reason": e.details()}
        say(f"import: ImportCustomers failed: {e.code().name}: {e.details()}")
        return {"available": True, "error": f"{e.code().name}: {e.details()}"}
    last_print = 0.0
    while job.state == customer_service_pb2.IMPORT_STATE_RUNNING:
        if time.perf_counter() - t0 > 3600:
            return {"available": True, "error": "still running after an hour", "processed_rows": job.processed_rows}
        time.sleep(0.25)
        job = stub.GetImportJob(customer_service_pb2.GetImportJobRequest(name=job.name), metadata=meta, timeout=30)
        if time.perf_counter() - last_print > 10:
            last_print = time.perf_counter()
            say(f"  {job.processed_rows:,}/{job.total_rows:,} rows ({time.perf_counter() - t0:.0f} s)")
    took = time.perf_counter() - t0
    server = (
        (job.end_time.ToDatetime() - job.create_time.ToDatetime()).total_seconds()
        if job.end_time.seconds and job.create_time.seconds
        else None
    )
    ok = job.state == customer_service_pb2.IMPORT_STATE_SUCCEEDED
    cause = ""
    if not ok:
        time.sleep(0.5)
        cause = first_db_error(log_path, since)
        say(f"import: job {customer_service_pb2.ImportState.Name(job.state)}: {job.error}; {cause}")
    base = import_baseline(raw.conn, content)
    rate = job.processed_rows / took if took and ok else 0.0
    return {
        "available": True,
        "state": customer_service_pb2.ImportState.Name(job.state),
        "error": job.error,
        "cause": cause,
        "rows": len(rows),
        "existing_in_file": dups,
        "total_rows": job.total_rows,
        "processed_rows": job.processed_rows,
        "created": job.created_rows,
        "skipped": job.skipped_rows,
        "updated": job.updated_rows,
        "failed": job.failed_rows,
        "seconds": round(took, 1),
        "server_seconds": round(server, 1) if server is not None else None,
        "rows_per_s": round(rate),
        "baseline_rows_per_s": round(base),
        "ratio_to_baseline": round(rate / base, 3) if base else None,
        "target_rows_per_s": IMPORT_TARGET,
        "meets_target": ok and rate >= IMPORT_TARGET,
    }


# -- main -----------------------------------------------------------------------------------------


def main() -> int:
    say(
        f"customers bench: {platform.node()} {os.cpu_count()} cores, python {platform.python_version()}, "
        f"grpcio {grpc.__version__}, BENCH_CUSTOMERS={N:,}, {SECONDS:.0f} s per throughput measurement, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} (the machine is shared)"
    )
    stamp = f"{dt.datetime.now():%Y%m%d-%H%M%S}"
    dbs, broker = Databases(), Broker()
    out: dict = {"customers": N, "seconds_per_measurement": SECONDS, "loadavg_start": os.getloadavg()}
    proc = None
    try:
        say("\n== bulk load ==")
        url, out["load"] = prepare_database(dbs)
        raw = RawSql(url)
        loaded_at = raw.conn.execute(f"SELECT loaded_at FROM {META}").fetchone()[0]
        loaded_from = loaded_at - dt.timedelta(days=365 * YEARS)
        RESULTS.mkdir(exist_ok=True)
        log_path = RESULTS / f"customers-{stamp}-customer-svc.log"
        proc, port = start_customer_svc(url, os.environ.get("XAMQP", broker.url), log_path)
        say(f"customer-svc log: {log_path.relative_to(ROOT)}")
        opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=opts)
        stub = customer_service_pb2_grpc.CustomerServiceStub(ch)
        health = health_pb2_grpc.HealthStub(ch)
        meta = md("admin", "bench")

        if "search" in SECTIONS:
            say("\n== SearchCustomers: one caller, the service's SQL timed directly, and throughput ==")
            rows, thr, slowest = search_section(stub, health, meta, raw)
            cols = ["kind", "queries", "grpc_p50_ms", "grpc_p95_ms", "grpc_p99_ms", "sql_p50_ms", "sql_p95_ms"]
            say(table(rows, [*cols, "sql/grpc_p50", "avg_hits", "expected_in_page"]))
            say("")
            say(
                table(
                    thr, ["what", "callers", "calls", "errors", "rps", "p50_ms", "p95_ms", "p99_ms", "ratio_to_ceiling"]
                )
            )
            p95 = rows[-1]["grpc_p95_ms"]
            verdict = "meets" if p95 < SEARCH_P95_TARGET_MS else "MISSES"
            say(f"target: search p95 < {SEARCH_P95_TARGET_MS:.0f} ms: {p95} ms, {verdict} the target")
            say("slowest: " + "; ".join(f"{p['query']!r} ({p['kind']}) {p['grpc_ms']} ms" for p in slowest))
            out["search"] = {"latency": rows, "throughput": thr, "slowest": slowest, "p95_target_met": p95 < 50}

        if "list" in SECTIONS:
            say(f"\n== ListCustomers: filtered keyset pages, page 1 vs page {LIST_PAGE:,}, OFFSET baseline ==")
            rows, walk = list_section(stub, meta, raw, loaded_from)
            say(table(rows, ["what", "page", "p50_ms", "p95_ms", "ratio_to_page_1"]))
            say(
                f"walk: {walk['pages_walked']:,} pages in {walk['walk_seconds']} s, p50 {walk['walk_p50_ms']} ms "
                f"(first 100 pages p50 {walk['first_100_pages_p50_ms']} ms, last 100 "
                f"{walk['last_100_pages_p50_ms']} ms); OFFSET page == keyset page: {walk['offset_page_equals_keyset_page']}"
            )
            out["list"] = {"latency": rows, "walk": walk}

        if "grpc" in SECTIONS:
            say("\n== GetCustomer / CreateCustomer vs the empty-RPC ceiling on the same server ==")
            rows, probe = grpc_section(stub, health, meta, raw, log_path)
            say(table(rows, ["what", "callers", "calls", "errors", "rps", "p50_ms", "p99_ms", "ratio_to_ceiling"]))
            out["grpc"] = {"rows": rows, "create_probe": probe}

        if "import" in SECTIONS:
            say(f"\n== ImportCustomers: {IMPORT_ROWS:,} rows, DEDUPE_POLICY_SKIP ==")
            imp = import_section(stub, meta, raw, log_path)
            if imp.get("state"):
                say(
                    table(
                        [
                            {
                                "what": "ImportCustomers (CSV, validate + dedupe + write)",
                                "rows": imp["processed_rows"],
                                "seconds": imp["seconds"],
                                "rows_per_s": imp["rows_per_s"],
                                "ratio": imp["ratio_to_baseline"],
                            },
                            {
                                "what": "baseline: validate + search_key + COPY, unindexed temp table",
                                "rows": imp["rows"],
                                "rows_per_s": imp["baseline_rows_per_s"],
                                "ratio": 1.0,
                            },
                        ],
                        ["what", "rows", "seconds", "rows_per_s", "ratio"],
                    )
                )
                say(
                    f"job {imp['state']}: created {imp['created']:,}, skipped {imp['skipped']:,}, "
                    f"failed {imp['failed']:,} (file had {imp['existing_in_file']:,} existing customers); "
                    f"target >= {IMPORT_TARGET:,.0f} rows/s: "
                    + (
                        "met"
                        if imp["meets_target"]
                        else "MISSED"
                        if imp["state"] == "IMPORT_STATE_SUCCEEDED"
                        else "not measurable, the job failed"
                    )
                )
            out["import"] = imp
        ch.close()
        raw.close()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        if not KEEP:
            dbs.drop_all()
        broker.close()
    out["loadavg_end"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"customers-{stamp}.json"
    path.write_text(json.dumps(out, indent=2, default=str, ensure_ascii=False))
    say(f"\nsaved {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
