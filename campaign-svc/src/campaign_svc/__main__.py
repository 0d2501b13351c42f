"""`python -m campaign_svc [serve|migrate|relay|consume|work]`"""

from __future__ import annotations

from crm_chassis.parts import parts_spec
from crm_chassis.service import main

from . import api, audience, channels, consent_api, segments, templates
from .runtime import campaign

# The parts of the service (crm_chassis.parts says what each may define; runtime.py the hooks).
PARTS = [
    audience,  # the customer projection with sales and support behaviour, from their events
    consent_api,  # ConsentService: the ledger, double opt-in, unsubscribe links, SMS stop, suppressions
    segments,  # dynamic, static and combined segments; membership kept current (SegmentService)
    api,  # CampaignService
    channels,  # the channel senders (e-mail over SMTP, SMS providers, Telegram / Bale bots)
    templates,  # TemplateService: templates, versions, rendering, test sends
]

SPEC = parts_spec("campaign-svc", 50054, __file__, "campaign", PARTS, make=lambda ctx: campaign(ctx, PARTS))


def run() -> int:
    return main(SPEC)


if __name__ == "__main__":
    raise SystemExit(run())
