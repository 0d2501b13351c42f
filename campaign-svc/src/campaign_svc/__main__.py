"""`python -m campaign_svc [serve|migrate|relay|consume]`"""

from __future__ import annotations

import pathlib

from crm_chassis.service import ServiceSpec, main

SPEC = ServiceSpec(
    name="campaign-svc",
    default_port=50054,
    migrations=pathlib.Path(__file__).parent / "migrations",
    producer_domain="campaign",
)


def run() -> int:
    return main(SPEC)


if __name__ == "__main__":
    raise SystemExit(run())
