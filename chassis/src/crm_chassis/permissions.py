"""Permissions as the contracts declare them (proto/crm/options/v1/options.proto).

Each RPC names the permission it needs in its descriptor:

    rpc GetCustomer(GetCustomerRequest) returns (Customer) {
      option (crm.options.v1.permission) = "customers.read";
    }

`method_permissions` reads them for the services a server registers and refuses (SystemExit)
a service with an RPC that declares none. `declared_permissions` collects every permission any
contract of the suite declares, per RPC or checked inside RPCs (a service's
`checked_permissions`, e.g. customers.pii): the roles file is checked against it at start.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from functools import lru_cache

from google.protobuf import descriptor

from crm.options.v1 import options_pb2

# Every contract's generated modules live in this package (crm-protos, proto/gen).
CONTRACTS_PACKAGE = "crm"


def method_permission(method: descriptor.MethodDescriptor) -> str:
    """The permission an RPC declares; "" if none."""
    return method.GetOptions().Extensions[options_pb2.permission]


def method_permissions(services: Iterable[descriptor.ServiceDescriptor]) -> dict[str, str]:
    """'/crm.customer.v1.CustomerService/GetCustomer' -> 'customers.read' for every RPC of these
    services. An RPC without a permission stops the process, naming it: a method nobody thought
    about must not be callable by any authenticated caller."""
    rules: dict[str, str] = {}
    missing: list[str] = []
    for service in services:
        for method in service.methods:
            full = f"/{service.full_name}/{method.name}"
            permission = method_permission(method)
            if permission:
                rules[full] = permission
            else:
                missing.append(full)
    if missing:
        raise SystemExit(
            f"methods without a permission rule: {missing}; declare one in the proto: "
            'option (crm.options.v1.permission) = "<domain>.<verb>";'
        )
    return rules


def service_permissions(service: descriptor.ServiceDescriptor) -> set[str]:
    """What one service declares: its RPCs' permissions and the ones it checks inside them."""
    found = {p for m in service.methods if (p := method_permission(m))}
    found.update(service.GetOptions().Extensions[options_pb2.checked_permissions])
    return found


@lru_cache(maxsize=1)
def declared_permissions() -> frozenset[str]:
    """Every permission declared by a service of any contract in the `crm` package."""
    package = importlib.import_module(CONTRACTS_PACKAGE)
    found: set[str] = set()
    for info in pkgutil.walk_packages(package.__path__, CONTRACTS_PACKAGE + "."):
        if not info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(info.name)
        for service in module.DESCRIPTOR.services_by_name.values():
            found |= service_permissions(service)
    return frozenset(found)
