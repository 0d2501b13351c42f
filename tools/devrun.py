"""`make run`: the whole suite on one machine.

Starts embedded PostgreSQL (unless DATABASE_URL names a server), creates and migrates one
database per service, starts the five services and the gateway, waits until every one is
healthy and prints what runs where. Ctrl-C (or SIGTERM) stops everything and leaves no
process behind. RabbitMQ comes from AMQP_URL; when it is down the services still serve and
their events wait in the outboxes.
"""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from urllib.parse import urlparse

ROOT = pathlib.Path(__file__).resolve().parent.parent
RUN = pathlib.Path(os.environ.get("CRM_RUN_DIR", ROOT / ".run")).resolve()
LOGS = RUN / "logs"
PY = sys.executable

# CRM_PORT_OFFSET shifts every port (a second suite beside a running one, the tests).
OFFSET = int(os.environ.get("CRM_PORT_OFFSET", "0"))
SERVICES = [
    ("customer-svc", 50051 + OFFSET),
    ("sales-svc", 50052 + OFFSET),
    ("support-svc", 50053 + OFFSET),
    ("campaign-svc", 50054 + OFFSET),
    ("reporting-svc", 50055 + OFFSET),
]
GATEWAY_PORT = int(os.environ.get("GATEWAY_PORT", "8080")) + OFFSET


