"""`python -m sales_svc [serve|migrate|relay|consume]`"""

from __future__ import annotations

import pathlib

from crm_chassis.service import ServiceSpec, main

SPEC = ServiceSpec(
    name="sales-svc",
    default_port=50052,
    migrations=pathlib.Path(__file__).parent / "migrations",
    producer_domain="sales",
)


def run() -> int:
    return main(SPEC)


if __name__ == "__main__":
    raise SystemExit(run())
