"""`python3 tools/new_service.py NAME`: a new, working service in one command.

Creates, for NAME (e.g. loyalty-svc; package loyalty_svc, domain loyalty):

  NAME/pyproject.toml, NAME/src/<package>/     __main__ (ServiceSpec), api.py (the servicer),
                                               migrations (Alembic env + 0001: outbox, inbox)
  NAME/tests/test_service.py                   it serves health and reflection
  proto/crm/<domain>/v1/<domain>_service.proto the contract: an empty <Domain>Service
  k8s/base/NAME/                               kustomization.yaml + values.yaml on
                                               components/grpc-service
  services.toml                                its entry (port: the next free one, or --port)

Standard library only. Then: `make venv proto` (installs it, generates its stubs), write the
domain code (RPCs in the proto, handlers in api.py, tables in migrations), and add its base,
image and Secrets to the overlays you deploy (k8s/README.md).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import registry as registry_tool  # noqa: E402  (tools/registry.py)

ROOT = registry_tool.ROOT


def camel(domain: str) -> str:
    return "".join(part.capitalize() for part in domain.split("_"))


FILES = {
    "{name}/pyproject.toml": """\
[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "{name}"
version = "0.1.0"
description = "CRM {name}: {summary}"
requires-python = ">=3.11"
dependencies = ["crm-chassis", "crm-protos"]

[project.scripts]
{name} = "{package}.__main__:run"

[tool.setuptools.packages.find]
where = ["src"]

[tool.setuptools.package-data]
{package} = ["migrations/*.py", "migrations/versions/*.py"]
""",
    "{name}/src/{package}/__init__.py": '''\
"""{name}: {summary}"""
''',
    "{name}/src/{package}/__main__.py": '''\
"""`python -m {package} [serve|migrate|relay|consume]`"""

from __future__ import annotations

import pathlib

from crm_chassis.service import ServiceContext, ServiceSpec, main

from .api import registration


def build(ctx: ServiceContext):
    return [registration(ctx)]


SPEC = ServiceSpec(
    name="{name}",
    default_port={port},
    migrations=pathlib.Path(__file__).parent / "migrations",
    producer_domain="{domain}",
    build=build,
)


def run() -> int:
    return main(SPEC)


if __name__ == "__main__":
    raise SystemExit(run())
''',
    "{name}/src/{package}/api.py": '''\
"""The gRPC API of {name} (proto/crm/{domain}/v1/{domain}_service.proto)."""

from __future__ import annotations

from crm.{domain}.v1 import {domain}_service_pb2_grpc
from crm_chassis.grpc_server import Registration
from crm_chassis.service import ServiceContext


class {camel}Servicer({domain}_service_pb2_grpc.{camel}ServiceServicer):
    """The RPCs of {camel}Service; ctx.engine is the database, ctx.relay the outbox relay."""

    def __init__(self, ctx: ServiceContext):
        self.ctx = ctx


def registration(ctx: ServiceContext) -> Registration:
    return Registration.of({camel}Servicer(ctx))
''',
    "{name}/src/{package}/migrations/env.py": """\
from crm_chassis.db import run_alembic_env

run_alembic_env()
""",
    "{name}/src/{package}/migrations/versions/0001_initial.py": '''\
"""The chassis tables: outbox, inbox, audit trail, timers, jobs (crm_chassis.migrations)

Revision ID: 0001
"""

from crm_chassis.migrations import first_revision

revision, down_revision = "0001", None
upgrade, downgrade = first_revision()
''',
    "{name}/tests/test_service.py": '''\
"""{name} starts, migrates its database and answers health and reflection."""

from __future__ import annotations

import grpc
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from {package}.__main__ import SPEC
from tests.support.harness import channel, start_service

OWN = "crm.{domain}.v1.{camel}Service"


def test_it_serves_health_and_reflection(databases, broker):
    service = start_service(SPEC, databases.fresh("{package}"), broker.url)
    try:
        with channel(service) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for name in ("", OWN):
                status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
                assert status == health_pb2.HealthCheckResponse.SERVING, name
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            answer = next(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(iter([request]), timeout=5))
            assert OWN in {{s.name for s in answer.list_services_response.service}}
            try:
                health.Check(health_pb2.HealthCheckRequest(service="crm.nope.v1.Nope"), timeout=5)
                raise AssertionError("an unknown service has no health status")
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.NOT_FOUND
        with service.ctx.engine.connect() as conn:  # migrated: the outbox exists
            assert conn.execute(sa.text("SELECT count(*) FROM outbox")).scalar() == 0
    finally:
        service.stop(0)
''',
    "proto/crm/{domain}/v1/{domain}_service.proto": """\
syntax = "proto3";

package crm.{domain}.v1;

// {name}: {summary}
// Add its RPCs here; `make proto` regenerates the stubs and `make lint` runs buf lint.
// Each RPC names the permission it needs: option (crm.options.v1.permission) = "...";
// (import "crm/options/v1/options.proto"); the service refuses to start without it.
service {camel}Service {{}}
""",
    "k8s/base/{name}/values.yaml": """\
# What differs for {name}; the rest is components/grpc-service (its kustomization.yaml says how
# these values reach the manifests). Not applied: local config.
apiVersion: crm.example.com/v1
kind: ServiceValues
metadata:
  name: {name}
  annotations:
    config.kubernetes.io/local-config: "true"
spec:
  port: {port}
""",
    "k8s/base/{name}/kustomization.yaml": """\
# {name}: {summary}
# Deployable on its own:  kubectl apply -k k8s/base/{name}
# It needs three Secrets in its namespace (see k8s/README.md): {name}-db-app (key uri),
# {name}-amqp (key url) and crm-jwt (key secret).
# Its shape is components/grpc-service; values.yaml holds its name and port.
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - values.yaml
components:
  - ../../components/grpc-service
images:
  - name: {name}
    newName: registry.example.com/crm/{name}
    newTag: 0.1.0
""",
}


def registry_entry(v: dict) -> str:
    return (
        f"[services.{v['name']}]\n"
        f'package = "{v["package"]}"\n'
        f"port = {v['port']}\n"
        f'domain = "{v["domain"]}"\n'
        f'proto_package = "crm.{v["domain"]}.v1"\n'
    )


def add_to_registry(path: pathlib.Path, entry: str) -> None:
    """Insert the entry after the last [services.*] table (before [gateway] and its comment)."""
    lines = path.read_text().splitlines(keepends=True)
    at = next((i for i, ln in enumerate(lines) if ln.strip() == "[gateway]"), len(lines))
    while at > 0 and lines[at - 1].startswith("#"):
        at -= 1
    block = entry + "\n"
    if at > 0 and lines[at - 1].strip():
        block = "\n" + block
    lines[at:at] = [block]
    path.write_text("".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Create a new service (see the module docstring).")
    parser.add_argument("name", help="the service's name, e.g. loyalty-svc")
    parser.add_argument("--port", type=int, help="gRPC port (default: the next free one in services.toml)")
    parser.add_argument("--domain", help="event domain and proto folder (default: the name without -svc)")
    parser.add_argument("--summary", default="(describe it).", help="one line for the docstrings and manifests")
    parser.add_argument("--root", type=pathlib.Path, default=ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    root = args.root.resolve()
    reg_path = root / registry_tool.registry.FILE_NAME
    reg = registry_tool.load(reg_path)
    name = args.name
    domain = args.domain or name.removesuffix("-svc").replace("-", "_")
    values = {
        "name": name,
        "package": name.replace("-", "_"),
        "port": args.port or reg.next_free_port(),
        "domain": domain,
        "camel": camel(domain),
        "summary": args.summary,
    }
    if name in reg.names():
        parser.error(f"{name} is already in {reg_path.name}")
    # The registry's own checks (name, package, port, domain, duplicates) on the result.
    text = reg_path.read_text()
    try:
        registry_tool.registry.parse_registry(text + "\n" + registry_entry(values), reg_path)
    except registry_tool.registry.RegistryError as exc:
        parser.error(str(exc))
    targets = {root / rel.format(**values): body.format(**values) for rel, body in FILES.items()}
    existing = [str(p.relative_to(root)) for p in targets if p.exists()]
    if (root / name).exists():
        existing.insert(0, f"{name}/")
    if existing:
        parser.error(f"already there: {', '.join(existing)}")

    for path, body in targets.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
    add_to_registry(reg_path, registry_entry(values))
    registry_tool.load(reg_path)  # still parses
    print(f"created {name} (package {values['package']}, port {values['port']}, domain {domain}):")
    for path in sorted(targets):
        print(f"  {path.relative_to(root)}")
    print("  services.toml (entry added)")
    print("next: make venv proto && .venv/bin/pytest " + f"{name}/tests")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
