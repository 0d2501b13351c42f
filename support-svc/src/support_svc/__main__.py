"""`python -m support_svc [serve|migrate|relay|consume|work|mail-in]`"""

from __future__ import annotations

from crm_chassis.parts import parts_spec
from crm_chassis.service import main

from . import (
    agents_api,
    answers,
    calls,
    channels_api,
    customer_projection,
    knowledge,
    mail_in,
    mail_out,
    messengers,
    queue,
    routing,
    sla,
    sla_api,
    surveys,
    ticketing,
    tickets_api,
    tickets_categories,
    visits,
)
from .runtime import support

# The parts of the service (crm_chassis.parts says what each may define; runtime.py the hooks).
PARTS = [
    ticketing,  # the core: opening, messages, states, delivery of replies
    customer_projection,
    mail_out,  # agent replies by e-mail (senders["email"])
    mail_in,  # the inbound SMTP endpoint (role mail-in; serve runs it too)
    routing,  # push offers of tickets to agents, re-offers, capacity
    sla,  # SLA clocks from state intervals, warnings, breaches and their actions
    sla_api,  # SlaService: policies, recompute, a ticket's SLA
    agents_api,  # AgentService, TeamService, CalendarService: agents, presence, weights, teams, calendars
    tickets_api,  # TicketService: create, find, update, states, assign, messages, history, export
    tickets_categories,  # CategoryService: the managed list of categories
    calls,  # CTI: call events from the PBX, call logs, callbacks, after-call work
    visits,  # field-service visits of technicians
    surveys,  # CSAT and expectation surveys, answered through signed links
    messengers,  # Telegram and Bale: inbound updates, reply senders, notices
    channels_api,  # ChannelService: the bots' webhook, the public web form, channel status
    answers,  # canned answers, replies from them, suggestions for a ticket
    knowledge,  # the knowledge base: categories, articles, search, ratings
    queue,  # QueueService: the live queue per team and agent
]

SPEC = parts_spec("support-svc", 50053, __file__, "support", PARTS, make=lambda ctx: support(ctx, PARTS))


def run() -> int:
    return main(SPEC)


if __name__ == "__main__":
    raise SystemExit(run())
