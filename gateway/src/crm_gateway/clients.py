"""gRPC channels to the services, created once per worker process (after the fork)."""

from __future__ import annotations

import importlib
import os
import threading

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crm_chassis.grpc_client import make_channel
from crm_chassis.registry import load_registry

# The services the gateway calls, from services.toml ([gateway] calls): client key (the service's
# domain) -> (address setting, default), e.g. "customer": ("CUSTOMER_SVC_ADDR", "localhost:50051").
DEFAULT_TARGETS = load_registry().gateway_targets()
CALL_TIMEOUT = float(os.environ.get("GATEWAY_CALL_TIMEOUT_SECONDS", "10"))


class Clients:
    def __init__(self, targets: dict[str, str] | None = None):
        if targets is None:
            targets = {k: os.environ.get(env, default) for k, (env, default) in DEFAULT_TARGETS.items()}
        self.targets = targets
        self.channels = {k: make_channel(v) for k, v in targets.items()}
        self._stubs: dict[str, object] = {}

    def stub(self, service: str):
        """The generated stub of a service by full name (crm.sales.v1.LeadService), on the channel
        of the service that owns its package."""
        stub = self._stubs.get(service)
        if stub is None:
            from .routes import CLIENT_KEYS, SERVICES

            desc = SERVICES[service]
            module = importlib.import_module(desc.file.name.removesuffix(".proto").replace("/", ".") + "_pb2_grpc")
            stub = self._stubs[service] = getattr(module, f"{desc.name}Stub")(self.channels[CLIENT_KEYS[service]])
        return stub

    def health(self) -> dict[str, str]:
        out = {}
        for name, channel in self.channels.items():
            try:
                resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                out[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            except grpc.RpcError as err:
                out[name] = err.code().name
        return out

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()


_lock = threading.Lock()
_clients: Clients | None = None
_pid: int | None = None


def get_clients() -> Clients:
    """The worker's clients; a new set after a fork (a channel never crosses fork())."""
    global _clients, _pid
    with _lock:
        if _clients is None or _pid != os.getpid():
            _clients = Clients()
            _pid = os.getpid()
        return _clients
