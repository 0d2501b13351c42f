"""Test harness: real PostgreSQL, a private RabbitMQ vhost, in-process services on loopback.

- PostgreSQL: TEST_DATABASE_URL (a server URL) if set, else the embedded server under
  .run/test (the same default `make run` uses); every test module gets fresh databases.
- RabbitMQ: a private vhost made with rabbitmqctl for the session (so tests never touch a
  running suite's queues), or TEST_AMQP_URL if set.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import uuid
from urllib.parse import quote, urlparse, urlunparse

import grpc
import sqlalchemy as sa

from crm_chassis.auth import TokenVerifier
from crm_chassis.config import DEFAULT_AMQP_URL, DEFAULT_JWT_SECRET, load_settings
from crm_chassis.db import ensure_database, start_embedded_postgres, with_database
from crm_chassis.service import Service, ServiceSpec

ROOT = pathlib.Path(__file__).resolve().parents[2]
VERIFIER = TokenVerifier(DEFAULT_JWT_SECRET)


def token(roles: str | list[str] = "admin", sub: str = "tester") -> str:
    if isinstance(roles, str):
        roles = roles.split(",")
    return VERIFIER.mint(sub, roles)


def assert_problem(resp, status: int, field: str | None = None) -> dict:
    """An HTTP error from the gateway: problem+json with this status, no stack trace, and (if
    given) `field` among the fields it names. Returns the body."""
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.mimetype == "application/problem+json"
    body = resp.get_json(force=True)
    assert body["status"] == status and body["title"] and body["detail"]
    assert "Traceback" not in resp.get_data(as_text=True)
    if field:
        assert field in [e["field"] for e in body["errors"]], body
    return body


def md(roles: str | list[str] = "admin", sub: str = "tester") -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token(roles, sub)}")]


class Databases:
    def __init__(self):
        self.base = os.environ.get("TEST_DATABASE_URL") or start_embedded_postgres(ROOT / ".run" / "test")
        self.created: list[str] = []

    def fresh(self, prefix: str) -> str:
        name = f"t_{prefix.replace('-', '_')}_{uuid.uuid4().hex[:8]}"
        url = with_database(self.base, name)
        ensure_database(url)
        self.created.append(url)
        return url

    def drop_all(self) -> None:
        admin = sa.create_engine(
            with_database(self.base, "postgres"), isolation_level="AUTOCOMMIT", poolclass=sa.NullPool
        )
        with admin.connect() as conn:
            for url in self.created:
                db = sa.engine.make_url(url).database
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        admin.dispose()


class Broker:
    def __init__(self):
        self.vhost = None
        given = os.environ.get("TEST_AMQP_URL")
        if given:
            self.url = given
            return
        base = os.environ.get("AMQP_URL", DEFAULT_AMQP_URL)
        ctl = shutil.which("rabbitmqctl")
        if ctl is None:
            self.url = base
            return
        self.vhost = f"crm-test-{uuid.uuid4().hex[:8]}"
        subprocess.run([ctl, "add_vhost", self.vhost], check=True, capture_output=True)
        user = urlparse(base).username or "guest"
        subprocess.run(
            [ctl, "set_permissions", "-p", self.vhost, user, ".*", ".*", ".*"], check=True, capture_output=True
        )
        p = urlparse(base)
        self.url = urlunparse(p._replace(path="/" + quote(self.vhost, safe="")))

    def with_port(self, port: int) -> str:
        """The same broker URL through another local port (a proxy in front of the broker)."""
        p = urlparse(self.url)
        netloc = f"{p.username or 'guest'}:{p.password or 'guest'}@127.0.0.1:{port}"
        return urlunparse(p._replace(netloc=netloc))

    @property
    def address(self) -> tuple[str, int]:
        p = urlparse(self.url)
        return p.hostname or "127.0.0.1", p.port or 5672

    def close(self) -> None:
        if self.vhost:
            subprocess.run(["rabbitmqctl", "delete_vhost", self.vhost], capture_output=True)


def service_settings(name: str, database_url: str, amqp_url: str, **extra: str):
    env = {
        "SERVICE_NAME": name,
        "GRPC_PORT": "50000",  # replaced by a free port (port=0) when the service starts
        "DATABASE_URL": database_url,
        "AMQP_URL": amqp_url,
        "OUTBOX_POLL_SECONDS": "0.2",
        "CONSUMER_DELIVERY_LIMIT": "3",
        "SHUTDOWN_GRACE_SECONDS": "2",
        "LOG_LEVEL": "WARNING",
    }
    env.update(extra)
    return load_settings(env=env)


def start_service(spec: ServiceSpec, database_url: str, amqp_url: str, **kw) -> Service:
    settings = service_settings(spec.name, database_url, amqp_url, **kw.pop("env", {}))
    return Service(spec, settings, port=0, **kw).start()


def channel(service: Service) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{service.port}")


class Suite:
    """customer-svc and reporting-svc in-process (relay and consumer running) plus the
    gateway's Flask app pointed at them: the whole path of a request, on loopback."""

    def __init__(self, databases: Databases, broker: Broker):
        from crm_gateway import create_app
        from crm_gateway.clients import Clients
        from customer_svc.__main__ import SPEC as CUSTOMER
        from reporting_svc.__main__ import SPEC as REPORTING

        self.customer = start_service(CUSTOMER, databases.fresh("customer"), broker.url)
        self.reporting = start_service(REPORTING, databases.fresh("reporting"), broker.url)
        assert self.reporting.consumer.ready.wait(15), "reporting consumer did not start"
        self.clients = Clients(
            {"customer": f"127.0.0.1:{self.customer.port}", "reporting": f"127.0.0.1:{self.reporting.port}"}
        )
        self.app = create_app(self.clients)
        self.http = self.app.test_client()

    def source(self, prefix: str) -> str:
        """A new acquisition source in the managed list (created by an admin over gRPC)."""
        return new_source(f"127.0.0.1:{self.customer.port}", prefix)

    def headers(self, roles: str = "admin") -> dict[str, str]:
        return {"Authorization": f"Bearer {token(roles)}"}

    def stop(self) -> None:
        self.clients.close()
        self.customer.stop(0)
        self.reporting.stop(0)


