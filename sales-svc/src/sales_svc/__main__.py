"""`python -m sales_svc [serve|migrate|relay|consume|work]`"""

from __future__ import annotations

import pathlib

from crm_chassis.service import ServiceContext, ServiceSpec, main

from . import (
    activities,
    api,
    catalog,
    conversion,
    customer_projection,
    forecasts,
    invoices,
    lead_rules,
    leads,
    opportunities,
    orders,
    quotes,
)
from .runtime import sales

# The parts of the service (runtime.py says what each may define).
PARTS = [
    api,  # teams
    catalog,
    leads,
    lead_rules,
    customer_projection,
    conversion,
    opportunities,
    activities,
    quotes,
    orders,
    invoices,
    forecasts,
]


def build(ctx: ServiceContext):
    s = sales(ctx)
    return [p.registration(s) for p in PARTS if hasattr(p, "registration")]


def workers(ctx: ServiceContext):
    s = sales(ctx)
    for p in PARTS:
        if hasattr(p, "timer_handlers"):
            p.timer_handlers(s)
    return [s.timers]


def subscriptions(ctx: ServiceContext):
    s = sales(ctx)
    return [sub for p in PARTS if hasattr(p, "subscriptions") for sub in p.subscriptions(s)]


SPEC = ServiceSpec(
    name="sales-svc",
    default_port=50052,
    migrations=pathlib.Path(__file__).parent / "migrations",
    producer_domain="sales",
    build=build,
    workers=workers,
    subscriptions=subscriptions,
)


def run() -> int:
    return main(SPEC)


if __name__ == "__main__":
    raise SystemExit(run())
