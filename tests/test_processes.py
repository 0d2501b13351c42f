"""Whole processes: graceful SIGTERM of a service, and `make run`'s launcher end to end."""

from __future__ import annotations

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
from tests.support.harness import ROOT, Broker, md, new_source, token

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    offset = 1000 + (os.getpid() % 500) * 10
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