def new_source(target: str, prefix: str) -> str:
    from crm.customer.v1 import customer_service_pb2, customer_service_pb2_grpc, resources_pb2

    key = f"{prefix}-{uuid.uuid4().hex[:8]}"
    with grpc.insecure_channel(target) as ch:
        customer_service_pb2_grpc.CustomerServiceStub(ch).CreateAcquisitionSource(
            customer_service_pb2.CreateAcquisitionSourceRequest(
                acquisition_source=resources_pb2.AcquisitionSource(key=key, display_name=prefix.title())
            ),
            metadata=md("admin"),
        )
    return key


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    """Poll `predicate` until it returns something true (returned) or fail after `timeout`."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def gateway_client(hops: int = 0, **addresses: str):
    """The gateway's Flask app as a test client (and its Clients, to close), calling the services
    at `addresses` (client key -> host:port; the others a closed port). `hops`: the proxies in
    front of it (GATEWAY_PROXY_HOPS), for tests of the client address on public routes."""
    from crm_gateway import create_app
    from crm_gateway.clients import Clients

    keys = ("customer", "sales", "support", "campaign", "reporting")
    clients = Clients({**dict.fromkeys(keys, "127.0.0.1:9"), **addresses})
    return create_app(clients, hops=hops).test_client(), clients


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gateway(customer: str, reporting: str, timeout: float = 60, **env: str):
    """The gateway under real gunicorn (as `make run` starts it) on a free port, answering
    /healthz before this returns: (process, port). `env` adds settings (GATEWAY_WORKERS=...);
    its stderr is a pipe, read into the error if it does not start."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    settings = {
        **os.environ,
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(port),
        "CUSTOMER_SVC_ADDR": customer,
        "REPORTING_SVC_ADDR": reporting,
        "JWT_SECRET": DEFAULT_JWT_SECRET,  # tokens minted by token() / md()
        **env,
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            str(ROOT / "gateway" / "gunicorn.conf.py"),
            "crm_gateway:create_app()",
        ],
        env=settings,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"gunicorn exited: {proc.stderr.read()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                if r.status == 200:
                    return proc, port
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("gunicorn did not start")
        time.sleep(0.2)


def stop_process(proc, timeout: float = 30) -> None:
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
