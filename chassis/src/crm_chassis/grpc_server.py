"""gRPC server bootstrap shared by every service.

One call builds a sync grpc.server (faster than grpc.aio on these machines, see
PERFORMANCE.md) with the chassis interceptor, the OpenTelemetry server interceptor, the
non-blocking health service and reflection. Health is readiness: NOT_SERVING while the
service's database cannot be reached (a probe checks every second), SERVING again when it is
back; the `liveness` health name stays SERVING until shutdown. `stop` (called on
SIGTERM/SIGINT by Service.run_until_signal) flips health to NOT_SERVING, refuses new calls,
lets in-flight calls drain for the grace period and stops the background workers (outbox
relay, consumers).
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .auth import TokenVerifier
from .config import Settings
from .db import DatabaseProbe
from .interceptors import ServerInterceptor
from .permissions import method_permissions

log = logging.getLogger("crm.server")

MAX_MESSAGE_BYTES = 65 * 1024 * 1024
LIVENESS = "liveness"  # a health name that says only "the process serves" (for liveness probes)


class BackgroundWorker(Protocol):
    name: str

    def start(self) -> None: ...

    def stop(self, timeout: float) -> None: ...


@dataclass
class Registration:
    """A servicer and how to add it: `Registration(CustomerServiceServicer(), add_CustomerServiceServicer_to_server,
    customer_service_pb2.DESCRIPTOR.services_by_name["CustomerService"])`."""

    servicer: Any
    add_to_server: Callable[[Any, grpc.Server], None]
    descriptor: Any  # google.protobuf.descriptor.ServiceDescriptor

    @classmethod
    def of(cls, servicer: Any) -> Registration:
        """The registration of a servicer subclassing a generated `<Name>Servicer`: its
        `add_<Name>Servicer_to_server` and service descriptor come from the generated modules."""
        for base in type(servicer).__mro__:
            module = sys.modules.get(base.__module__)
            add = getattr(module, f"add_{base.__name__}_to_server", None)
            if add is not None and base.__module__.endswith("_pb2_grpc"):
                pb2 = importlib.import_module(base.__module__.removesuffix("_grpc"))
                return cls(servicer, add, pb2.DESCRIPTOR.services_by_name[base.__name__.removesuffix("Servicer")])
        raise TypeError(f"{type(servicer).__name__} subclasses no generated gRPC servicer")


class GrpcService:
    def __init__(
        self,
        settings: Settings,
        registrations: list[Registration],
        workers: list[BackgroundWorker] | None = None,
        port: int | None = None,
        database=None,  # the service's sa.Engine: readiness follows its reachability
    ):
        self.settings = settings
        self.registrations = registrations
        self.workers = workers or []
        # What each RPC needs, from its descriptor; an RPC that declares nothing stops the start.
        permissions = method_permissions(reg.descriptor for reg in registrations)
        self._serving = False
        self._health_lock = threading.Lock()
        self.database_probe = DatabaseProbe(database, on_change=self._on_database) if database is not None else None
        interceptors: list[grpc.ServerInterceptor] = []
        try:
            from opentelemetry.instrumentation.grpc import server_interceptor

            interceptors.append(server_interceptor())
        except ImportError:  # pragma: no cover
            pass
        interceptors.append(
            ServerInterceptor(
                TokenVerifier.from_settings(settings),
                permissions,
                on_database_unavailable=self.database_probe.nudge if self.database_probe else None,
            )
        )
        self._executor = futures.ThreadPoolExecutor(max_workers=settings.grpc_max_workers, thread_name_prefix="grpc")
        self.server = grpc.server(
            self._executor,
            interceptors=interceptors,
            options=[
                # A second process on the same port must fail loudly, not share it silently.
                ("grpc.so_reuseport", 0),
                # Imports carry whole files (up to 64 MiB); everything else is far smaller.
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self.health = health.HealthServicer(
            experimental_non_blocking=True,
            experimental_thread_pool=futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="health"),
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
        for reg in registrations:
            reg.add_to_server(reg.servicer, self.server)
            names.append(reg.descriptor.full_name)
        reflection.enable_server_reflection(names, self.server)
        self.port = self.server.add_insecure_port(f"[::]:{settings.grpc_port if port is None else port}")
        if self.port == 0:
            raise SystemExit(f"{settings.service_name}: cannot bind gRPC port {settings.grpc_port}")
        self._stopped = threading.Event()

    def _set_serving(self, status) -> None:
        self.health.set("", status)
        for reg in self.registrations:
            self.health.set(reg.descriptor.full_name, status)

    def _on_database(self, up: bool) -> None:
        with self._health_lock:
            if self._serving and not self._stopped.is_set():
                self._set_serving(self._readiness(up))

    @staticmethod
    def _readiness(up: bool | None):
        return health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING

    def start(self) -> GrpcService:
        self.server.start()
        for worker in self.workers:
            worker.start()
        # Consumers declare their queues before the service says SERVING, so nothing a caller
        # triggers right after can be routed before the queue exists. A broker that is down
        # does not hold the service back for long: events wait in the outboxes meanwhile.
        for worker in self.workers:
            ready = getattr(worker, "ready", None)
            if ready is not None and not ready.wait(5.0):
                log.warning("serving before %s is connected to the broker", worker.name)
        self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        if self.database_probe is not None:
            self.database_probe.start()  # checks once before answering
        with self._health_lock:
            self._serving = True
            self._set_serving(self._readiness(self.database_probe.up if self.database_probe else True))
        log.info("serving", extra={"port": self.port, "services": [r.descriptor.full_name for r in self.registrations]})
        return self

    def stop(self, grace: float | None = None) -> None:
        """Graceful stop: NOT_SERVING, refuse new calls, drain in-flight calls, stop workers."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        log.info("shutting down", extra={"grace_seconds": grace})
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        if self.database_probe is not None:
            self.database_probe.stop()
        # Workers stop after the RPCs: events written by the last calls are still relayed
        # when the broker is up (the relay drains its outbox on stop).
        for worker in reversed(self.workers):
            try:
                worker.stop(timeout=max(grace, 1.0))
            except Exception:
                log.exception("worker %s did not stop cleanly", getattr(worker, "name", worker))
        self._executor.shutdown(wait=False)
        log.info("stopped")
