"""The entrypoint every service shares: `python -m <package> serve | migrate | relay | consume | work`.

`serve` migrates (under an advisory lock, so replicas may race), then runs the gRPC server,
the outbox relay and the event consumers in one process; the single-role commands let a
platform team run each role on its own (a migration Job, a relay-only Deployment, ...).
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import sqlalchemy as sa

from .auth import configure_roles
from .config import ConfigError, Settings, load_settings
from .db import create_engine, migrate, resolve_database_url
from .grpc_server import BackgroundWorker, GrpcService, Registration
from .logging import configure_logging
from .messaging.consumer import EventConsumer, Subscription
from .messaging.outbox import OutboxRelay
from .messaging.topology import declare_producer
from .telemetry import setup_telemetry

log = logging.getLogger("crm.service")


@dataclass
class ServiceContext:
    settings: Settings
    engine: sa.Engine
    database_url: str
    relay: OutboxRelay | None = None
    # Objects a service's build and workers share, made once (e.g. its use cases).
    shared: dict = field(default_factory=dict)


@dataclass
class ServiceSpec:
    name: str  # customer-svc
    default_port: int
    migrations: pathlib.Path  # the service's Alembic script directory
    producer_domain: str | None = None  # "customer": publishes to crm.customer.events
    # Build the servicers, given the context (engine, relay, ...). The permission each RPC needs
    # comes from its descriptor (option (crm.options.v1.permission)), not from here.
    build: Callable[[ServiceContext], list[Registration]] = lambda ctx: []
    subscriptions: Callable[[ServiceContext], list[Subscription]] = field(default=lambda ctx: [])
    # More background workers (a crm_chassis.timers.TimerWorker, a crm_chassis.jobs.JobWorker):
    # started and stopped with the service (SIGTERM releases running jobs to another replica).
    workers: Callable[[ServiceContext], list[BackgroundWorker]] = field(default=lambda ctx: [])
    # Commands of the service's own (`python -m support_svc mail-in`): role -> its workers. A
    # role's command runs only those; `serve` runs them with everything else.
    roles: Callable[[ServiceContext], dict[str, list[BackgroundWorker]]] = field(default=lambda ctx: {})
    role_names: tuple[str, ...] = ()


class Service:
    """A running service, also used in-process by tests and benchmarks."""

    def __init__(
        self,
        spec: ServiceSpec,
        settings: Settings | None = None,
        *,
        run_migrations: bool = True,
        relay: bool = True,
        consumers: bool = True,
        background: bool = True,
        grpc: bool = True,
        port: int | None = None,
        role: str | None = None,
    ):
        self.spec = spec
        self.settings = settings or load_settings(spec.name, spec.default_port)
        setup_telemetry(self.settings.service_name, self.settings.otel_endpoint)
        configure_roles(self.settings)  # a bad roles file stops the start, before any migration
        url = resolve_database_url(self.settings)
        if run_migrations:
            migrate(url, spec.migrations)
        engine = create_engine(url, pool_size=self.settings.grpc_max_workers + 1 + self.settings.consumer_threads)
        self.ctx = ServiceContext(settings=self.settings, engine=engine, database_url=url)
        workers = []
        if relay and spec.producer_domain:
            self.ctx.relay = OutboxRelay(
                engine,
                self.settings.amqp_url,
                declare=lambda ch: declare_producer(ch, spec.producer_domain),
                batch_size=self.settings.relay_batch_size,
                poll_seconds=self.settings.relay_poll_seconds,
            )
            workers.append(self.ctx.relay)
        # CONSUMER_THREADS competing consumers of the same queues (each its own connection and
        # database session): while one waits for PostgreSQL the next runs its handlers.
        self.consumers: list[EventConsumer] = []
        subs = spec.subscriptions(self.ctx) if consumers else []
        if self.settings.consumer_domains:  # one producer's queues per process (CONSUMER_DOMAINS)
            unknown = set(self.settings.consumer_domains) - {s.domain for s in subs}
            if consumers and unknown:
                raise ConfigError(
                    [
                        f"CONSUMER_DOMAINS names {', '.join(sorted(unknown))}, which {spec.name} does not "
                        f"consume (it consumes {', '.join(sorted({s.domain for s in subs})) or 'nothing'})"
                    ]
                )
            subs = [s for s in subs if s.domain in self.settings.consumer_domains]
        if subs:
            self.consumers = [
                EventConsumer(
                    engine,
                    self.settings.amqp_url,
                    self.settings.service_name,
                    subs,
                    prefetch=self.settings.consumer_prefetch,
                    delivery_limit=self.settings.consumer_delivery_limit,
                    batch_size=self.settings.consumer_batch,
                    batch_wait=self.settings.consumer_batch_wait,
                )
                for _ in range(self.settings.consumer_threads)
            ]
            workers += self.consumers
        self.consumer: EventConsumer | None = self.consumers[0] if self.consumers else None
        self.workers = workers
        self.grpc: GrpcService | None = None
        registrations = spec.build(self.ctx) if grpc else []
        if isinstance(registrations, tuple):
            raise TypeError(
                f"{spec.name}: ServiceSpec.build returns the registrations only; each RPC's "
                "permission is declared in its proto (crm.options.v1.permission)"
            )
        if background:
            workers += spec.workers(self.ctx)
        if (background and grpc) or role:
            extra = spec.roles(self.ctx)
            for name, ws in extra.items():
                if role is None or name == role:
                    workers += ws
        if grpc:
            self.grpc = GrpcService(self.settings, registrations, workers, port=port, database=engine)

    @property
    def port(self) -> int:
        return self.grpc.port if self.grpc else 0

    def start(self) -> Service:
        if self.grpc:
            self.grpc.start()
        else:
            for w in self.workers:
                w.start()
        return self

    def stop(self, grace: float | None = None) -> None:
        if self.grpc:
            self.grpc.stop(grace)
        else:
            for w in reversed(self.workers):
                w.stop(timeout=grace or 5.0)
        self.ctx.engine.dispose()

    def run_until_signal(self) -> None:
        """Serve until SIGTERM or SIGINT, then stop gracefully (see GrpcService.stop)."""
        done = threading.Event()

        def _handler(signum, _frame):
            log.info("signal received", extra={"signal": signal.Signals(signum).name})
            done.set()

        signal.signal(signal.SIGTERM, _handler)
        signal.signal(signal.SIGINT, _handler)
        self.start()
        done.wait()
        self.stop()


def main(spec: ServiceSpec, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {spec.name.replace('-', '_')}", description=spec.name)
    parser.add_argument(
        "command",
        nargs="?",
        default="serve",
        choices=["serve", "migrate", "relay", "consume", "work", *spec.role_names],
        help="serve: gRPC + relay + consumers + timers and jobs + the service's own roles (default); "
        "migrate: upgrade the database and exit; relay: only the outbox relay; consume: only the event "
        "consumers; work: only the service's timer and job workers"
        + "".join(f"; {r}: only that role of the service" for r in spec.role_names),
    )
    args = parser.parse_args(argv)
    settings = load_settings(spec.name, spec.default_port)
    configure_logging(settings.service_name, settings.log_level)
    if args.command == "migrate":
        url = resolve_database_url(settings)
        migrate(url, spec.migrations)
        log.info("migrated")
        return 0
    service = Service(
        spec,
        settings,
        grpc=args.command == "serve",
        relay=args.command in ("serve", "relay"),
        consumers=args.command in ("serve", "consume"),
        background=args.command in ("serve", "work"),
        role=args.command if args.command in spec.role_names else None,
    )
    service.run_until_signal()
    return 0
