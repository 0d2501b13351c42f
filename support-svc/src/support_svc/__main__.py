"""`python -m support_svc [serve|migrate|relay|consume|work|mail-in]`"""

from __future__ import annotations

from crm_chassis.parts import parts_spec
from crm_chassis.service import main

from . import customer_projection, sla, sla_api, ticketing
from .runtime import support

# The parts of the service (crm_chassis.parts says what each may define; runtime.py the hooks).
PARTS = [
    ticketing,  # the core: opening, messages, states, delivery of replies
    customer_projection,
    sla,  # SLA engine: clocks from state intervals, warn/breach timers, breach actions
    sla_api,  # SlaService: policies, RecomputeSla, GetTicketSla
]

SPEC = parts_spec("support-svc", 50053, __file__, "support", PARTS, make=lambda ctx: support(ctx, PARTS))


def run() -> int:
    return main(SPEC)


if __name__ == "__main__":
    raise SystemExit(run())