def _die_with_parent() -> None:
    """Children get SIGTERM if this launcher dies without cleaning up (Linux prctl)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def say(msg: str) -> None:
    print(f"[make run] {msg}", flush=True)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


def broker_reachable(url: str) -> bool:
    p = urlparse(url)
    try:
        with socket.create_connection((p.hostname or "127.0.0.1", p.port or 5672), timeout=2):
            return True
    except OSError:
        return False


def grpc_serving(port: int) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
            return resp.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def main() -> int:
    from crm_chassis.config import DEFAULT_AMQP_URL
    from crm_chassis.db import ensure_database, start_embedded_postgres, with_database

    LOGS.mkdir(parents=True, exist_ok=True)
    busy = [p for _, p in SERVICES if not port_free(p)] + ([GATEWAY_PORT] if not port_free(GATEWAY_PORT) else [])
    if busy:
        say(f"ports already in use: {busy} - is another `make run` running? Stop it first.")
        return 1

    base_url = os.environ.get("DATABASE_URL")
    if base_url:
        say(f"PostgreSQL: using DATABASE_URL's server ({urlparse(base_url).hostname}), one database per service")
    else:
        say(f"PostgreSQL: starting the embedded server under {RUN / 'pgdata'} ...")
        base_url = start_embedded_postgres(RUN, cleanup="stop")
    amqp = os.environ.get("AMQP_URL", DEFAULT_AMQP_URL)
    if broker_reachable(amqp):
        say(f"RabbitMQ: {urlparse(amqp).hostname}:{urlparse(amqp).port or 5672} is reachable")
    else:
        say(
            f"RabbitMQ is NOT reachable at {urlparse(amqp).hostname}:{urlparse(amqp).port or 5672} (AMQP_URL). "
            "The services will serve anyway; their events wait in the outboxes until the broker is back."
        )

    procs: list[tuple[str, subprocess.Popen]] = []
    env_base = dict(os.environ, AMQP_URL=amqp, CRM_RUN_DIR=str(RUN), PYTHONUNBUFFERED="1")
    for name, port in SERVICES:
        url = with_database(base_url, name.replace("-", "_"))
        ensure_database(url)
        env = dict(env_base, SERVICE_NAME=name, GRPC_PORT=str(port), DATABASE_URL=url)
        log = open(LOGS / f"{name}.log", "ab")
        pkg = name.replace("-", "_")
        procs.append(
            (
                name,
                subprocess.Popen(
                    [PY, "-m", pkg, "serve"], env=env, stdout=log, stderr=log, cwd=ROOT, preexec_fn=_die_with_parent
                ),
            )
        )
    gw_env = dict(
        env_base,
        GATEWAY_PORT=str(GATEWAY_PORT),
        GATEWAY_HOST="127.0.0.1",
        CUSTOMER_SVC_ADDR=f"127.0.0.1:{dict(SERVICES)['customer-svc']}",
        REPORTING_SVC_ADDR=f"127.0.0.1:{dict(SERVICES)['reporting-svc']}",
    )
    gw_log = open(LOGS / "gateway.log", "ab")
    procs.append(
        (
            "gateway",
            subprocess.Popen(
                [PY, "-m", "gunicorn", "-c", str(ROOT / "gateway" / "gunicorn.conf.py"), "crm_gateway:create_app()"],
                env=gw_env,
                stdout=gw_log,
                stderr=gw_log,
                cwd=ROOT,
                preexec_fn=_die_with_parent,
            ),
        )
    )

    stopping = False

    def stop_all(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop_all)
    signal.signal(signal.SIGTERM, stop_all)

    def shutdown(code: int) -> int:
        say("stopping ...")
        for _, p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for name, p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                say(f"{name} did not stop in time; killing it")
                p.kill()
                p.wait()
        say("stopped" + ("" if base_url and os.environ.get("DATABASE_URL") else " (embedded PostgreSQL stops too)"))
        return code

    def dead() -> list[str]:
        return [n for n, p in procs if p.poll() is not None]

    t0 = time.monotonic()
    say("waiting for every service to be healthy ...")
    pending = {n for n, _ in procs}
    while pending and not stopping:
        if dead():
            for n in dead():
                say(f"{n} exited with code {dict(procs)[n].returncode}; last lines of {LOGS / (n + '.log')}:")
                lines = (LOGS / f"{n}.log").read_text(errors="replace").splitlines()[-15:]
                print("\n".join("    " + ln for ln in lines))
            return shutdown(1)
        for name, port in SERVICES:
            if name in pending and grpc_serving(port):
                pending.discard(name)
        if "gateway" in pending and http_ok(f"http://127.0.0.1:{GATEWAY_PORT}/healthz"):
            pending.discard("gateway")
        if time.monotonic() - t0 > 90:
            say(f"still not healthy after 90 s: {sorted(pending)}; see {LOGS}")
            return shutdown(1)
        time.sleep(0.3)
    if stopping:
        return shutdown(130)

    print()
    print(f"  {'what':<16}{'where':<28}{'log'}")
    for name, port in SERVICES:
        print(f"  {name:<16}{'grpc://127.0.0.1:' + str(port):<28}{LOGS / (name + '.log')}")
    print(f"  {'gateway':<16}{'http://127.0.0.1:' + str(GATEWAY_PORT):<28}{LOGS / 'gateway.log'}")
    db_where = urlparse(base_url).hostname or dict(
        p.split("=", 1) for p in (urlparse(base_url).query or "host=").split("&")
    ).get("host", "?")
    print(f"  {'postgresql':<16}{db_where:<28}{'embedded' if not os.environ.get('DATABASE_URL') else 'DATABASE_URL'}")
    print(f"  {'rabbitmq':<16}{(urlparse(amqp).hostname or '') + ':' + str(urlparse(amqp).port or 5672):<28}AMQP_URL")
    print()
    say(f"all healthy in {time.monotonic() - t0:.1f} s. Try:")
    print("    TOKEN=$(.venv/bin/python -m crm_gateway token --sub alice --roles admin)")
    print(f'    curl -s -H "Authorization: Bearer $TOKEN" http://127.0.0.1:{GATEWAY_PORT}/v1/customers')
    say("Ctrl-C stops everything.")
    while not stopping:
        if dead():
            for n in dead():
                say(f"{n} exited unexpectedly (code {dict(procs)[n].returncode}); see {LOGS / (n + '.log')}")
            return shutdown(1)
        time.sleep(0.5)
    return shutdown(0)


if __name__ == "__main__":
    raise SystemExit(main())
