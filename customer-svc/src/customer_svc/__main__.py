"""`python -m customer_svc [serve|migrate|relay|consume]`"""

from __future__ import annotations

import pathlib

from crm_chassis.service import ServiceContext, ServiceSpec, main

from .api import registration
from .service_layer import CustomerUseCases
from .settings import load_customer_settings


def build(ctx: ServiceContext):
    uc = CustomerUseCases(
        ctx.engine, ctx.relay, ctx.settings.jwt_secret, ctx.settings.service_name, load_customer_settings().phone_region
    )
    return [registration(uc)]


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
