"""The read models of reporting-svc, on one metadata. Migrations create them (0001..0004); the
rebuild makes fresh copies of every PROJECTED table in a schema of its own and swaps them in.

Facts are keyed by the entity's id and carry its version (or event time): a handler applies an
event only if it is newer (projection.apply_versioned), so out-of-order and replayed events
leave the newest state. Rollups are sums kept by delta from a fact's old to its new state
(projection.Rollup), so they stay right whatever order facts arrive in.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

metadata = sa.MetaData()

TS = sa.DateTime(timezone=True)

customer_source_facts = sa.Table(
    "customer_source_facts",
    metadata,
    sa.Column("customer_id", sa.Text, primary_key=True),
    sa.Column("acquisition_source", sa.Text, nullable=False),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("deleted", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("version", sa.Integer, nullable=False, server_default="0"),
)

# support-svc: one row per ticket, its newest version.
ticket_facts = sa.Table(
    "ticket_facts",
    metadata,
    sa.Column("ticket_id", sa.Text, primary_key=True),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("channel", sa.Text, nullable=False),
    sa.Column("team", sa.Text, nullable=False),
    sa.Column("assignee", sa.Text, nullable=False),
    sa.Column("complaint", sa.Boolean, nullable=False),
    sa.Column("exchange_count", sa.Integer, nullable=False),
    sa.Column("create_time", TS, nullable=False),
    sa.Column("first_response_time", TS),
    sa.Column("resolve_time", TS),
    sa.Column("close_time", TS),
    sa.Column("sla_policy", sa.Text, nullable=False),
    sa.Column("sla_first_response_met", sa.Boolean, nullable=False),
    sa.Column("sla_resolution_met", sa.Boolean, nullable=False),
)

# survey.answered.v1 (csat): one row per survey; version = answer time.
survey_facts = sa.Table(
    "survey_facts",
    metadata,
    sa.Column("survey_id", sa.Text, primary_key=True),
    sa.Column("version", TS, nullable=False),
    sa.Column("agent", sa.Text, nullable=False),
    sa.Column("team", sa.Text, nullable=False),
    sa.Column("csat", sa.Integer, nullable=False),
)

# survey.answered.v1 (expectation, since 0013): one row per survey; version = answer time;
# `scores` its dimensions' levels [{"dimension", "adequate", "desired", "perceived"}] (1-9 each;
# a dimension without all three is left out).
expectation_facts = sa.Table(
    "expectation_facts",
    metadata,
    sa.Column("survey_id", sa.Text, primary_key=True),
    sa.Column("version", TS, nullable=False),
    sa.Column("agent", sa.Text, nullable=False),
    sa.Column("team", sa.Text, nullable=False),
    sa.Column("scores", JSONB, nullable=False),
)
EXPECTATION_MEASURES = ("answers", "adequate_sum", "desired_sum", "perceived_sum")
# The expectation survey's rollup: per Tehran answer day x team x agent x dimension.
expectation_daily = sa.Table(
    "expectation_daily",
    metadata,
    sa.Column("day", sa.Date, primary_key=True),
    sa.Column("team", sa.Text, primary_key=True),
    sa.Column("agent", sa.Text, primary_key=True),
    sa.Column("dimension", sa.Text, primary_key=True),
    *(sa.Column(m, sa.BigInteger, nullable=False, server_default="0") for m in EXPECTATION_MEASURES),
)

# ticket.sla_breached.v1: one row per (ticket, metric); a breach counts once.
sla_breach_facts = sa.Table(
    "sla_breach_facts",
    metadata,
    sa.Column("ticket_id", sa.Text, primary_key=True),
    sa.Column("metric", sa.Text, primary_key=True),
    sa.Column("version", TS, nullable=False),
    sa.Column("team", sa.Text, nullable=False),
    sa.Column("assignee", sa.Text, nullable=False),
)

# call.logged.v1: one row per call.
call_facts = sa.Table(
    "call_facts",
    metadata,
    sa.Column("call_id", sa.Text, primary_key=True),
    sa.Column("version", sa.BigInteger, nullable=False),  # CallEvent.version (the call log's etag)
    sa.Column("agent", sa.Text, nullable=False),
    sa.Column("start_time", TS, nullable=False),
)

SUPPORT_MEASURES = (
    "requests",
    "complaints",
    "exchanges",
    "first_responses",
    "first_response_seconds",
    "resolutions",
    "resolution_seconds",
    "sla_targets",
    "sla_met",
    "closed",
    "sla_breaches",
    "csat_sum",
    "csat_count",
    "calls",
)

# The support desk's daily rollup: per Tehran day x team x agent x channel.
support_daily = sa.Table(
    "support_daily",
    metadata,
    sa.Column("day", sa.Date, primary_key=True),
    sa.Column("team", sa.Text, primary_key=True),
    sa.Column("agent", sa.Text, primary_key=True),
    sa.Column("channel", sa.Text, primary_key=True),
    *(sa.Column(m, sa.BigInteger, nullable=False, server_default="0") for m in SUPPORT_MEASURES),
)

# The same sums per month (migration 0016), twice: per Gregorian month (calendar 'gregorian',
# month = its first day) and per Jalali month (calendar 'jalali', month = the Gregorian date of
# its first day), x team x agent x channel. Kept by the same facts' contributions as
# support_daily (support.monthly); a report by month, quarter, year or all over a long range
# reads its whole months here and its ragged edges from support_daily (support_report.py).
SUPPORT_CALENDARS = ("gregorian", "jalali")
support_monthly = sa.Table(
    "support_monthly",
    metadata,
    sa.Column("calendar", sa.Text, primary_key=True),
    sa.Column("month", sa.Date, primary_key=True),
    sa.Column("team", sa.Text, primary_key=True),
    sa.Column("agent", sa.Text, primary_key=True),
    sa.Column("channel", sa.Text, primary_key=True),
    *(sa.Column(m, sa.BigInteger, nullable=False, server_default="0") for m in SUPPORT_MEASURES),
)

# sales-svc: one row per lead and per opportunity, their newest version.
lead_facts = sa.Table(
    "lead_facts",
    metadata,
    sa.Column("lead_id", sa.Text, primary_key=True),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("create_time", TS, nullable=False),
    # since 0013: the campaign the lead came from (LeadEvent.campaign_id; '' for none or projected before)
    sa.Column("campaign_id", sa.Text, nullable=False, server_default=""),
)

# Report 1's cost per acquisition: leads attributed to a campaign per Tehran creation day x the
# lead's source x campaign (a rollup of lead_facts), to share each campaign's cost among the
# sources and periods of the leads it brought.
campaign_leads_daily = sa.Table(
    "campaign_leads_daily",
    metadata,
    sa.Column("day", sa.Date, primary_key=True),
    sa.Column("source", sa.Text, primary_key=True),
    sa.Column("campaign_id", sa.Text, primary_key=True),
    sa.Column("leads", sa.BigInteger, nullable=False, server_default="0"),
)
sa.Index("campaign_leads_daily_campaign", campaign_leads_daily.c.campaign_id)

opportunity_facts = sa.Table(
    "opportunity_facts",
    metadata,
    sa.Column("opportunity_id", sa.Text, primary_key=True),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("currency", sa.Text, nullable=False),  # IRR for IRT amounts (kept in rials)
    sa.Column("amount", sa.Numeric(38, 9), nullable=False),
    sa.Column("close_time", TS),
    # since 0012, for report 3 (a database projected before keeps '' / NULL until a rebuild)
    sa.Column("owner", sa.Text, nullable=False, server_default=""),
    sa.Column("team", sa.Text, nullable=False, server_default=""),
    sa.Column("stage", sa.Text, nullable=False, server_default=""),
    sa.Column("stage_name", sa.Text, nullable=False, server_default=""),
    sa.Column("probability", sa.Numeric(9, 4), nullable=False, server_default="0"),
    sa.Column("forecast_category", sa.Text, nullable=False, server_default=""),
    sa.Column("expected_close_date", sa.Date),
)

# Report 3's rollup of opportunity facts, per day x owner x team x stage x forecast category x
# currency: an open opportunity counts (with its amount and amount x probability / 100) on its
# expected close date (NO_DATE without one), a won one (with its amount) on its Tehran closing
# day. Lost ones count nowhere. Amounts in rials for IRR and IRT.
PIPELINE_MEASURES = ("open_opportunities", "open_amount", "weighted_amount", "won_opportunities", "won_amount")
sales_pipeline_daily = sa.Table(
    "sales_pipeline_daily",
    metadata,
    sa.Column("day", sa.Date, primary_key=True),
    sa.Column("owner", sa.Text, primary_key=True),
    sa.Column("team", sa.Text, primary_key=True),
    sa.Column("stage", sa.Text, primary_key=True),
    sa.Column("stage_name", sa.Text, primary_key=True),
    sa.Column("forecast_category", sa.Text, primary_key=True),
    sa.Column("currency", sa.Text, primary_key=True),
    sa.Column("open_opportunities", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("open_amount", sa.Numeric(38, 9), nullable=False, server_default="0"),
    sa.Column("weighted_amount", sa.Numeric(38, 9), nullable=False, server_default="0"),
    sa.Column("won_opportunities", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("won_amount", sa.Numeric(38, 9), nullable=False, server_default="0"),
)

# forecast_snapshot.created.v1: one row per sales-svc forecast snapshot (immutable; version =
# its create_time in microseconds). Amounts in `currency` (the sales reporting currency).
SNAPSHOT_AMOUNTS = (
    "open_amount", "weighted_amount", "pipeline_amount", "best_case_amount", "commit_amount",
    "closed_amount", "omitted_amount", "won_amount",
)  # fmt: skip
forecast_snapshot_facts = sa.Table(
    "forecast_snapshot_facts",
    metadata,
    sa.Column("snapshot_id", sa.Text, primary_key=True),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("period", sa.Text, nullable=False),  # sales' label: 1405-Q1, 1405/03, 2026-05, ...
    sa.Column("calendar", sa.Text, nullable=False),
    sa.Column("unit", sa.Text, nullable=False),
    sa.Column("period_start", sa.Date, nullable=False),
    sa.Column("period_end", sa.Date, nullable=False),  # the day after the last
    sa.Column("owner", sa.Text, nullable=False),
    sa.Column("currency", sa.Text, nullable=False),
    *(sa.Column(a, sa.Numeric(38, 9), nullable=False, server_default="0") for a in SNAPSHOT_AMOUNTS),
    sa.Column("adjusted_commit", sa.Numeric(38, 9)),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("create_time", TS, nullable=False),
)
sa.Index(
    "forecast_snapshot_facts_period",
    forecast_snapshot_facts.c.calendar,
    forecast_snapshot_facts.c.unit,
    forecast_snapshot_facts.c.period_start,
    forecast_snapshot_facts.c.owner,
)

ACQUISITION_MEASURES = ("customers", "leads", "converted_leads", "won_opportunities", "won_amount")

# Report 1's rollup: per Tehran day x acquisition source x currency ("" for the counts). Customers
# count on their creation day (not deleted or merged away); leads on their creation day, with
# those of them converted since (a cohort); won opportunities and their amount on the closing day.
acquisition_daily = sa.Table(
    "acquisition_daily",
    metadata,
    sa.Column("day", sa.Date, primary_key=True),
    sa.Column("source", sa.Text, primary_key=True),
    sa.Column("currency", sa.Text, primary_key=True),
    *(sa.Column(m, sa.BigInteger, nullable=False, server_default="0") for m in ACQUISITION_MEASURES[:-1]),
    sa.Column("won_amount", sa.Numeric(38, 9), nullable=False, server_default="0"),
)

# Report 7, Customer 360: one row per event about a customer, from every service. customer_id
# is the customer the row is shown under (the survivor, after a merge); origin_customer_id the
# one the event named. event_id is unique: a redelivered event adds nothing.
timeline = sa.Table(
    "timeline",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("customer_id", sa.Text, nullable=False),
    sa.Column("origin_customer_id", sa.Text, nullable=False),
    sa.Column("occurred_at", TS, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("ref", sa.Text, nullable=False),
    sa.Column("title", sa.Text, nullable=False),
    sa.Column("detail", JSONB, nullable=False, server_default="{}"),
    sa.Column("event_id", sa.Text, nullable=False, unique=True),
)
sa.Index("timeline_page", timeline.c.customer_id, timeline.c.occurred_at.desc(), timeline.c.id.desc())
sa.Index("timeline_origin", timeline.c.origin_customer_id)

# customer.merged.v1: a merged customer's events, later ones too, go to the survivor's timeline.
customer_aliases = sa.Table(
    "customer_aliases",
    metadata,
    sa.Column("merged_id", sa.Text, primary_key=True),
    sa.Column("survivor_id", sa.Text, nullable=False),
)
sa.Index("customer_aliases_survivor", customer_aliases.c.survivor_id)

# Report 5, loyalty (campaign-svc's points ledger and tiers). One row per ledger movement (points
# signed: positive in, negative out; version = its time) into loyalty_daily (Tehran day x
# programme: the points moved per kind); one row per member account with its newest tier into
# tier_counts (programme x tier: accounts).
LOYALTY_MEASURES = ("earned", "redeemed", "expired", "adjusted", "reversed")
points_facts = sa.Table(
    "points_facts",
    metadata,
    sa.Column("entry_id", sa.Text, primary_key=True),
    sa.Column("version", TS, nullable=False),
    sa.Column("programme", sa.Text, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("points", sa.BigInteger, nullable=False),
)
loyalty_daily = sa.Table(
    "loyalty_daily",
    metadata,
    sa.Column("day", sa.Date, primary_key=True),
    sa.Column("programme", sa.Text, primary_key=True),
    *(sa.Column(m, sa.BigInteger, nullable=False, server_default="0") for m in LOYALTY_MEASURES),
)
tier_facts = sa.Table(
    "tier_facts",
    metadata,
    sa.Column("account_id", sa.Text, primary_key=True),
    sa.Column("version", TS, nullable=False),
    sa.Column("programme", sa.Text, nullable=False),
    sa.Column("tier", sa.Text, nullable=False),
)
tier_counts = sa.Table(
    "tier_counts",
    metadata,
    sa.Column("programme", sa.Text, primary_key=True),
    sa.Column("tier", sa.Text, primary_key=True),
    sa.Column("accounts", sa.BigInteger, nullable=False, server_default="0"),
)

# Report 5, campaigns: each campaign's newest state (goal, cost: CampaignEvent.version) and what
# is attributed to it (responses; sales' leads, orders and paid invoices naming its id), summed
# per campaign in campaign_stats. Amounts in rials (IRT as IRR); campaign ids without "campaigns/".
CAMPAIGN_MEASURES = ("responses", "leads", "orders", "revenue")
campaign_facts = sa.Table(
    "campaign_facts",
    metadata,
    sa.Column("campaign_id", sa.Text, primary_key=True),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("display_name", sa.Text, nullable=False),
    sa.Column("channel", sa.Text, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("goal_kind", sa.Text, nullable=False),
    sa.Column("goal_target", sa.Numeric(38, 9), nullable=False),
    sa.Column("currency", sa.Text, nullable=False),
    sa.Column("cost", sa.Numeric(38, 9), nullable=False),
    sa.Column("recipients", sa.BigInteger, nullable=False),
)
campaign_stats = sa.Table(
    "campaign_stats",
    metadata,
    sa.Column("campaign_id", sa.Text, primary_key=True),
    *(sa.Column(m, sa.BigInteger, nullable=False, server_default="0") for m in CAMPAIGN_MEASURES[:-1]),
    sa.Column("revenue", sa.Numeric(38, 9), nullable=False, server_default="0"),
)
campaign_attribution_facts = sa.Table(  # one row per response, lead, order or invoice naming a campaign
    "campaign_attribution_facts",
    metadata,
    sa.Column("ref", sa.Text, primary_key=True),  # responses/{id}, leads/{id}, orders/{id}, invoices/{id}
    sa.Column("version", sa.BigInteger, nullable=False),  # the record's version, or its event time in microseconds
    sa.Column("campaign_id", sa.Text, nullable=False),
    sa.Column("measure", sa.Text, nullable=False),  # responses, leads, orders, revenue
    sa.Column("counts", sa.Boolean, nullable=False),  # an order not cancelled, an invoice paid
    sa.Column("amount", sa.Numeric(38, 9), nullable=False),  # revenue: rials
)

# The tables a rebuild makes afresh (everything the projections write but the lag table).
PROJECTED = [
    customer_source_facts,
    ticket_facts,
    survey_facts,
    sla_breach_facts,
    call_facts,
    support_daily,
    support_monthly,
    expectation_facts,
    expectation_daily,
    lead_facts,
    opportunity_facts,
    acquisition_daily,
    campaign_leads_daily,
    sales_pipeline_daily,
    forecast_snapshot_facts,
    timeline,
    customer_aliases,
    points_facts,
    loyalty_daily,
    tier_facts,
    tier_counts,
    campaign_facts,
    campaign_stats,
    campaign_attribution_facts,
]

# Per producer: the newest event applied, for GetProjectionStatus.
projection_sources = sa.Table(
    "projection_sources",
    metadata,
    sa.Column("domain", sa.Text, primary_key=True),
    sa.Column("last_event_time", TS, nullable=False),
    sa.Column("last_applied_at", TS, nullable=False),
    sa.Column("applied_events", sa.BigInteger, nullable=False, server_default="0"),
)

# The rebuild in progress (at most one row): while it is there, live events are applied to its
# shadow schema too, so the swapped-in tables miss nothing that arrived during the replay.
projection_rebuilds = sa.Table(
    "projection_rebuilds",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),  # always 1
    sa.Column("job_id", sa.Text, nullable=False),
    sa.Column("shadow_schema", sa.Text, nullable=False),
    sa.Column("start_time", TS, nullable=False, server_default=sa.func.now()),
)
