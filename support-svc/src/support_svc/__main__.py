"""`python -m support_svc [serve|migrate|relay|consume]`"""

from __future__ import annotations

import pathlib

from crm_chassis.service import ServiceSpec, main

SPEC = ServiceSpec(
    name="support-svc",
    default_port=50053,
    migrations=pathlib.Path(__file__).parent / "migrations",
    producer_domain="support",
)


def run() -> int:
    return main(SPEC)


if __name__ == "__main__":
    raise SystemExit(run())
