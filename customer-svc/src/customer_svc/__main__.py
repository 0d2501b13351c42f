"""`python -m customer_svc [serve|migrate|relay|consume|work]`"""

from __future__ import annotations

import pathlib

from crm_chassis.service import ServiceContext, ServiceSpec, main

from .api import registration
from .import_service import Importer
from .service_layer import CustomerUseCases
from .settings import load_customer_settings


def importer(ctx: ServiceContext) -> Importer:
    """The use cases and the importer, made once per process (the servicer and the import's job
    worker share them)."""
    if "importer" not in ctx.shared:
        uc = CustomerUseCases(
            ctx.engine,
            ctx.relay,
            ctx.settings.jwt_secret,
            ctx.settings.service_name,
            load_customer_settings().phone_region,
        )
        ctx.shared["importer"] = Importer(uc)
    return ctx.shared["importer"]


def build(ctx: ServiceContext):
    imp = importer(ctx)
    return [registration(imp.uc, imp)]


SPEC = ServiceSpec(
    name="customer-svc",
    default_port=50051,
    migrations=pathlib.Path(__file__).parent / "migrations",
    producer_domain="customer",
    build=build,
    workers=lambda ctx: [importer(ctx).worker],  # imports run as chassis jobs
)


def run() -> int:
    return main(SPEC)


if __name__ == "__main__":
    raise SystemExit(run())
