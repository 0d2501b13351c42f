"""The core tables of support-svc (SQLAlchemy Core), shared by every part of the service.

Parts with tables of their own (calls, SLA policies, offers, answers, surveys, visits) define them
in their own module on this `metadata`; every table is created by a migration, never by
create_all. Enum values are stored as their lower-case names (state 'waiting_on_customer',
channel 'email', priority 'high'); people are token subjects (agents.id).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from crm_chassis import customer_refs as refs
from crm_chassis.columns import TIMESTAMPTZ, UUID, id_column, text_column, times

metadata = sa.MetaData()
JSONB = pg.JSONB
TEXTS = pg.ARRAY(sa.Text)

# customer-svc's customers, from its events: senders are matched by e-mail and phone; the rank
# selects SLA policies; the address is where a technician goes.
customer_refs = refs.define(metadata, "rank", "address", "fax")

# --- business calendars (crm_chassis.business_time.BusinessCalendar from a row) ---
calendars = sa.Table(
    "calendars",
    metadata,
    id_column(),
    sa.Column("name", sa.Text, nullable=False, unique=True),
    sa.Column("timezone", sa.Text, nullable=False, server_default="Asia/Tehran"),
    # weekday (sat, sun, ... fri) -> [["08:00", "12:00"], ["13:00", "17:00"]]
    sa.Column("weekly_hours", JSONB, nullable=False),
    # the holidays package's country whose public holidays close the desk ('' for none)
    sa.Column("holiday_country", sa.Text, nullable=False, server_default="IR"),
    *times(),
)

# Admin overrides: an extra holiday, or a working day with its own hours (a holiday worked).
calendar_days = sa.Table(
    "calendar_days",
    metadata,
    sa.Column("calendar_id", UUID, sa.ForeignKey("calendars.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("day", sa.Date, primary_key=True),
    sa.Column("kind", sa.Text, nullable=False),  # closed | open
    sa.Column("ranges", JSONB, nullable=False, server_default="[]"),  # for open: [["08:00","12:00"]]
    text_column("name"),
)

# --- teams and agents ---
teams = sa.Table(
    "teams",
    metadata,
    id_column(),
    sa.Column("name", sa.Text, nullable=False, unique=True),
    text_column("description"),
    text_column("manager_id"),  # the manager's subject: breach notifications go to them
    sa.Column("calendar_id", UUID, sa.ForeignKey("calendars.id")),  # null: the default calendar
    sa.Column("strategy", sa.Text, nullable=False, server_default="round_robin"),  # | least_loaded | skills
    sa.Column("offer_timeout_seconds", sa.Integer, nullable=False, server_default="120"),
    text_column("rr_cursor"),  # round robin: the agent offered last
    text_column("email_address"),  # mail to this address goes to this team
    sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
    *times(),
)

agents = sa.Table(
    "agents",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),  # the agent's token subject
    sa.Column("display_name", sa.Text, nullable=False),
    text_column("email"),
    sa.Column("skills", TEXTS, nullable=False, server_default="{}"),  # billing, field, network, ...
    sa.Column("languages", TEXTS, nullable=False, server_default="{fa}"),
    sa.Column("capacity", sa.Integer, nullable=False, server_default="10"),  # weighted units
    sa.Column("presence", sa.Text, nullable=False, server_default="offline"),  # online | away | offline
    sa.Column("presence_time", TIMESTAMPTZ, nullable=False, server_default=sa.func.now()),
    # after-call work: not offered anything until then
    sa.Column("busy_until", TIMESTAMPTZ),
    sa.Column("after_call_work_seconds", sa.Integer, nullable=False, server_default="60"),
    sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
    *times(),
)

team_members = sa.Table(
    "team_members",
    metadata,
    sa.Column("team_id", UUID, sa.ForeignKey("teams.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("agent_id", sa.Text, sa.ForeignKey("agents.id", ondelete="CASCADE"), primary_key=True),
)
sa.Index("team_members_agent", team_members.c.agent_id)

# How much of an agent's capacity an open ticket of each channel takes (a call more than a mail).
channel_weights = sa.Table(
    "channel_weights",
    metadata,
    sa.Column("channel", sa.Text, primary_key=True),
    sa.Column("weight", sa.Integer, nullable=False),
)

# --- the managed list of categories ---
categories = sa.Table(
    "categories",
    metadata,
    id_column(),
    sa.Column("key", sa.Text, nullable=False, unique=True),  # complaint, billing, technical, ...
    sa.Column("display_name", sa.Text, nullable=False),
    sa.Column("complaint", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("skill", sa.Text, nullable=False, server_default=""),  # skills-based routing wants it
    sa.Column("team_id", UUID, sa.ForeignKey("teams.id")),  # default team of its tickets
    sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
    *times(),
)

# --- tickets ---
tickets = sa.Table(
    "tickets",
    metadata,
    id_column(),
    sa.Column("number", sa.BigInteger, sa.Identity(), nullable=False, unique=True),  # T-000123
    sa.Column("subject", sa.Text, nullable=False),
    text_column("customer_id"),
    sa.Column("channel", sa.Text, nullable=False),
    text_column("contact_address"),  # e-mail (lower case), E.164 phone, or chat id
    text_column("contact_name"),
    sa.Column("category_id", UUID, sa.ForeignKey("categories.id")),
    sa.Column("complaint", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("priority", sa.Text, nullable=False, server_default="normal"),
    text_column("product"),
    text_column("order_ref"),
    sa.Column("team_id", UUID, sa.ForeignKey("teams.id")),
    text_column("assignee_id"),
    sa.Column("state", sa.Text, nullable=False, server_default="new"),
    sa.Column("tags", TEXTS, nullable=False, server_default="{}"),
    sa.Column("custom_fields", JSONB, nullable=False, server_default="{}"),
    sa.Column("language", sa.Text, nullable=False, server_default="fa"),
    sa.Column("exchange_count", sa.Integer, nullable=False, server_default="0"),
    sa.Column("message_count", sa.Integer, nullable=False, server_default="0"),
    # a customer message since the last agent reply (the next reply counts an exchange)
    sa.Column("awaiting_reply", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("first_response_time", TIMESTAMPTZ),
    sa.Column("last_customer_message_time", TIMESTAMPTZ),
    sa.Column("last_agent_message_time", TIMESTAMPTZ),
    sa.Column("resolve_time", TIMESTAMPTZ),
    sa.Column("close_time", TIMESTAMPTZ),
    text_column("search_text"),  # crm_chassis.persian.normalize of subject, number, contact, tags
    text_column("request_id"),
    *times(),
    # the soonest SLA target (a breached ticket's earliest breached one), kept from ticket_sla by
    # a trigger for the live queue view (migration 0013, queue.py)
    sa.Column("sla_due", TIMESTAMPTZ),
    sa.Column("sla_breached", sa.Boolean, nullable=False, server_default=sa.false()),
)
sa.Index("tickets_state_team", tickets.c.team_id, tickets.c.state)
sa.Index(
    "tickets_assignee_open", tickets.c.assignee_id, postgresql_where=tickets.c.state.notin_(["resolved", "closed"])
)
sa.Index("tickets_customer", tickets.c.customer_id, tickets.c.create_time.desc())
sa.Index("tickets_create", tickets.c.create_time.desc(), tickets.c.id.desc())
sa.Index("tickets_request_id", tickets.c.request_id, unique=True, postgresql_where=tickets.c.request_id != "")
sa.Index(
    "tickets_search_trgm", tickets.c.search_text, postgresql_using="gin", postgresql_ops={"search_text": "gin_trgm_ops"}
)

# Each state a ticket was in, from when to when (end null: now): the SLA clocks are computed
# from these, so a changed calendar or policy recomputes open tickets.
ticket_intervals = sa.Table(
    "ticket_intervals",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("ticket_id", UUID, sa.ForeignKey("tickets.id", ondelete="CASCADE"), nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("start_time", TIMESTAMPTZ, nullable=False),
    sa.Column("end_time", TIMESTAMPTZ),
)
sa.Index("ticket_intervals_ticket", ticket_intervals.c.ticket_id, ticket_intervals.c.start_time)

ticket_messages = sa.Table(
    "ticket_messages",
    metadata,
    id_column(),
    sa.Column("ticket_id", UUID, sa.ForeignKey("tickets.id", ondelete="CASCADE"), nullable=False),
    sa.Column("kind", sa.Text, nullable=False),  # customer | agent | note | system
    text_column("author"),
    sa.Column("body", sa.Text, nullable=False, server_default=""),
    sa.Column("channel", sa.Text, nullable=False),
    text_column("external_id"),  # Message-ID, messenger message id: one message per id and channel
    sa.Column("delivery", sa.Text, nullable=False, server_default=""),  # '' | pending | sent | failed
    text_column("delivery_error"),
    # e-mail threading: In-Reply-To / References of an inbound mail
    sa.Column("headers", JSONB, nullable=False, server_default="{}"),
    sa.Column("create_time", TIMESTAMPTZ, nullable=False, server_default=sa.func.now()),
)
sa.Index("ticket_messages_ticket", ticket_messages.c.ticket_id, ticket_messages.c.create_time)
sa.Index(
    "ticket_messages_external",
    ticket_messages.c.channel,
    ticket_messages.c.external_id,
    unique=True,
    postgresql_where=ticket_messages.c.external_id != "",
)

attachments = sa.Table(
    "attachments",
    metadata,
    id_column(),
    sa.Column("message_id", UUID, sa.ForeignKey("ticket_messages.id", ondelete="CASCADE"), nullable=False),
    sa.Column("filename", sa.Text, nullable=False),
    sa.Column("content_type", sa.Text, nullable=False, server_default="application/octet-stream"),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("content", sa.LargeBinary, nullable=False),
)
sa.Index("attachments_message", attachments.c.message_id)
