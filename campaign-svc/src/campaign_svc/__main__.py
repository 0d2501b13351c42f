"""`python -m campaign_svc [serve|migrate|relay|consume|work]`"""

from __future__ import annotations

from crm_chassis.parts import parts_spec
from crm_chassis.service import main

from . import (
    audience,
    campaigns,
    channels,
    consent_api,
    delivery,
    loyalty,
    loyalty_api,
    segments,
    templates,
    tracking,
)
from .runtime import campaign

# The parts of the service (crm_chassis.parts says what each may define; runtime.py the hooks).
PARTS = [
    audience,  # the customer projection with sales and support behaviour, from their events
    consent_api,  # ConsentService: the ledger, double opt-in, unsubscribe links, SMS stop, suppressions
    segments,  # dynamic, static and combined segments; membership kept current (SegmentService)
    channels,  # the channel senders (e-mail over SMTP, SMS providers, Telegram / Bale bots)
    templates,  # TemplateService: templates, versions, rendering, test sends
    campaigns,  # CampaignService: campaigns, runs, A/B winner, clone, stats
    delivery,  # the delivery workers: throttled, consent re-checked, never sent twice
    loyalty,  # the loyalty club's ledger: earning and reversal from sales events, expiry and tier timers
    loyalty_api,  # LoyaltyService: programmes, members, balances, redemptions, adjustments
    tracking,  # TrackingService: opens, clicks, bounces, receipts, the site's click-stream, responses
]

SPEC = parts_spec("campaign-svc", 50054, __file__, "campaign", PARTS, make=lambda ctx: campaign(ctx, PARTS))


def run() -> int:
    return main(SPEC)


if __name__ == "__main__":
    raise SystemExit(run())
