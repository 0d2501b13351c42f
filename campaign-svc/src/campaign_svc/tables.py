"""The core tables of campaign-svc (SQLAlchemy Core), shared by every part of the service.

- `audience`: the customer projection segmentation reads, one row per customer: customer-svc's
  fields (crm_chassis.customer_refs, typed), plus behaviour kept from sales and support events
  (orders, revenue, opportunities, tickets, complaints) and the e-mail/SMS consent summary.
  Behaviour columns are recomputed per customer from the fact tables below (`audience.py`), so
  a replayed or out-of-order event leaves them right.
- `audience_orders`, `audience_invoices`, `audience_opportunities`, `audience_tickets`: the
  facts those events carry, one row per order / invoice / opportunity / ticket, newest kept.
  Attribution reads orders and invoices from here (their campaign_id and times).
- `campaigns` and `messages`: a campaign, and one row per message to one recipient (queued
  by the launch, sent by the delivery workers, then delivered / bounced / opened / clicked).
- `consent_ledger` (append-only: every grant, confirmation and withdrawal with its proof),
  `consent_state` (the current state per channel, address and purpose, derived from the
  ledger in the same transaction) and `suppressions` (addresses never sent to: hard bounces,
  complaints, stop keywords). `consent.py` writes them and answers "may we send".

Parts with tables of their own (segments, templates, variants, tracking, loyalty) define them in
their module on this `metadata`; every table is created by a migration, never by create_all.
Enum-like values are lower-case text ('email', 'queued'); money is numeric(18, 2) in the
campaign's currency (IRR by default: the suite has one currency per deployment).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from crm_chassis import customer_refs as refs
from crm_chassis.columns import TIMESTAMPTZ, UUID, id_column, text_column, times

metadata = sa.MetaData()
JSONB = pg.JSONB
TEXTS = pg.ARRAY(sa.Text)
MONEY = sa.Numeric(18, 2)

# Customer fields segmentation offers besides crm_chassis.customer_refs.BASE (display name,
# e-mail, phone, mobile, national id, province, city, acquisition source).
AUDIENCE_FIELDS = (
    "type",  # person | organization
    "kind",  # end_consumer | intermediary | internal
    "gender",
    "lifecycle_stage",
    "education_degree",
    "birth_date",
    "acquisition_date",
    "create_time",  # when the customer registered
    "groups",
    "tags",
    "rank",
    "industry",
    "country",
    "owner",
)


def _behaviour() -> list[sa.Column]:
    """Columns of the audience row kept from other services' events (never by customer events)."""
    count = [
        sa.Column(n, sa.Integer, nullable=False, server_default="0")
        for n in ("order_count", "open_opportunities", "won_opportunities", "ticket_count", "complaint_count")
    ]
    return [
        *count,
        sa.Column("revenue", MONEY, nullable=False, server_default="0"),  # paid invoices minus credit notes
        sa.Column("first_purchase_time", TIMESTAMPTZ),
        sa.Column("last_purchase_time", TIMESTAMPTZ),
        sa.Column("last_ticket_time", TIMESTAMPTZ),
        sa.Column("last_complaint_time", TIMESTAMPTZ),
        sa.Column("last_activity_time", TIMESTAMPTZ),  # the latest of every behaviour time
        # the company site's click-stream (tracking.summarise, from web_activity)
        sa.Column("web_page_views", sa.Integer, nullable=False, server_default="0"),
        sa.Column("web_events", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_web_visit_time", TIMESTAMPTZ),
        # consent summary (consent_state of the customer's own addresses, purpose marketing)
        text_column("email_consent"),  # granted | pending | revoked | "" (never asked)
        text_column("sms_consent"),
        sa.Column("behaviour_time", TIMESTAMPTZ),  # when behaviour was last recomputed
    ]


audience = refs.define(metadata, *AUDIENCE_FIELDS, name="audience", columns=_behaviour)
BEHAVIOUR = tuple(c.name for c in _behaviour())


def _fact_time() -> sa.Column:
    return sa.Column("event_time", TIMESTAMPTZ, nullable=False)  # the newest event applied


audience_orders = sa.Table(
    "audience_orders",
    metadata,
    sa.Column("order_id", sa.Text, primary_key=True),
    sa.Column("customer_id", sa.Text, nullable=False, index=True),
    text_column("state"),  # open | partially_delivered | delivered | cancelled
    sa.Column("total", MONEY, nullable=False, server_default="0"),
    text_column("currency"),
    sa.Column("order_date", sa.Date),
    sa.Column("placed_time", TIMESTAMPTZ, nullable=False),
    text_column("campaign_id"),  # the lead's campaign, as sales-svc knows it
    text_column("source"),
    sa.Column("products", TEXTS, nullable=False, server_default="{}"),  # product ids
    _fact_time(),
)

audience_invoices = sa.Table(
    "audience_invoices",
    metadata,
    sa.Column("invoice_id", sa.Text, primary_key=True),
    sa.Column("customer_id", sa.Text, nullable=False, index=True),
    text_column("kind"),  # invoice | credit_note
    text_column("state"),  # issued | partially_paid | paid | overdue | cancelled
    text_column("order_id"),
    text_column("credited_invoice"),  # a credit note: the invoice it reverses
    sa.Column("total", MONEY, nullable=False, server_default="0"),
    sa.Column("paid_total", MONEY, nullable=False, server_default="0"),
    text_column("currency"),
    sa.Column("issue_date", sa.Date),
    sa.Column("paid_time", TIMESTAMPTZ),  # when it became paid (invoice.paid.v1)
    text_column("campaign_id"),
    text_column("source"),
    sa.Column("products", TEXTS, nullable=False, server_default="{}"),
    _fact_time(),
)

audience_opportunities = sa.Table(
    "audience_opportunities",
    metadata,
    sa.Column("opportunity_id", sa.Text, primary_key=True),
    sa.Column("customer_id", sa.Text, nullable=False, index=True),
    text_column("state"),  # open | won | lost
    sa.Column("version", sa.BigInteger, nullable=False, server_default="0"),
    _fact_time(),
)

audience_tickets = sa.Table(
    "audience_tickets",
    metadata,
    sa.Column("ticket_id", sa.Text, primary_key=True),
    sa.Column("customer_id", sa.Text, nullable=False, index=True),
    sa.Column("complaint", sa.Boolean, nullable=False, server_default=sa.false()),
    text_column("state"),
    sa.Column("open_time", TIMESTAMPTZ, nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False, server_default="0"),
    _fact_time(),
)

# --- campaigns and their messages ---
campaigns = sa.Table(
    "campaigns",
    metadata,
    id_column(),
    sa.Column("display_name", sa.Text, nullable=False),
    text_column("description"),
    sa.Column("channel", sa.Text, nullable=False),  # email | sms | telegram | bale
    sa.Column("purpose", sa.Text, nullable=False, server_default="marketing"),  # consent purpose
    # draft | scheduled | running | paused | completed | cancelled
    sa.Column("state", sa.Text, nullable=False, server_default="draft"),
    sa.Column("segment_id", UUID),  # the audience (segments.py)
    sa.Column("exclude_segment_ids", TEXTS, nullable=False, server_default="{}"),
    # schedule: start_time (null: at launch), cron + timezone for a recurring campaign
    sa.Column("start_time", TIMESTAMPTZ),
    text_column("cron"),
    sa.Column("timezone", sa.Text, nullable=False, server_default="Asia/Tehran"),
    sa.Column("run", sa.Integer, nullable=False, server_default="0"),  # runs launched so far
    # goal: leads | orders | revenue | responses, its target, and the spend for ROI
    text_column("goal_kind"),
    sa.Column("goal_target", MONEY, nullable=False, server_default="0"),
    sa.Column("cost", MONEY, nullable=False, server_default="0"),
    sa.Column("currency", sa.Text, nullable=False, server_default="IRR"),
    sa.Column("attribution_days", sa.Integer, nullable=False, server_default="30"),
    sa.Column("cloned_from", UUID),
    # A/B: the share of the audience testing the variants, the metric and wait of the winner
    sa.Column("test_percent", sa.Integer, nullable=False, server_default="0"),
    text_column("winner_metric"),  # opens | clicks | responses | revenue
    sa.Column("winner_wait_hours", sa.Integer, nullable=False, server_default="24"),
    text_column("winner_variant"),
    sa.Column("throttle_per_second", sa.Integer, nullable=False, server_default="0"),  # 0: the channel's
    sa.Column("quiet_start_hour", sa.Integer, nullable=False, server_default="22"),
    sa.Column("quiet_end_hour", sa.Integer, nullable=False, server_default="8"),
    sa.Column("ignore_frequency_cap", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("launch_time", TIMESTAMPTZ),
    sa.Column("complete_time", TIMESTAMPTZ),
    text_column("owner"),  # the marketer's subject
    sa.Column("request_id", sa.Text, unique=True),
    *times(),
)

messages = sa.Table(
    "messages",
    metadata,
    id_column(),
    sa.Column("campaign_id", UUID, sa.ForeignKey("campaigns.id", ondelete="CASCADE"), nullable=False),
    sa.Column("run", sa.Integer, nullable=False, server_default="1"),
    text_column("variant"),  # the A/B variant's key ('' without variants)
    sa.Column("customer_id", sa.Text, nullable=False),
    sa.Column("channel", sa.Text, nullable=False),
    sa.Column("address", sa.Text, nullable=False),  # e-mail, E.164 number or chat id at queue time
    # queued | held (for the A/B winner) | sending | sent | delivered | bounced | failed |
    # suppressed | capped | cancelled
    sa.Column("state", sa.Text, nullable=False, server_default="queued"),
    sa.Column("not_before", TIMESTAMPTZ, nullable=False, server_default=sa.func.now()),  # quiet hours
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    text_column("provider"),
    text_column("provider_message_id"),  # the SMTP Message-ID, the SMS provider's id, ...
    text_column("error"),
    text_column("bounce_kind"),  # hard | soft
    sa.Column("queued_time", TIMESTAMPTZ, nullable=False, server_default=sa.func.now()),
    sa.Column("sent_time", TIMESTAMPTZ),
    sa.Column("delivered_time", TIMESTAMPTZ),
    sa.Column("bounced_time", TIMESTAMPTZ),
    sa.Column("opened_time", TIMESTAMPTZ),  # the first open
    sa.Column("clicked_time", TIMESTAMPTZ),  # the first click
    sa.Column("responded_time", TIMESTAMPTZ),
    sa.Column("unsubscribed_time", TIMESTAMPTZ),
    sa.Column("open_count", sa.Integer, nullable=False, server_default="0"),
    sa.Column("click_count", sa.Integer, nullable=False, server_default="0"),
    # fetches by link scanners and prefetchers, not counted above (tracking.machine_reason; 0009)
    sa.Column("machine_open_count", sa.Integer, nullable=False, server_default="0"),
    sa.Column("machine_click_count", sa.Integer, nullable=False, server_default="0"),
    # quiet hours are read in it (the campaign's when queued; migration 0006)
    sa.Column("timezone", sa.Text, nullable=False, server_default="Asia/Tehran"),
    sa.Column("lease_until", TIMESTAMPTZ),  # while sending: a worker that died leaves it to the sweep
    sa.UniqueConstraint("campaign_id", "run", "customer_id", name="messages_one_per_run"),
    info={"personal": ("address",), "merge_unique": ("campaign_id", "run")},
)
# The delivery workers' queue: due queued messages, oldest first.
sa.Index("messages_due", messages.c.not_before, postgresql_where=messages.c.state == "queued")
sa.Index("messages_customer", messages.c.customer_id, messages.c.sent_time)
sa.Index("messages_sending", messages.c.lease_until, postgresql_where=messages.c.state == "sending")
sa.Index("messages_campaign", messages.c.campaign_id, messages.c.run, messages.c.state)

# The content of a campaign: one template version per A/B variant (key '' with one variant).
campaign_variants = sa.Table(
    "campaign_variants",
    metadata,
    sa.Column("campaign_id", UUID, sa.ForeignKey("campaigns.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("template_id", sa.Text, nullable=False),
    sa.Column("template_version", sa.Integer, nullable=False),
    sa.Column("weight", sa.Integer, nullable=False, server_default="1"),
)
sa.Index("messages_provider_id", messages.c.provider_message_id, postgresql_where=messages.c.provider_message_id != "")

# --- consent ---
consent_ledger = sa.Table(
    "consent_ledger",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("channel", sa.Text, nullable=False),  # email | sms | telegram | bale
    sa.Column("address", sa.Text, nullable=False),  # normalised: lower-case e-mail, E.164, chat id
    sa.Column("purpose", sa.Text, nullable=False, server_default="marketing"),
    text_column("customer_id"),
    # requested (double opt-in sent) | granted | revoked
    sa.Column("action", sa.Text, nullable=False),
    # web_form | import | confirmation_link | unsubscribe_link | list_unsubscribe | sms_stop |
    # admin | hard_bounce | complaint | erasure | api
    sa.Column("source", sa.Text, nullable=False),
    text_column("text_version"),  # the consent text the person was shown
    sa.Column("proof", JSONB, nullable=False, server_default="{}"),  # ip, user agent, message id, keyword
    text_column("actor"),
    sa.Column("occur_time", TIMESTAMPTZ, nullable=False, server_default=sa.func.now()),
    sa.Column("record_time", TIMESTAMPTZ, nullable=False, server_default=sa.func.now()),
    info={"personal": ("address", "proof")},
)
sa.Index("consent_ledger_address", consent_ledger.c.channel, consent_ledger.c.address, consent_ledger.c.id)
sa.Index("consent_ledger_customer", consent_ledger.c.customer_id, postgresql_where=consent_ledger.c.customer_id != "")

consent_state = sa.Table(
    "consent_state",
    metadata,
    sa.Column("channel", sa.Text, primary_key=True),
    sa.Column("address", sa.Text, primary_key=True),
    sa.Column("purpose", sa.Text, primary_key=True),
    text_column("customer_id"),
    sa.Column("status", sa.Text, nullable=False),  # pending | granted | revoked
    sa.Column("ledger_id", sa.BigInteger, nullable=False),  # the entry that set it
    text_column("source"),
    sa.Column("update_time", TIMESTAMPTZ, nullable=False, server_default=sa.func.now()),
    info={"personal": ("address",)},
)
sa.Index("consent_state_customer", consent_state.c.customer_id, postgresql_where=consent_state.c.customer_id != "")

suppressions = sa.Table(
    "suppressions",
    metadata,
    sa.Column("channel", sa.Text, primary_key=True),
    sa.Column("address", sa.Text, primary_key=True),
    sa.Column("reason", sa.Text, nullable=False),  # hard_bounce | complaint | stop | admin | erased
    text_column("detail"),  # the DSN status, the keyword, ...
    sa.Column("create_time", TIMESTAMPTZ, nullable=False, server_default=sa.func.now()),
    info={"personal": ("address",)},
)

__all__ = [
    "JSONB",
    "MONEY",
    "TEXTS",
    "TIMESTAMPTZ",
    "UUID",
    "id_column",
    "metadata",
    "text_column",
    "times",
]
