"""`make bench`: the foundation's benchmark.

1. gRPC: the empty-RPC ceiling (grpc.health.v1 Check on the same server process: same
   grpcio server, thread pool and interceptor chain minus auth and SQL), then CreateCustomer
   and GetCustomer at 1 and 32 callers, with p50/p99 and the ratio to the ceiling.
2. Outbox relay: events/s draining a pre-filled outbox to RabbitMQ with confirms, against a
   plain pika publish loop with pipelined confirms (and one waiting for each confirm).

customer-svc runs as its own process (`python -m customer_svc serve`) on a fresh database;
the load client runs here and shares the 2 cores with it, as in PERFORMANCE.md.
Settings: BENCH_SECONDS (per measurement, default 5), BENCH_EVENTS (default 20000).
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import os
import platform
import subprocess
import sys
import time

import grpc
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import baseline_publish, load
from bench.load import table
from crm.customer.v1 import customer_pb2, customer_service_pb2, customer_service_pb2_grpc
from crm_chassis.config import DEFAULT_JWT_SECRET
from crm_chassis.db import create_engine
from crm_chassis.messaging.outbox import OutboxRelay
from crm_chassis.messaging.tables import messaging_metadata
from crm_chassis.messaging.topology import declare_producer
from tests.support.harness import ROOT, Broker, Databases, free_port, md, start_gateway, stop_process

SECONDS = float(os.environ.get("BENCH_SECONDS", "5"))
EVENTS = int(os.environ.get("BENCH_EVENTS", "20000"))
RESULTS = ROOT / "bench" / "results"


def start_customer_svc(
    db_url: str, amqp_url: str, log_path=None, timeout: float = 120, module: str = "customer_svc"
) -> tuple[subprocess.Popen, int]:
    """customer-svc as its own process (`python -m customer_svc serve`; with module
    "bench.baseline_server", the same with the baselines beside it), SERVING before it returns;
    its log goes to `log_path` when given."""
    return start_service_process("customer-svc", module, db_url, amqp_url, log_path, timeout)


def start_role(
    name: str, module: str, command: str, db_url: str, amqp_url: str, log_path=None, **env: str
) -> subprocess.Popen:
    """`python -m <module> <command>` (serve, or one role: consume, relay, ...) of service `name`
    as its own process; its log goes to (appended to) `log_path` when given; `env` adds settings."""
    env = dict(
        os.environ,
        SERVICE_NAME=name,
        DATABASE_URL=db_url,
        AMQP_URL=amqp_url,
        JWT_SECRET=DEFAULT_JWT_SECRET,  # tokens minted by tests.support.harness.md
        LOG_LEVEL="WARNING",
        **env,
    )
    out = open(log_path, "ab") if log_path else None  # noqa: SIM115 - the child writes to it until it stops
    try:
        return subprocess.Popen(
            [sys.executable, "-m", module, command],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
        )
    finally:
        if out:
            out.close()


def start_service_process(
    name: str, module: str, db_url: str, amqp_url: str, log_path=None, timeout: float = 120, **env: str
) -> tuple[subprocess.Popen, int]:
    """A service as its own process (`python -m <module> serve`, e.g. sales_svc, or
    bench.baseline_server with BENCH_SERVICE naming the service's package), SERVING before it
    returns; its log goes to `log_path` when given; `env` adds settings."""
    port = free_port()
    proc = start_role(
        name, module, "serve", db_url, amqp_url, log_path,
        GRPC_PORT=str(port), BENCH_SERVICE=name.replace("-", "_"), **env,
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        while True:
            try:
                if health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return proc, port
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"{name} did not start{f' (log: {log_path})' if log_path else ''}")
            time.sleep(0.2)


def grpc_section(db_url: str, amqp_url: str) -> list[dict]:
    from bench.baseline_server import stubs

    _, baseline_grpc = stubs()
    proc, port = start_customer_svc(db_url, amqp_url, module="bench.baseline_server")
    rows = []
    try:
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(ch)
        stub = customer_service_pb2_grpc.CustomerServiceStub(ch)
        baseline = baseline_grpc.BaselineServiceStub(ch)
        meta = md("admin", "bench")
        n = [0]

        def person():
            n[0] += 1
            c = customer_pb2.Customer(
                type=1,
                given_name="Bench",
                family_name=f"User{n[0]}",
                email=f"user{n[0]}@example.com",
                phone="+98 21 1234 5678",
                acquisition_source="website",
            )
            return customer_service_pb2.CreateCustomerRequest(customer=c)

        def create():
            return stub.CreateCustomer.future(person(), metadata=meta)

        def minimal_write():
            return baseline.MinimalWrite.future(person(), metadata=meta)

        seed = stub.CreateCustomer(
            customer_service_pb2.CreateCustomerRequest(customer=customer_pb2.Customer(type=1, given_name="Seed")),
            metadata=meta,
        )
        get_req = customer_service_pb2.GetCustomerRequest(name=seed.name)
        bare = baseline.MinimalWrite(person(), metadata=meta)
        bare_req = customer_service_pb2.GetCustomerRequest(name=bare.name)
        empty = health_pb2.HealthCheckRequest()
        for conc in (1, 32):
            ceiling = load.run("empty RPC (health Check)", lambda: health.Check.future(empty), conc, SECONDS)
            write = load.run("minimal write (INSERT + outbox INSERT)", minimal_write, conc, SECONDS)
            create_ = load.run("CreateCustomer", create, conc, SECONDS)
            read = load.run(
                "minimal read (primary key)",
                lambda: baseline.MinimalRead.future(bare_req, metadata=meta),
                conc,
                SECONDS,
            )
            get = load.run("GetCustomer", lambda: stub.GetCustomer.future(get_req, metadata=meta), conc, SECONDS)
            for r, base in ((ceiling, None), (write, None), (create_, write), (read, None), (get, read)):
                row = r.row(ceiling)
                row["ratio_to_minimal"] = round(r.rps / base.rps, 3) if base and base.rps else ""
                rows.append(row)
        ch.close()
    finally:
        proc.terminate()
        proc.wait(30)
    return rows


def gateway_section(db_url: str, amqp_url: str) -> list[dict]:
    """CreateCustomer and GetCustomer one request at a time, over HTTP through the gateway
    (gunicorn, as `make run` starts it) and straight over gRPC to the same customer-svc
    process, in one run: the gateway's own share is the difference of the two."""
    proc, port = start_customer_svc(db_url, amqp_url)
    gw, gw_port = start_gateway(f"127.0.0.1:{port}", "127.0.0.1:9", LOG_LEVEL="WARNING")  # reporting: not called
    rows = []
    try:
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = customer_service_pb2_grpc.CustomerServiceStub(ch)
        meta = md("admin", "bench")
        headers = {"Authorization": meta[0][1], "Content-Type": "application/json"}
        conn = http.client.HTTPConnection("127.0.0.1", gw_port, timeout=10)
        n = [0]

        def person() -> dict:
            n[0] += 1
            return {
                "type": "CUSTOMER_TYPE_PERSON",
                "givenName": "Bench",
                "familyName": f"Http{n[0]}",
                "email": f"http{n[0]}@example.com",
                "phone": "+98 21 1234 5678",
                "acquisitionSource": "website",
            }

        def http_call(method: str, path: str, body: dict | None = None) -> bytes:
            try:
                conn.request(method, path, body=json.dumps(body) if body else None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException):
                conn.close()  # the next call connects again (gunicorn closes idle keep-alives after 5 s)
                raise
            if resp.status >= 300:
                raise RuntimeError(f"{method} {path}: {resp.status} {data[:200]!r}")
            return data

        seed = json.loads(http_call("POST", "/v1/customers", person()))
        get_path = f"/v1/{seed['name']}"

        def grpc_create():
            p = person()
            c = customer_pb2.Customer(
                type=1,
                given_name=p["givenName"],
                family_name=p["familyName"],
                email=p["email"],
                phone=p["phone"],
                acquisition_source="website",
            )
            stub.CreateCustomer(customer_service_pb2.CreateCustomerRequest(customer=c), metadata=meta)

        get_req = customer_service_pb2.GetCustomerRequest(name=seed["name"])
        pairs = [
            (
                "CreateCustomer",
                load.run_one_caller("gRPC", grpc_create, SECONDS),
                load.run_one_caller("HTTP", lambda: http_call("POST", "/v1/customers", person()), SECONDS),
            ),
            (
                "GetCustomer",
                load.run_one_caller("gRPC", lambda: stub.GetCustomer(get_req, metadata=meta), SECONDS),
                load.run_one_caller("HTTP", lambda: http_call("GET", get_path), SECONDS),
            ),
        ]
        for what, direct, through in pairs:
            rows.append(
                {
                    "what": what,
                    "calls": f"{direct.calls}/{through.calls}",
                    "errors": direct.errors + through.errors,
                    "grpc_p50_ms": round(direct.pct(50), 2),
                    "http_p50_ms": round(through.pct(50), 2),
                    "gateway_share_p50_ms": round(through.pct(50) - direct.pct(50), 2),
                    "grpc_p99_ms": round(direct.pct(99), 2),
                    "http_p99_ms": round(through.pct(99), 2),
                }
            )
        conn.close()
        ch.close()
    finally:
        stop_process(gw)
        proc.terminate()
        proc.wait(30)
    return rows


def relay_section(db_url: str, amqp_url: str) -> list[dict]:
    engine = create_engine(db_url, pool_size=2)
    messaging_metadata.create_all(engine)
    body = os.urandom(350)
    with engine.begin() as conn:  # set-based fill of the outbox
        conn.execute(
            sa.text("""
            INSERT INTO outbox (event_id, exchange, routing_key, event_type, source, subject, dataschema,
                                payload, occurred_at)
            SELECT gen_random_uuid(), 'crm.bench.events', 'thing.happened.v1', 'crm.bench.thing.happened.v1',
                   '/bench', 'things/' || g, 'bench.Thing', :body, now()
            FROM generate_series(1, :n) AS g"""),
            {"body": body, "n": EVENTS},
        )
    relay = OutboxRelay(engine, amqp_url, lambda ch: declare_producer(ch, "bench"), batch_size=500)
    t0 = time.perf_counter()
    sent = relay.drain(timeout=600)
    relay_rate = sent / (time.perf_counter() - t0)
    relay.publisher.close()
    with engine.connect() as conn:
        left = conn.execute(sa.text("SELECT count(*) FROM outbox WHERE published_at IS NULL")).scalar()
    engine.dispose()
    pipelined = baseline_publish.pipelined(amqp_url, "crm.bench.events", "thing.happened.v1", body, EVENTS)
    single = baseline_publish.one_by_one(amqp_url, "crm.bench.events", "thing.happened.v1", body, min(EVENTS, 3000))
    return [
        {
            "what": "outbox relay (two batches in flight: SKIP LOCKED, publish, confirms, UPDATE)",
            "events": sent,
            "left_unpublished": left,
            "per_second": round(relay_rate),
            "ratio_to_pipelined": round(relay_rate / pipelined, 3),
        },
        {
            "what": "baseline: plain pika loop, pipelined confirms (window 1000)",
            "events": EVENTS,
            "per_second": round(pipelined),
            "ratio_to_pipelined": 1.0,
        },
        {
            "what": "reference: pika loop waiting for each confirm",
            "events": min(EVENTS, 3000),
            "per_second": round(single),
            "ratio_to_pipelined": round(single / pipelined, 3),
        },
    ]


def main() -> int:
    print(
        f"bench: {platform.node()} {os.cpu_count()} cores, python {platform.python_version()}, "
        f"grpcio {grpc.__version__}, {SECONDS:.0f} s per measurement",
        flush=True,
    )
    dbs, broker = Databases(), Broker()
    try:
        print("\n== gRPC: customer-svc (own process) vs the empty-RPC ceiling on the same server ==", flush=True)
        grpc_rows = grpc_section(dbs.fresh("bench_grpc"), broker.url)
        print(
            table(
                grpc_rows,
                [
                    "what",
                    "callers",
                    "calls",
                    "errors",
                    "rps",
                    "p50_ms",
                    "p99_ms",
                    "ratio_to_ceiling",
                    "ratio_to_minimal",
                ],
            )
        )
        print("\n== one request at a time: HTTP through the gateway vs gRPC straight to customer-svc ==", flush=True)
        gateway_rows = gateway_section(dbs.fresh("bench_gateway"), broker.url)
        print(
            table(
                gateway_rows,
                [
                    "what",
                    "calls",
                    "errors",
                    "grpc_p50_ms",
                    "http_p50_ms",
                    "gateway_share_p50_ms",
                    "grpc_p99_ms",
                    "http_p99_ms",
                ],
            )
        )
        print(f"\n== outbox relay vs plain pika publishing ({EVENTS} persistent 350-byte events) ==", flush=True)
        relay_rows = relay_section(dbs.fresh("bench_relay"), broker.url)
        print(table(relay_rows, ["what", "events", "per_second", "ratio_to_pipelined"]))
    finally:
        dbs.drop_all()
        broker.close()
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"bench-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps({"grpc": grpc_rows, "gateway": gateway_rows, "relay": relay_rows}, indent=2))
    print(f"\nsaved {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
