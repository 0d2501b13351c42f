"""`python -m reporting_svc [serve|migrate|consume]`"""

from __future__ import annotations

import pathlib

from crm_chassis.service import ServiceContext, ServiceSpec, main

from . import projections
from .api import registration


def build(ctx: ServiceContext):
    return [registration(ctx.engine)]


SPEC = ServiceSpec(
    name="reporting-svc",
    default_port=50055,
    migrations=pathlib.Path(__file__).parent / "migrations",
    build=build,
    subscriptions=lambda ctx: projections.subscriptions(),
)


def run() -> int:
    return main(SPEC)


if __name__ == "__main__":
    raise SystemExit(run())
