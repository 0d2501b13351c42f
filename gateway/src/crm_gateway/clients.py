"""gRPC channels to the services, created once per worker process (after the fork)."""

from __future__ import annotations

import os
import threading

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crm.customer.v1 import customer_service_pb2_grpc
from crm.reporting.v1 import reporting_service_pb2_grpc
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
        self.customers = customer_service_pb2_grpc.CustomerServiceStub(self.channels["customer"])
        self.reporting = reporting_service_pb2_grpc.ReportingServiceStub(self.channels["reporting"])

    def stub(self, service: str):
        return {"customer": self.customers, "reporting": self.reporting}[service]

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
