"""`python -m customer_svc [serve|migrate|relay|consume]`"""

from __future__ import annotations

import pathlib

from crm_chassis.service import ServiceContext, ServiceSpec, main

from .api import PERMISSIONS, registration
from .service_layer import CustomerUseCases


def build(ctx: ServiceContext):
    uc = CustomerUseCases(
        ctx.engine, ctx.relay, ctx.settings.jwt_secret, ctx.settings.service_name, ctx.settings.default_phone_region
    )
    return [registration(uc)], PERMISSIONS


SPEC = ServiceSpec(
    name="customer-svc",
    default_port=50051,
    migrations=pathlib.Path(__file__).parent / "migrations",
    producer_domain="customer",
    build=build,
)


def run() -> int:
    return main(SPEC)


if __name__ == "__main__":
    raise SystemExit(run())
