"""The tracking part's tables (tracking.py), on the service's one metadata (tables.py):

- `visitors`: a first-party web visitor id (the company site sets it) and the customer it is
  tied to once known (by `identify`, a tracked click's visit token, or a form), first/last seen.
- `page_events`: the site's page views and events, append-only, read by visitor and time.
- `web_activity`: per customer, a summary of their visits kept from page_events (page views,
  events, last visit and page) for segmentation and sales' lead scoring to read.
- `short_links`: the short links of SMS messages (an SMS has no room for a signed click token):
  code -> (message, target URL), the code an HMAC of both, so a re-render writes the same row.
- `responses`: recipients' responses to campaigns (a reply, a form, a click on a lead link, an
  SMS answer), each published as response.recorded.v1 for sales to open a lead.
"""

from __future__ import annotations

import sqlalchemy as sa

from crm_chassis.columns import TIMESTAMPTZ, UUID, id_column, text_column

from .tables import audience_invoices, metadata

visitors = sa.Table(
    "visitors",
    metadata,
    sa.Column("visitor_id", sa.Text, primary_key=True),
    text_column("customer_id"),
    text_column("identified_by"),  # identify | click | form
    sa.Column("first_seen_time", TIMESTAMPTZ, nullable=False, server_default=sa.func.now()),
    sa.Column("last_seen_time", TIMESTAMPTZ, nullable=False, server_default=sa.func.now()),
)
sa.Index("visitors_customer", visitors.c.customer_id, postgresql_where=visitors.c.customer_id != "")

short_links = sa.Table(
    "short_links",
    metadata,
    sa.Column("code", sa.Text, primary_key=True),
    sa.Column("message_id", UUID, nullable=False, index=True),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("create_time", TIMESTAMPTZ, nullable=False, server_default=sa.func.now()),
)

page_events = sa.Table(
    "page_events",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("visitor_id", sa.Text, nullable=False),
    sa.Column("kind", sa.Text, nullable=False, server_default="page_view"),  # page_view | event
    text_column("name"),
    text_column("url"),
    text_column("referrer"),
    text_column("title"),
    text_column("utm_source"),
    text_column("utm_medium"),
    text_column("utm_campaign"),
    text_column("utm_term"),
    text_column("utm_content"),
    sa.Column("event_time", TIMESTAMPTZ, nullable=False),
    sa.Column("record_time", TIMESTAMPTZ, nullable=False, server_default=sa.func.now()),
)
sa.Index("page_events_visitor", page_events.c.visitor_id, page_events.c.event_time)

web_activity = sa.Table(
    "web_activity",
    metadata,
    sa.Column("customer_id", sa.Text, primary_key=True),
    sa.Column("page_views", sa.Integer, nullable=False, server_default="0"),
    sa.Column("event_count", sa.Integer, nullable=False, server_default="0"),
    sa.Column("first_visit_time", TIMESTAMPTZ),
    sa.Column("last_visit_time", TIMESTAMPTZ),
    text_column("last_page"),
    info={"merge": "own"},  # tracking.py recomputes the survivor's row on a merge
)

responses = sa.Table(
    "responses",
    metadata,
    id_column(),
    sa.Column("campaign_id", UUID, sa.ForeignKey("campaigns.id", ondelete="CASCADE"), nullable=False),
    sa.Column("message_id", UUID),
    text_column("customer_id"),
    sa.Column("kind", sa.Text, nullable=False),  # reply | form | click | sms
    sa.Column("channel", sa.Text, nullable=False),  # email | sms | telegram | bale | web
    text_column("contact_name"),
    text_column("email"),
    text_column("phone"),
    text_column("text"),
    text_column("utm_source"),
    text_column("utm_medium"),
    text_column("utm_campaign"),
    text_column("visitor_id"),
    text_column("actor"),
    sa.Column("request_id", sa.Text, unique=True),
    sa.Column("create_time", TIMESTAMPTZ, nullable=False, server_default=sa.func.now()),
    info={"personal": ("contact_name", "email", "phone", "text")},
)
sa.Index("responses_campaign", responses.c.campaign_id, responses.c.create_time, responses.c.id)

# First-touch attribution (campaigns.campaign_stats) reads a campaign's invoices by their lead's
# campaign.
sa.Index(
    "audience_invoices_campaign",
    audience_invoices.c.campaign_id,
    postgresql_where=audience_invoices.c.campaign_id != "",
)
