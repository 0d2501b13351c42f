"""`python -m support_svc [serve|migrate|relay|consume|work|mail-in]`"""

from __future__ import annotations

from crm_chassis.parts import parts_spec
from crm_chassis.service import main

from . import answers, customer_projection, knowledge, ticketing
from .runtime import support

# The parts of the service (crm_chassis.parts says what each may define; runtime.py the hooks).
PARTS = [
    ticketing,  # the core: opening, messages, states, delivery of replies
    customer_projection,
    answers,  # canned answers, replies from them, suggestions for a ticket
    knowledge,  # the knowledge base: categories, articles, search, ratings
]

SPEC = parts_spec("support-svc", 50053, __file__, "support", PARTS, make=lambda ctx: support(ctx, PARTS))


def run() -> int:
    return main(SPEC)


if __name__ == "__main__":
    raise SystemExit(run())
