"""The service registry: `services.toml` at the repository root, the one list of the suite's services.

Standard library only (tomllib), so the Makefile and the tools can load this file with a bare
python3 before any virtualenv exists (tools/registry.py loads it by path). The file is found,
in order, at $CRM_REGISTRY (set in the images: /app/services.toml), then in the repository this
module sits in (an editable install), then in the working directory or one of its parents.
"""

from __future__ import annotations

import os
import pathlib
import re
import tomllib
from dataclasses import dataclass

FILE_NAME = "services.toml"
ENV_VAR = "CRM_REGISTRY"
NAME_RE = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")
DOMAIN_RE = re.compile(r"[a-z][a-z0-9_]*")


class RegistryError(ValueError):
    """services.toml is missing or says something inconsistent (the message names the entry)."""


@dataclass(frozen=True)
class ServiceEntry:
    name: str  # customer-svc: also its folder, SERVICE_NAME and the k8s objects' name
    package: str  # customer_svc
    port: int  # gRPC port
    domain: str  # customer: exchange crm.customer.events, the gateway's client key
    publishes: bool = True  # runs the outbox relay
    proto_package: str | None = None  # crm.customer.v1

    @property
    def folder(self) -> str:
        return self.name

    @property
    def exchange(self) -> str:
        return f"crm.{self.domain}.events"

    @property
    def addr_env(self) -> str:
        """The gateway's (or any caller's) setting for this service's address: CUSTOMER_SVC_ADDR."""
        return self.name.upper().replace("-", "_") + "_ADDR"


@dataclass(frozen=True)
class GatewayEntry:
    package: str
    port: int
    calls: tuple[str, ...]
    name: str = "gateway"

    @property
    def folder(self) -> str:
        return self.name


@dataclass(frozen=True)
class Registry:
    path: pathlib.Path
    services: tuple[ServiceEntry, ...]
    gateway: GatewayEntry | None

    @property
    def root(self) -> pathlib.Path:
        return self.path.parent

    def service(self, name: str) -> ServiceEntry:
        for s in self.services:
            if s.name == name:
                return s
        raise KeyError(f"{name} is not in {self.path}")

    def names(self) -> list[str]:
        return [s.name for s in self.services]

    def packages(self) -> list[str]:
        """Python packages of the services and the gateway (crm_chassis is not listed)."""
        return [s.package for s in self.services] + ([self.gateway.package] if self.gateway else [])

    def folders(self) -> list[str]:
        """Installable folders: the services, then the gateway."""
        return [s.folder for s in self.services] + ([self.gateway.folder] if self.gateway else [])

    def gateway_targets(self) -> dict[str, tuple[str, str]]:
        """What the gateway calls: client key (domain) -> (address setting, default address)."""
        if self.gateway is None:
            return {}
        out = {}
        for name in self.gateway.calls:
            s = self.service(name)
            out[s.domain] = (s.addr_env, f"localhost:{s.port}")
        return out

    def next_free_port(self) -> int:
        ports = [s.port for s in self.services]
        return max(ports) + 1 if ports else 50051


def registry_path() -> pathlib.Path:
    env = os.environ.get(ENV_VAR)
    if env:
        return pathlib.Path(env)
    here = pathlib.Path(__file__).resolve()
    # chassis/src/crm_chassis/registry.py -> the repository root, when installed editable.
    candidates = [here.parents[3] / FILE_NAME] if len(here.parents) > 3 else []
    cwd = pathlib.Path.cwd().resolve()
    candidates += [d / FILE_NAME for d in (cwd, *cwd.parents)]
    for c in candidates:
        if c.is_file():
            return c
    raise RegistryError(f"{FILE_NAME} not found (set {ENV_VAR} to its path)")


def _field(where: str, table: dict, key: str, kind: type, default=None, required: bool = True):
    if key not in table:
        if required:
            raise RegistryError(f"{where}: `{key}` is missing")
        return default
    value = table[key]
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise RegistryError(f"{where}: `{key}` must be {kind.__name__}, not {value!r}")
    return value


def parse_registry(text: str, path: pathlib.Path) -> Registry:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RegistryError(f"{path}: {exc}") from exc
    unknown = set(data) - {"services", "gateway"}
    if unknown:
        raise RegistryError(f"{path}: unknown table(s) {', '.join(sorted(unknown))}")
    services = []
    for name, table in (data.get("services") or {}).items():
        where = f"{path.name} [services.{name}]"
        if not NAME_RE.fullmatch(name):
            raise RegistryError(f"{where}: the name must be lower-case words joined by '-' (e.g. loyalty-svc)")
        extra = set(table) - {"package", "port", "domain", "publishes", "proto_package"}
        if extra:
            raise RegistryError(f"{where}: unknown key(s) {', '.join(sorted(extra))}")
        entry = ServiceEntry(
            name=name,
            package=_field(where, table, "package", str),
            port=_field(where, table, "port", int),
            domain=_field(where, table, "domain", str),
            publishes=_field(where, table, "publishes", bool, True, required=False),
            proto_package=_field(where, table, "proto_package", str, None, required=False),
        )
        if not entry.package.isidentifier():
            raise RegistryError(f"{where}: `package` {entry.package!r} is not a Python identifier")
        if not DOMAIN_RE.fullmatch(entry.domain):
            raise RegistryError(f"{where}: `domain` {entry.domain!r} must be a lower-case word")
        if not 1024 <= entry.port <= 65535:
            raise RegistryError(f"{where}: `port` {entry.port} is outside 1024..65535")
        services.append(entry)
    gateway = None
    if "gateway" in data:
        g = data["gateway"]
        where = f"{path.name} [gateway]"
        calls = _field(where, g, "calls", list, [], required=False)
        gateway = GatewayEntry(
            package=_field(where, g, "package", str), port=_field(where, g, "port", int), calls=tuple(calls)
        )
        known = {s.name for s in services}
        for c in gateway.calls:
            if c not in known:
                raise RegistryError(f"{where}: `calls` names {c!r}, which is not a service")
    for attr in ("name", "package", "port", "domain"):
        seen: dict = {}
        for s in services:
            value = getattr(s, attr)
            if value in seen:
                raise RegistryError(f"{path.name}: {s.name} and {seen[value]} have the same {attr} {value!r}")
            seen[value] = s.name
        if gateway and attr == "port" and gateway.port in seen:
            raise RegistryError(f"{path.name}: the gateway and {seen[gateway.port]} have the same port {gateway.port}")
    return Registry(path=path, services=tuple(services), gateway=gateway)


def load_registry(path: str | os.PathLike | None = None) -> Registry:
    """The registry at `path`, or the one registry_path() finds."""
    p = pathlib.Path(path) if path is not None else registry_path()
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise RegistryError(f"cannot read {p}: {exc}") from exc
    return parse_registry(text, p.resolve())
