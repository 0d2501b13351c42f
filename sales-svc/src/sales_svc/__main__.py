"""`python -m sales_svc [serve|migrate|relay|consume|work]`"""

from __future__ import annotations

from crm_chassis.parts import parts_spec
from crm_chassis.service import main

from . import (
    activities,
    api,
    campaign_responses,
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
    web_behavior,
)
from .runtime import sales

# The parts of the service (crm_chassis.parts says what each may define).
PARTS = [
    api,  # teams
    catalog,
    leads,
    lead_rules,
    customer_projection,
    campaign_responses,  # campaign-svc's responses become leads
    web_behavior,  # campaign-svc's click-stream and clicks score leads
    conversion,
    opportunities,
    activities,
    quotes,
    orders,
    invoices,
    forecasts,
]


SPEC = parts_spec("sales-svc", 50052, __file__, "sales", PARTS, make=sales)


def run() -> int:
    return main(SPEC)


if __name__ == "__main__":
    raise SystemExit(run())
